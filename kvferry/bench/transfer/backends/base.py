"""The plug-in point for engines under the transfer benchmark (``kvferry bench transfer``).

Constructor shape, the same for every backend: ``(transport, seg_type, config)`` where ``config``
is kvferry's ``KvferryConfig`` (a backend takes from it what applies, e.g. the bind address).

One harness (``kvferry.bench.transfer.harness``) sweeps block size x batch size x threads, times
every
batch and computes every statistic with ``kvferry.bench.stats``; a backend only moves bytes. So
kvferry and a peer engine (Mooncake's Transfer Engine) are measured by the same code.

Primitives and their contracts:

``start_target(total_buffer_size) -> str``
    Target side. Allocates and registers ``total_buffer_size`` bytes, starts serving in the
    background and returns the segment name an initiator passes to ``connect``. Called once,
    from the main thread. Raises ``KvferryError`` (or ``MissingDependency``) on failure.

``connect(target_seg, local_buffer_size)``
    Initiator side. Allocates and registers a local buffer of ``local_buffer_size`` bytes and
    opens the target segment. Called once, from the main thread, before any ``run_batch``.

``local_buffer() -> memoryview``
    The initiator's registered local buffer as a writable byte view. Valid until ``close``.
    A backend whose local buffer is not host memory (``--seg-type VRAM``) raises and overrides
    ``write_local`` and ``read_local`` instead.

``write_local(offset, data)`` / ``read_local(offset, n) -> ndarray``
    Put bytes into / copy bytes out of the local buffer (for ``--check-consistency``); the
    defaults go through ``local_buffer()``.

``target_capacity() -> int``
    Bytes of the target segment usable from offset 0.

``run_batch(op, local_offsets, target_offsets, block_size)``
    Moves ``len(local_offsets)`` blocks of ``block_size`` bytes in ONE batch (submit, then wait
    for the whole batch) and returns when every block completed. ``op`` is "read" (target ->
    local) or "write" (local -> target). Called concurrently from up to ``max_threads`` bench
    threads, each with disjoint offsets. Raises ``TransferError`` if any block failed.

``close()``
    Releases everything; safe to call twice.

Implementations live in sibling modules and are registered in ``registry.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

if TYPE_CHECKING:
    from kvferry.config.models import KvferryConfig

__all__ = ["Op", "TransferBenchBackend"]

Op = Literal["read", "write"]


class TransferBenchBackend(ABC):
    """One transfer engine driven by the tebench harness."""

    name: ClassVar[str]

    def __init__(
        self, transport: str = "auto", seg_type: str = "DRAM", config: KvferryConfig | None = None
    ) -> None:
        self.transport = transport
        self.seg_type = seg_type

    @abstractmethod
    def start_target(self, total_buffer_size: int) -> str:
        """Allocate, register and serve ``total_buffer_size`` bytes; return the segment name."""

    @abstractmethod
    def connect(self, target_seg: str, local_buffer_size: int) -> None:
        """Allocate the local buffer and open the target segment."""

    @abstractmethod
    def local_buffer(self) -> memoryview:
        """The initiator's local buffer as a writable byte view."""

    def write_local(self, offset: int, data: np.ndarray[Any, np.dtype[np.uint8]]) -> None:
        """Copy ``data`` into the local buffer at ``offset``."""
        np.frombuffer(self.local_buffer(), dtype=np.uint8)[offset : offset + data.size] = data

    def read_local(self, offset: int, n: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """A copy of ``n`` bytes of the local buffer at ``offset``."""
        return np.frombuffer(self.local_buffer(), dtype=np.uint8)[offset : offset + n].copy()

    @abstractmethod
    def target_capacity(self) -> int:
        """Usable bytes of the opened target segment."""

    @abstractmethod
    def run_batch(
        self, op: Op, local_offsets: list[int], target_offsets: list[int], block_size: int
    ) -> None:
        """Move one batch of blocks and wait for all of it; raise TransferError on failure."""

    def describe(self) -> dict[str, object]:
        """Facts about the engine for the JSON report (version, transport)."""
        return {"backend": self.name, "transport": self.transport}

    @abstractmethod
    def close(self) -> None:
        """Release everything; idempotent."""
