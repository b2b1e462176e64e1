"""Keys of the KV-cache store: chained block hashes over token ids (no I/O here)."""

from kvferry.index.hashing import BlockHasher, block_hashes

__all__ = ["BlockHasher", "block_hashes"]
