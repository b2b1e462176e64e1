"""Keys of the KV-cache store: what a key is (:mod:`.keys`) and the chained block hashes over
token ids that make them (:mod:`.hashing`). No I/O here.
"""

from kvferry.index.hashing import BlockHasher, block_hashes
from kvferry.index.keys import KEY_BYTES, Key

__all__ = ["KEY_BYTES", "BlockHasher", "Key", "block_hashes"]
