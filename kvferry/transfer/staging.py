"""Staging an initiator's device (GPU) memory through pinned host memory, a submit at a time.

The transports move host bytes only, so a request whose local buffer is a ``DeviceRegion`` goes
through a host buffer: a WRITE's bytes are copied out of the device before it is posted, a READ's
bytes are copied to the device after they arrived. A device copy has a fixed cost (about 12 us
for 4 KiB on an H200, as much as for 256 KiB), so a submit is staged as a whole:

- one pinned host buffer for all of its device requests, each request a span of it in order;
- requests that follow each other on the same device region, with the same op and adjacent
  device ranges, form a *run* (a batch of consecutive KV blocks is one run): a WRITE run is
  copied out with one device copy, a READ run lands with one device copy once its last request
  has arrived, and then its requests complete together (:class:`ReadRun`).

A READ request of a run completes only when its bytes are in device memory, as before; a member
that fails is left out of its run's copy (its device range keeps whatever it held).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvferry.errors import TransferError
from kvferry.transfer.batch import OpCode, RequestState, TransferState
from kvferry.transfer.memory import DeviceRegion, MemoryRegion

if TYPE_CHECKING:
    from kvferry.transfer.batch import TransferRequest


class Run:
    """Adjacent device ranges of one region and op, staged as one adjacent host span."""

    __slots__ = ("device", "device_offset", "host_offset", "length", "members", "op")

    def __init__(self, device: DeviceRegion, op: OpCode, device_offset: int, host_offset: int):
        self.device = device
        self.op = op
        self.device_offset = device_offset
        self.host_offset = host_offset
        self.length = 0
        self.members: list[tuple[int, int, int]] = []  # (request index, offset in run, length)


def plan(requests: Sequence[TransferRequest]) -> tuple[int, list[Run]]:
    """The runs of the device requests among ``requests`` and the host bytes they need.

    Each device request gets the next span of the host buffer, in order, so a run is adjacent
    on the host side too."""
    runs: list[Run] = []
    run: Run | None = None
    pos = 0
    for i, r in enumerate(requests):
        device = r.local
        if not isinstance(device, DeviceRegion):
            continue
        if (
            run is None
            or run.device is not device
            or run.op is not r.op
            or run.device_offset + run.length != r.local_offset
        ):
            run = Run(device, r.op, r.local_offset, pos)
            runs.append(run)
        run.members.append((i, run.length, r.length))
        run.length += r.length
        pos += r.length
    return pos, runs


def stage_buffer(runs: Sequence[Run], size: int) -> MemoryRegion:
    """A host buffer of ``size`` bytes for ``runs`` (pinned where any of them is on a GPU)."""
    pinned = next((r.device for r in runs if r.device.pinned), None)
    return (pinned or runs[0].device).stage(size)


def copy_out(runs: Sequence[Run], host: MemoryRegion) -> None:
    """Copy every WRITE run's device bytes into its span of ``host`` (one copy per run)."""
    array = host.array
    for run in runs:
        if run.op is OpCode.WRITE:
            start = run.host_offset
            run.device.to_host(run.device_offset, array[start : start + run.length])


class ReadRun:
    """The READ requests of one run: when the last has arrived (or failed), one device copy
    lands the bytes of those that arrived, and they complete together.

    Its members' ``on_complete`` defers (returns False) and their ``on_fail`` counts them out,
    so the run knows when nothing more can arrive."""

    __slots__ = ("_lock", "_waiting", "host", "members", "run")

    def __init__(self, run: Run, host: MemoryRegion, states: Sequence[RequestState]) -> None:
        self.run = run
        self.host = host
        self.members = [(states[i], offset, length) for i, offset, length in run.members]
        self._lock = threading.Lock()
        self._waiting = {id(state) for state, _, _ in self.members}
        for state, _, _ in self.members:
            hook = _Arrived(self, state)
            state.on_complete = hook
            state.on_fail = hook

    def settle(self, state: RequestState) -> None:
        """``state`` arrived or failed; the last one to do so lands the run."""
        with self._lock:
            if id(state) not in self._waiting:
                return  # counted already (arrived, then failed)
            self._waiting.discard(id(state))
            if self._waiting:
                return
        self._land()

    def _land(self) -> None:
        arrived = [(s, o, n) for s, o, n in self.members if s.state is TransferState.PENDING]
        self.members = []
        for state, _, _ in arrived:
            state.on_fail = None  # failing it below must not come back here
        try:
            self._copy([(o, n) for _, o, n in arrived])
        except Exception as e:  # CUDA errors come as RuntimeError (or torch's own)
            error = TransferError(f"copying the received bytes to device memory: {e}")
            for state, _, _ in arrived:
                state.fail(error)
            return
        for state, _, _ in arrived:
            state.complete_deferred()

    def _copy(self, spans: list[tuple[int, int]]) -> None:
        """One device copy per stretch of adjacent spans (the whole run when all arrived)."""
        run, array = self.run, self.host.array
        i = 0
        while i < len(spans):
            start, end = spans[i][0], spans[i][0] + spans[i][1]
            i += 1
            while i < len(spans) and spans[i][0] == end:
                end += spans[i][1]
                i += 1
            at = run.host_offset + start
            run.device.from_host(run.device_offset + start, array[at : at + end - start])


class _Arrived:
    """A member's hook: tell the run, and defer the completion to it (a plain callable object,
    so a member's hooks hold the run and nothing else)."""

    __slots__ = ("run", "state")

    def __init__(self, run: ReadRun, state: RequestState) -> None:
        self.run = run
        self.state = state

    def __call__(self) -> bool:
        self.run.settle(self.state)
        return False  # as on_complete: the run completes the request after its copy
