"""Chained block hashes: stable across processes, salted per model/tenant, no partial blocks."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from typing import get_args

import pytest

from kvferry.config import load_config
from kvferry.config.models import StoreConfig
from kvferry.errors import ConfigError
from kvferry.index.hashing import HASH_ALGORITHMS, BlockHasher, block_hashes


def test_full_blocks_only_and_chained() -> None:
    h = BlockHasher(4)
    assert h.hashes([1, 2, 3]) == []
    two = h.hashes([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(two) == 2 and all(len(x) == 16 for x in two)
    # block 2 depends on block 1: same tokens after a different first block hash differently
    other = h.hashes([0, 2, 3, 4, 5, 6, 7, 8])
    assert other[1] != two[1]
    # continuation from a parent equals hashing the whole sequence
    assert h.hashes([5, 6, 7, 8], parent=two[0]) == two[1:]


def test_salt_separates_models_tenants_layouts() -> None:
    toks = list(range(32))
    base = block_hashes(toks, 16)
    for salt in ({"model_name": "m"}, {"dtype": "fp8"}, {"layout": "x"}, {"cache_salt": "a"}):
        assert block_hashes(toks, 16, **salt)[0] != base[0], salt
    assert (
        block_hashes(toks, 16, cache_salt="ab")[0]
        != block_hashes(toks, 16, model_name="a", cache_salt="b")[0]
    )
    assert block_hashes(toks, 8)[1] != block_hashes(toks, 16)[0]


def test_the_salt_is_part_of_every_link_not_only_the_root() -> None:
    a, b = BlockHasher(4, cache_salt="tenant-a"), BlockHasher(4, cache_salt="tenant-b")
    tokens = list(range(8))
    parent = a.hashes(tokens[:4])[0]
    # Tenant b continuing from tenant a's block (a parent handed over from anywhere) must not
    # land on tenant a's keys.
    assert b.hashes(tokens[4:], parent=parent) != a.hashes(tokens[4:], parent=parent)
    assert a.hashes(tokens[4:], parent=parent) == a.hashes(tokens)[1:]
    # Nor may a parent forged as another salt's root: no chain starts from a bare digest.
    assert a.hashes(tokens[:4], parent=b.root) != b.hashes(tokens[:4])


@pytest.mark.parametrize("algorithm", HASH_ALGORITHMS)
def test_every_algorithm_chains_and_salts_with_16_byte_keys(algorithm: str) -> None:
    h = BlockHasher(4, algorithm=algorithm)
    tokens = list(range(12))
    keys = h.hashes(tokens)
    assert len(keys) == 3 and all(len(k) == 16 for k in keys) and len(set(keys)) == 3
    assert h.hashes(tokens[4:], parent=keys[0]) == keys[1:]
    assert BlockHasher(4, algorithm=algorithm, cache_salt="t").hashes(tokens) != keys
    assert block_hashes(tokens, 4, algorithm=algorithm) == keys


def test_algorithms_give_disjoint_keys_and_blake2b_is_blake2b() -> None:
    tokens = list(range(16))
    xxh3 = BlockHasher(16).hashes(tokens)
    blake = BlockHasher(16, algorithm="blake2b-128")
    assert blake.hashes(tokens) != xxh3
    packed = b"".join(t.to_bytes(4, "little") for t in tokens)
    want = hashlib.blake2b(blake.root + blake.root + packed, digest_size=16).digest()
    assert blake.hashes(tokens) == [want]


def test_an_unknown_algorithm_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="xxh3-128, blake2b-128"):
        BlockHasher(4, algorithm="md5")


def test_stable_across_processes_and_hash_seeds() -> None:
    code = (
        "from kvferry.index.hashing import block_hashes;"
        "print(block_hashes(list(range(64)), 16, model_name='m', cache_salt='t')[-1].hex())"
    )
    seen = set()
    for seed in ("0", "1", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        seen.add(out.stdout.strip())
    assert seen == {block_hashes(list(range(64)), 16, model_name="m", cache_salt="t")[-1].hex()}


def test_bad_tokens_are_clear_errors() -> None:
    h = BlockHasher(2)
    with pytest.raises(ValueError, match="token ids"):
        h.hashes([1, -1])
    with pytest.raises(ValueError, match="token ids"):
        h.hashes([1, 2**32])
    with pytest.raises(ValueError, match="16-byte"):
        h.hashes([1, 2], parent=b"short")
    with pytest.raises(ValueError, match="at least 1"):
        BlockHasher(0)


def test_store_key_hash_offers_exactly_the_hashers_algorithms() -> None:
    field = StoreConfig.model_fields["key_hash"]
    assert get_args(field.annotation) == HASH_ALGORITHMS and field.default == "xxh3-128"
    loaded = load_config(flags={"store.key_hash": "blake2b-128"}, environ={})
    assert loaded.config.store.key_hash == "blake2b-128"
    with pytest.raises(ConfigError, match=r"store\.key_hash = 'sha1'"):
        load_config(flags={"store.key_hash": "sha1"}, environ={})
