"""The plug-in point for transports of the transfer engine.

A ``Transport`` is created once per engine (constructor: its ``TransferConfig`` and the shared
``TransportContext``) and opens one ``Channel`` per target segment. The engine picks the transport
of a segment by locality (``reachable``), or the one the config forces.

Primitives and their contracts:

``Transport.reachable(peer) -> bool``
    Whether this transport can reach every region of ``peer`` from this process. Cheap; may probe
    (e.g. try to map shared memory) but never blocks on the network.

``Transport.open(peer) -> Channel``
    Connects to the target. May block up to ``connect_timeout``. Raises ``PeerClosed`` if the peer
    cannot be reached, ``SegmentError`` if its memory cannot be mapped, ``AuthError`` if the
    handshake is refused.

``Channel.post(items)``
    Starts moving ``items`` (already validated against the peer's regions). Called from any
    thread, concurrently. It may complete items synchronously (local, shm) or queue them and
    return at once (tcp). It never raises for a transfer failure: failures are recorded on the
    item's request (``RequestState.fail``) so the batch reports them.

``Channel.progress(batch, deadline)``
    Drives completions until ``batch`` is done or ``time.monotonic()`` passes ``deadline``.
    Called by the thread that waits on the batch (the caller drives I/O: no hand-off to a worker
    thread and back, which costs tens of microseconds per wake-up on small VMs). Several threads
    may call it at once; one leads and the others sleep until their batch is done or the lead is
    free. Synchronous channels complete everything in ``post`` and need not override it.

``Channel.close()``
    Fails whatever is still pending with ``PeerClosed`` and releases sockets/mappings. Idempotent.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from kvferry.observe.counters import TransportCounters
from kvferry.transfer.batch import OpCode, RequestState

if TYPE_CHECKING:
    from kvferry.config.models import ListenConfig, TransferConfig
    from kvferry.transfer.batch import Batch
    from kvferry.transfer.memory import DeviceRegion, MemoryRegion
    from kvferry.transfer.segment import PeerInfo


@dataclass(slots=True)
class WorkItem:
    """One validated request as a transport sees it; ``local`` is always host memory (the engine
    stages device buffers). Not frozen: a frozen dataclass's ``__init__`` sets each field
    through ``object.__setattr__``, which was a tenth of the initiator's time for 4 KiB
    transfers; transports treat it as read-only."""

    request: RequestState
    op: OpCode
    local: MemoryRegion
    local_offset: int
    region_id: int
    target_offset: int
    length: int


@dataclass(frozen=True)
class TransportContext:
    """What every transport of one engine shares."""

    instance: str
    boot_id: str
    pid: int
    listen: ListenConfig
    counters: dict[str, TransportCounters]
    local_regions: dict[int, MemoryRegion | DeviceRegion]


class Channel(ABC):
    """A connection (or mapping) to one target segment."""

    transport: ClassVar[str]

    def __init__(self, counters: TransportCounters) -> None:
        self.counters = counters

    single_below: int = 1 << 62
    """Requests shorter than this take one completion whatever their region (the engine skips
    ``slice_count`` for them)."""

    def slice_count(self, length: int, region_id: int | None = None) -> int:
        """How many completions a request of ``length`` bytes to the target's region
        ``region_id`` takes on this channel."""
        return 1

    @abstractmethod
    def post(self, items: Sequence[WorkItem]) -> None:
        """Start moving items; record failures on their requests."""

    def progress(self, batch: Batch, deadline: float) -> None:
        """Drive completions until the batch is done or the deadline passes."""
        remaining = deadline - time.monotonic()
        if remaining > 0:
            batch.wait_done(remaining)

    def poll(self) -> None:
        """Drive completions without blocking (``status`` calls it); synchronous channels: no-op."""

    @abstractmethod
    def close(self) -> None:
        """Fail pending work and release resources; idempotent."""

    def _completed(self, item: WorkItem, slices: int = 1) -> None:
        self.counters.add_request(
            read=item.op is OpCode.READ,
            nbytes=item.length,
            slices=slices,
            latency_ns=time.perf_counter_ns() - item.request.started_ns,
        )


class Transport(ABC):
    """Opens channels of one kind; one instance per engine."""

    name: ClassVar[str]

    def __init__(self, config: TransferConfig, ctx: TransportContext) -> None:
        self.config = config
        self.ctx = ctx

    @property
    def counters(self) -> TransportCounters:
        return self.ctx.counters[self.name]

    @abstractmethod
    def reachable(self, peer: PeerInfo) -> bool:
        """Whether every region of ``peer`` can be reached by this transport."""

    @abstractmethod
    def open(self, peer: PeerInfo) -> Channel:
        """Open a channel to ``peer``."""

    def close(self) -> None:
        """Release transport-wide resources; idempotent."""
