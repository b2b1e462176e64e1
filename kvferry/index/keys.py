"""What a key of the KV-cache store is: a block hash of :data:`KEY_BYTES` bytes.

The bottom of the tree: tiers, the store, the wire protocol and the hashing all take the key's
shape from here, so it is defined once and depends on nothing.
"""

from __future__ import annotations

__all__ = ["KEY_BYTES", "Key"]

Key = bytes
"""A block hash: :data:`KEY_BYTES` bytes from :mod:`kvferry.index.hashing`."""

KEY_BYTES = 16
