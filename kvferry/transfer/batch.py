"""Transfer requests, batches and their status (bookkeeping only, no I/O).

A batch is a fixed-capacity container of requests that complete independently; its overall state
is PENDING until every request is COMPLETED or FAILED. Completion may be signalled by any thread
(a transport's progress loop, a synchronous copy), so its counts are guarded by one lock and
waiters sleep on one event (the batch's ``_Tally``).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvferry.errors import KvferryError, SegmentError, TransferError

if TYPE_CHECKING:
    from kvferry.transfer.memory import DeviceRegion, MemoryRegion
    from kvferry.transfer.segment import SegmentHandle


class OpCode(enum.Enum):
    """Direction of a request, seen from the initiator."""

    READ = "read"  # target segment -> local buffer
    WRITE = "write"  # local buffer -> target segment


class TransferState(enum.Enum):
    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(slots=True)
class TransferRequest:
    """Move ``length`` bytes between ``local[local_offset:]`` and a target region.

    Not frozen, for speed: a frozen dataclass sets each of its 7 fields through
    ``object.__setattr__`` (2.2 us a request against 0.5 us here, a tenth of a 4 KiB transfer's
    whole cost). ``submit`` copies what it needs, so changing a request afterwards changes
    nothing already submitted.

    Attributes:
        op: READ (target -> local) or WRITE (local -> target).
        local: a region registered with (or allocated by) the initiating engine; device memory
            is staged through a pinned host buffer by the engine.
        local_offset: byte offset in ``local``.
        target: a handle from ``TransferEngine.open_segment``.
        target_offset: byte offset in the target region.
        length: bytes to move (> 0).
        target_region: id of the region within the target segment (default: its first region).
    """

    op: OpCode
    local: MemoryRegion | DeviceRegion
    local_offset: int
    target: SegmentHandle
    target_offset: int
    length: int
    target_region: int | None = None


@dataclass(frozen=True, slots=True)
class RequestStatus:
    state: TransferState
    transferred_bytes: int
    error: KvferryError | None = None


_Raw = tuple[TransferState, int, "KvferryError | None"]


class BatchStatus:
    """Overall state plus one status per submitted request, in submission order.

    Read-only. ``requests`` is built on first access from a snapshot taken with the state: most
    callers read only ``state``, and 128 RequestStatus objects cost more than a whole batch of
    small transfers' bookkeeping (155 us against ~20 us of plain tuples).
    """

    __slots__ = ("_raw", "_requests", "_state")

    def __init__(
        self,
        state: TransferState,
        requests: list[RequestStatus] | None = None,
        *,
        raw: list[_Raw] | None = None,
    ) -> None:
        self._state = state
        self._requests = requests if requests is not None or raw is not None else []
        self._raw = raw

    @property
    def state(self) -> TransferState:
        return self._state

    @property
    def requests(self) -> list[RequestStatus]:
        if self._requests is None:
            self._requests = [RequestStatus(s, n, e) for s, n, e in self._raw or ()]
            self._raw = None
        return self._requests

    @property
    def errors(self) -> list[KvferryError]:
        return [r.error for r in self.requests if r.error is not None]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BatchStatus):
            return NotImplemented
        return self._state is other._state and self.requests == other.requests

    __hash__ = None  # type: ignore[assignment]  # holds a list, like the dataclass it was

    def __repr__(self) -> str:
        return f"BatchStatus(state={self._state!r}, requests={self.requests!r})"


class RequestState:
    """Mutable progress of one request; slices count down ``remaining``.

    ``on_complete`` (None for host memory) runs after the last slice and before the request is
    COMPLETED: a READ into device memory copies its staged bytes there. If it raises, the
    request FAILS instead; if it returns False, it took over: the request stays PENDING until
    :meth:`complete_deferred` (a staged run lands several requests with one device copy, when
    the last of them has arrived). ``on_fail`` (None unless set) runs once if the request fails.
    """

    __slots__ = (
        "done_bytes",
        "error",
        "index",
        "length",
        "on_complete",
        "on_fail",
        "remaining",
        "slices",
        "started_ns",
        "state",
        "tally",
    )

    def __init__(
        self, tally: _Tally, index: int, length: int, slices: int, started_ns: int
    ) -> None:
        self.tally = tally  # its batch's counts (not the batch: see _Tally)
        self.index = index
        self.length = length
        self.remaining = slices
        self.slices = slices
        self.done_bytes = 0
        self.error: KvferryError | None = None
        self.state = TransferState.PENDING
        self.started_ns = started_ns
        self.on_complete: Callable[[], bool | None] | None = None
        self.on_fail: Callable[[], object] | None = None

    def slice_done(self, nbytes: int) -> bool:
        """One slice of this request arrived; True when that completed the request."""
        tally = self.tally
        with tally.lock:
            if self.state is not TransferState.PENDING:
                return False
            self.done_bytes += nbytes
            self.remaining -= 1
            if self.remaining:
                return False
            hook = self.on_complete
            if hook is None:
                self.state = TransferState.COMPLETED
                tally.finish_one()
                return True
        return self._complete_staged(hook)

    def _complete_staged(self, hook: Callable[[], bool | None]) -> bool:
        """Run the completion hook; True when the request's bytes all arrived (completed now,
        or deferred to the hook's owner), False when the hook failed it."""
        # Outside the batch lock: the hook is a device copy, and other requests of the batch
        # keep completing meanwhile.
        self.on_complete = None  # the hook holds the staging buffer: let it go now, not when
        # the batch is
        try:
            now = hook()
        except Exception as e:  # a CUDA error must fail the request, not kill the I/O thread
            self.fail(TransferError(f"copying the received bytes to device memory: {e}"))
            return False  # failed, not completed
        if now is False:
            return True  # arrived; the hook's owner completes it after its copy
        return self.complete_deferred()

    def complete_deferred(self) -> bool:
        """Mark COMPLETED a request whose bytes are where they belong (a deferred completion);
        True when this call completed it (False: it had already failed)."""
        tally = self.tally
        with tally.lock:
            if self.state is not TransferState.PENDING:
                return False
            self.state = TransferState.COMPLETED
            self.on_fail = None
            tally.finish_one()
            return True

    def fail(self, error: KvferryError) -> bool:
        """The request failed (first error wins); True when this call failed it."""
        tally = self.tally
        with tally.lock:
            if self.state is not TransferState.PENDING:
                return False
            self.error = error
            self.state = TransferState.FAILED
            self.on_complete = None
            hook, self.on_fail = self.on_fail, None
            tally.failed += 1
            tally.finish_one()
        if hook is not None:
            hook()
        return True

    @property
    def pending(self) -> bool:
        return self.state is TransferState.PENDING


