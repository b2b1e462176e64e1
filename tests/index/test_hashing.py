"""Chained block hashes: stable across processes, salted per model/tenant, no partial blocks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvferry.index.hashing import BlockHasher, block_hashes


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
