"""The transfer engine: segments, batches, transports (local, shm, tcp) and the wire protocol."""

from kvferry.transfer.batch import (
    Batch,
    BatchStatus,
    OpCode,
    RequestStatus,
    TransferRequest,
    TransferState,
)
from kvferry.transfer.engine import TransferEngine
from kvferry.transfer.memory import DeviceRegion, MemoryRegion
from kvferry.transfer.segment import SegmentHandle

__all__ = [
    "Batch",
    "BatchStatus",
    "DeviceRegion",
    "MemoryRegion",
    "OpCode",
    "RequestStatus",
    "SegmentHandle",
    "TransferEngine",
    "TransferRequest",
    "TransferState",
]
