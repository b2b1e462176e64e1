"""Chained block hashes over token ids: the keys of the KV-cache store.

Block ``i`` of a token sequence gets ``h_i = H(root || h_{i-1} || tokens[i*T:(i+1)*T])`` where
``T`` is ``tokens_per_block``, ``root`` is the salt digest and ``h_{-1} = root``. Chaining makes
a block's hash depend on the whole prefix before it, so equal hashes mean equal prefixes (up to
a collision of ``H``). The salt folds in the model name, dtype, KV layout, ``tokens_per_block``
and an optional tenant namespace (``cache_salt``), and it enters *every* link, not only the
first: a chain continued from a parent hash (``hashes(..., parent=)``) handed over by anyone
still lands in this hasher's salt, so tenants, models and layouts never share a block.

Token ids are packed as little-endian uint32, so the hashes are the same in every process,
every Python run and every machine (no builtin ``hash()``, PYTHONHASHSEED does not matter).
A trailing partial block is never hashed: it is not a key.

``H`` (``algorithm``, config ``store.key_hash``); keys are 16 bytes either way:

- ``xxh3-128`` (default): several times faster per byte than a cryptographic hash (see
  benchmarks/BENCHMARKS.md) and ample against accidental collisions (2^-128). It is **not**
  collision-resistant against a deliberate attacker: someone who chooses prompts can craft two
  token prefixes with equal keys, and so be served (or poison) the KV blocks of another
  prompt of the same salt; knowing another tenant's salt, of that tenant too.
- ``blake2b-128`` (``hashlib.blake2b``, 16-byte digest): cryptographic; crafting a collision
  is infeasible. For multi-tenant deployments whose tenants must not be able to reach each
  other's blocks. Keys of the two algorithms never meet (different roots).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence

import xxhash

from kvferry.index.keys import KEY_BYTES

__all__ = ["HASH_ALGORITHMS", "BlockHasher", "block_hashes"]

_MAX_TOKEN = 0xFFFFFFFF


def _blake2b_128(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=KEY_BYTES).digest()


_DIGESTS: dict[str, Callable[[bytes], bytes]] = {
    "xxh3-128": xxhash.xxh3_128_digest,
    "blake2b-128": _blake2b_128,
}
HASH_ALGORITHMS = tuple(_DIGESTS)
"""The names ``algorithm`` (and ``store.key_hash``) accept; each gives 16-byte keys."""


class BlockHasher:
    """Computes the chained block hashes of token sequences for one model/tenant.

    Args:
        tokens_per_block: tokens in one KV block (vLLM's block_size; 16 by default).
        model_name: the model the KV bytes belong to.
        dtype: KV dtype ("bfloat16", "float16", "fp8", ...).
        layout: KV layout tag ("layer-first", "block-first", ...): different byte layouts of
            the same tokens must not share blocks.
        cache_salt: tenant/namespace; blocks of different salts are disjoint.
        algorithm: the hash, one of :data:`HASH_ALGORITHMS` (see the module docstring).

    Raises:
        ValueError: ``tokens_per_block`` is not positive, or an unknown ``algorithm``.
    """

    __slots__ = ("_digest", "algorithm", "root", "tokens_per_block")

    def __init__(
        self,
        tokens_per_block: int = 16,
        *,
        model_name: str = "",
        dtype: str = "",
        layout: str = "",
        cache_salt: str = "",
        algorithm: str = "xxh3-128",
    ) -> None:
        if tokens_per_block < 1:
            raise ValueError(f"tokens_per_block must be at least 1, got {tokens_per_block}")
        digest = _DIGESTS.get(algorithm)
        if digest is None:
            raise ValueError(
                f"unknown block hash algorithm {algorithm!r}; use one of "
                f"{', '.join(HASH_ALGORITHMS)}"
            )
        self.tokens_per_block = tokens_per_block
        self.algorithm = algorithm
        self._digest = digest
        # Length-prefixed fields: ("ab", "c") and ("a", "bc") must give different salts.
        # v2: the root enters every link (v1 salted only the first block of a chain).
        parts = ["kvferry-v2", model_name, dtype, layout, str(tokens_per_block), cache_salt]
        salt = b"".join(len(p.encode()).to_bytes(4, "little") + p.encode() for p in parts)
        self.root = digest(salt)

    def hashes(self, token_ids: Sequence[int], *, parent: bytes | None = None) -> list[bytes]:
        """Hashes of every full block of ``token_ids``.

        Args:
            token_ids: the token ids (0 <= id < 2**32).
            parent: hash of the block before ``token_ids[0]`` when hashing a continuation;
                None starts from this hasher's salt.

        Raises:
            ValueError: a token id is negative or too large, or ``parent`` is not 16 bytes.
        """
        n_blocks = len(token_ids) // self.tokens_per_block
        if n_blocks == 0:
            return []
        if parent is not None and len(parent) != KEY_BYTES:
            raise ValueError(f"parent must be a {KEY_BYTES}-byte block hash, got {len(parent)}")
        usable = n_blocks * self.tokens_per_block
        try:
            packed = array("I", token_ids[:usable] if len(token_ids) != usable else token_ids)
        except (OverflowError, TypeError) as e:
            raise ValueError(f"token ids must be integers in [0, {_MAX_TOKEN}]: {e}") from None
        if packed.itemsize != 4:  # pragma: no cover - every CPython platform has a 4-byte 'I'
            packed = array("L", packed)
        data = memoryview(packed).cast("B")
        step = self.tokens_per_block * 4
        digest, root = self._digest, self.root
        prev = root if parent is None else parent
        out: list[bytes] = []
        append = out.append
        for start in range(0, usable * 4, step):
            prev = digest(root + prev + data[start : start + step].tobytes())
            append(prev)
        return out


def block_hashes(token_ids: Sequence[int], tokens_per_block: int = 16, **salt: str) -> list[bytes]:
    """One-shot form of :meth:`BlockHasher.hashes` (``salt``: model_name, dtype, layout,
    cache_salt, algorithm)."""
    return BlockHasher(tokens_per_block, **salt).hashes(token_ids)