def finish_slices(done: list[tuple[RequestState, int]]) -> list[int]:
    """Record finished slices ``(request, bytes)`` of any batches; return the positions in
    ``done`` of the slices that completed their request. Exactly ``slice_done`` per slice, but
    one lock round per run of slices of the same batch instead of one per slice (the tcp
    transport's hot path: a burst of replies is usually one batch's)."""
    completed: list[int] = []
    staged: list[tuple[int, Callable[[], bool | None]]] = []
    pending, done_state = TransferState.PENDING, TransferState.COMPLETED
    i, n = 0, len(done)
    while i < n:
        tally = done[i][0].tally
        with tally.lock:
            finished = 0
            while i < n:
                request, nbytes = done[i]
                if request.tally is not tally:
                    break
                i += 1
                if request.state is not pending:
                    continue
                request.done_bytes += nbytes
                request.remaining -= 1
                if request.remaining:
                    continue
                if request.on_complete is not None:
                    staged.append((i - 1, request.on_complete))
                    continue
                request.state = done_state
                finished += 1
                completed.append(i - 1)
            if finished:
                tally.unfinished -= finished
                if tally.unfinished == 0 and tally.event is not None:
                    tally.event.set()
    for at, hook in staged:
        if done[at][0]._complete_staged(hook):
            completed.append(at)
    return completed


class _Tally:
    """A batch's counts, shared by the batch and its requests, guarded by its lock.

    Requests refer to this, not to their batch: with a back reference each batch would be a
    reference cycle with its requests, left for the cyclic collector instead of freed when its
    owner drops it. On a stream of lone 4 KiB transfers that was a collection every ~200
    batches, and half of the round trip's p99.
    """

    __slots__ = ("event", "failed", "lock", "unfinished")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.unfinished = 0
        self.failed = 0
        # Created only when a thread has to sleep on the batch: most small batches finish while
        # their caller drives them, and an Event costs more than the transfer bookkeeping.
        self.event: threading.Event | None = None

    def finish_one(self) -> None:
        # caller holds self.lock
        self.unfinished -= 1
        if self.unfinished == 0 and self.event is not None:
            self.event.set()


class Batch:
    """Up to ``capacity`` requests submitted together (one or several ``submit`` calls)."""

    def __init__(self, batch_id: int, capacity: int) -> None:
        if capacity <= 0:
            raise SegmentError(f"batch capacity must be positive, got {capacity}")
        self.batch_id = batch_id
        self.capacity = capacity
        self.requests: list[RequestState] = []
        self._tally = _Tally()
        self.freed = False

    def _add_many(self, shapes: list[tuple[int, int]]) -> list[RequestState]:
        """Add requests given as (length, slices); one lock round and one timestamp for all."""
        now = time.perf_counter_ns()
        tally = self._tally
        with tally.lock:
            base = len(self.requests)
            states = [
                RequestState(tally, base + i, length, slices, now)
                for i, (length, slices) in enumerate(shapes)
            ]
            self.requests.extend(states)
            tally.unfinished += len(states)
            if tally.event is not None and states:
                tally.event.clear()
            return states

    def _add_one(self, length: int, slices: int) -> RequestState:
        """``_add_many`` of one request."""
        tally = self._tally
        state = RequestState(tally, 0, length, slices, time.perf_counter_ns())
        with tally.lock:
            state.index = len(self.requests)
            self.requests.append(state)
            tally.unfinished += 1
            if tally.event is not None:
                tally.event.clear()
        return state

    def is_done(self) -> bool:
        """True when every submitted request completed or failed (an empty batch is done)."""
        return self._tally.unfinished == 0

    def wait_done(self, timeout: float) -> bool:
        """Sleep until the batch is done or ``timeout`` seconds pass; True if done."""
        tally = self._tally
        with tally.lock:
            if tally.unfinished == 0:
                return True
            if tally.event is None:
                tally.event = threading.Event()
            event = tally.event
        return event.wait(timeout)

    def status(self) -> BatchStatus:
        tally = self._tally
        with tally.lock:
            raw = [(r.state, r.done_bytes, r.error) for r in self.requests]
            unfinished, failed = tally.unfinished, tally.failed
        if unfinished:
            overall = TransferState.PENDING
        elif failed:
            overall = TransferState.FAILED
        else:
            overall = TransferState.COMPLETED
        return BatchStatus(overall, raw=raw)

    def __repr__(self) -> str:
        return f"Batch(id={self.batch_id}, requests={len(self.requests)}/{self.capacity})"
