"""kvferry: a KV-cache store and transfer engine for LLM inference, with a benchmark lab.

The curated public API lives here (pinned by tests/test_public_api.py). Importing kvferry reads
no environment variable, starts no thread and imports no torch.
"""

from kvferry.backends import PutStatus
from kvferry.config import KvferryConfig, LoadedConfig, load_config
from kvferry.errors import (
    AuthError,
    ConfigError,
    KvferryError,
    LeaseExpired,
    MissingDependency,
    PeerClosed,
    ProtocolError,
    RemoteError,
    SegmentError,
    StorageError,
    TransferError,
    TransferTimeout,
)
from kvferry.index import BlockHasher
from kvferry.store import LoadHandle, StoreHandle, StoreStats, TieredStore
from kvferry.transfer import (
    Batch,
    BatchStatus,
    DeviceRegion,
    MemoryRegion,
    OpCode,
    RequestStatus,
    SegmentHandle,
    TransferEngine,
    TransferRequest,
    TransferState,
)
from kvferry.version import __version__

__all__ = [
    "AuthError",
    "Batch",
    "BatchStatus",
    "BlockHasher",
    "ConfigError",
    "DeviceRegion",
    "KvferryConfig",
    "KvferryError",
    "LeaseExpired",
    "LoadHandle",
    "LoadedConfig",
    "MemoryRegion",
    "MissingDependency",
    "OpCode",
    "PeerClosed",
    "ProtocolError",
    "PutStatus",
    "RemoteError",
    "RequestStatus",
    "SegmentError",
    "SegmentHandle",
    "StorageError",
    "StoreHandle",
    "StoreStats",
    "TieredStore",
    "TransferEngine",
    "TransferError",
    "TransferRequest",
    "TransferState",
    "TransferTimeout",
    "__version__",
    "load_config",
]
