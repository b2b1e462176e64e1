"""Chained block hashes over token ids: the keys of the KV-cache store.

Block ``i`` of a token sequence gets ``h_i = xxh3_128(h_{i-1} || tokens[i*T:(i+1)*T])`` where
``T`` is ``tokens_per_block`` and ``h_{-1}`` is the salt digest. Chaining makes a block's hash
depend on the whole prefix before it, so equal hashes mean equal prefixes (up to a 2^-128
collision). The salt folds in the model name, dtype, KV layout, ``tokens_per_block`` and an
optional tenant namespace (``cache_salt``): tenants, models and layouts never share a block.

Token ids are packed as little-endian uint32, so the hashes are the same in every process,
every Python run and every machine (no builtin ``hash()``, PYTHONHASHSEED does not matter).
A trailing partial block is never hashed: it is not a key.

xxh3-128 was chosen over blake3 (not a cryptographic need: a tenant cannot pick another
tenant's salt) because it is several times faster per byte; see benchmarks/BENCHMARKS.md.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

from kvferry.backends.base import KEY_BYTES

__all__ = ["BlockHasher", "block_hashes"]

_MAX_TOKEN = 0xFFFFFFFF


class BlockHasher:
    """Computes the chained block hashes of token sequences for one model/tenant.

    Args:
        tokens_per_block: tokens in one KV block (vLLM's block_size; 16 by default).
        model_name: the model the KV bytes belong to.
        dtype: KV dtype ("bfloat16", "float16", "fp8", ...).
        layout: KV layout tag ("layer-first", "block-first", ...): different byte layouts of
            the same tokens must not share blocks.
        cache_salt: tenant/namespace; blocks of different salts are disjoint.

    Raises:
        ValueError: ``tokens_per_block`` is not positive.
    """

    __slots__ = ("root", "tokens_per_block")

    def __init__(
        self,
        tokens_per_block: int = 16,
        *,
        model_name: str = "",
        dtype: str = "",
        layout: str = "",
        cache_salt: str = "",
    ) -> None:
        if tokens_per_block < 1:
            raise ValueError(f"tokens_per_block must be at least 1, got {tokens_per_block}")
        self.tokens_per_block = tokens_per_block
        # Length-prefixed fields: ("ab", "c") and ("a", "bc") must give different salts.
        parts = ["kvferry-v1", model_name, dtype, layout, str(tokens_per_block), cache_salt]
        salt = b"".join(len(p.encode()).to_bytes(4, "little") + p.encode() for p in parts)
        self.root = xxhash.xxh3_128_digest(salt)

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
        digest = xxhash.xxh3_128_digest
        prev = self.root if parent is None else parent
        out: list[bytes] = []
        append = out.append
        for start in range(0, usable * 4, step):
            prev = digest(prev + data[start : start + step].tobytes())
            append(prev)
        return out


def block_hashes(token_ids: Sequence[int], tokens_per_block: int = 16, **salt: str) -> list[bytes]:
    """One-shot form of :meth:`BlockHasher.hashes` (``salt``: model_name, dtype, layout,
    cache_salt)."""
    return BlockHasher(tokens_per_block, **salt).hashes(token_ids)
