"""The transport conformance kit: checks every transport of the transfer engine must pass.

A transport's tests open a segment with the transport under test and call::

    check_transport(initiator, handle, local_region, target_capacity)

which runs every check below against the real target behind ``handle``. Each check moves real
bytes and compares every one of them; a failure raises ``AssertionError`` naming the check, the
request and the first differing offset. The checks overwrite the target region (within
``target_capacity`` bytes) and the local region freely.

Checks:

``check_roundtrip``
    WRITE a random pattern over the target, zero the local buffer, READ it back, compare; the
    transport's byte and request counters grow by exactly what moved.
``check_slicing_sizes``
    One batch of requests whose sizes straddle the slicing rules (1 byte, slice_size-1,
    slice_size+1, 3*slice_size plus a tail merged into the last slice, 1 MiB), at unaligned
    offsets, written then read back.
``check_concurrent_batches``
    Four threads, each with two batches in flight at once over disjoint ranges.
``check_out_of_bounds``
    Bad requests (outside the target or local range, empty, unknown region, over the batch's
    capacity) raise SegmentError at submit, and nothing of that submit moves a byte.
``check_request_status``
    One status per request in submission order (across several submits into one batch), each
    COMPLETED with its byte count and no error.

This module owns the checks only; launching a target process lives in ``kvferry.testing.target``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvferry.errors import SegmentError
from kvferry.transfer.batch import OpCode, TransferRequest, TransferState
from kvferry.transfer.engine import TransferEngine
from kvferry.transfer.memory import MemoryRegion
from kvferry.transfer.segment import SegmentHandle

MIN_LOCAL_BYTES = 4 << 20
MIN_TARGET_BYTES = 2 << 20
WAIT_S = 60.0
"""Generous bound on one batch: a hang fails the check instead of the whole test session."""


def _random(seed: int, size: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def _first_difference(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> int:
    return int(np.flatnonzero(got != want)[0])


@dataclass
class TransportKit:
    """The conformance checks, bound to one opened segment.

    Args:
        initiator: the engine that opened ``handle`` and owns ``local``.
        handle: the segment under test, opened with the transport under test.
        local: a region registered with (or allocated by) ``initiator``, at least 4 MiB.
        target_capacity: bytes of the target region the checks may overwrite (at least 2 MiB).
        target_region: id of the target region to use (None: the segment's first region).
        seed: seeds the random payloads.
    """

    initiator: TransferEngine
    handle: SegmentHandle
    local: MemoryRegion
    target_capacity: int
    target_region: int | None = None
    seed: int = 0
    _region_size: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.local.size < MIN_LOCAL_BYTES:
            raise ValueError(f"the kit needs a local region of >= {MIN_LOCAL_BYTES} bytes")
        if self.target_capacity < MIN_TARGET_BYTES:
            raise ValueError(f"the kit needs >= {MIN_TARGET_BYTES} bytes of target capacity")
        self._region_size = self.handle.peer.region(self.target_region).size
        if self.target_capacity > self._region_size:
            raise ValueError(
                f"target_capacity {self.target_capacity} exceeds the region's "
                f"{self._region_size} bytes"
            )

    # -- helpers ----------------------------------------------------------------------------
    @property
    def slice_size(self) -> int:
        return int(self.initiator.config.transfer.slice_size)

    @property
    def fragment_limit(self) -> int:
        return int(self.initiator.config.transfer.fragment_limit)

    def _req(self, op: OpCode, local_offset: int, target_offset: int, n: int) -> TransferRequest:
        return TransferRequest(
            op, self.local, local_offset, self.handle, target_offset, n, self.target_region
        )

    def _run(self, requests: list[TransferRequest], what: str) -> None:
        batch = self.initiator.allocate_batch(len(requests))
        self.initiator.submit(batch, requests)
        status = self.initiator.wait(batch, timeout=WAIT_S)
        assert status.state is TransferState.COMPLETED, (
            f"{what}: batch ended {status.state.name} over {self.handle.transport}: "
            f"{status.errors[:3]}"
        )
        self.initiator.free_batch(batch)

    def _counters(self) -> dict[str, Any]:
        return dict(self.initiator.metrics().get(self.handle.transport, {}))

    def _compare(self, start: int, want: np.ndarray[Any, Any], what: str) -> None:
        got = self.local.array[start : start + want.size]
        if not np.array_equal(got, want):
            at = _first_difference(got, want)
            raise AssertionError(
                f"{what}: byte {at} differs over {self.handle.transport} "
                f"(got {int(got[at])}, want {int(want[at])})"
            )

    # -- checks -----------------------------------------------------------------------------
    def check_roundtrip(self) -> None:
        """WRITE a pattern over the target range, READ it back, compare every byte."""
        n = min(self.local.size, self.target_capacity)
        chunk = 1 << 20
        spans = [(o, min(chunk, n - o)) for o in range(0, n, chunk)]
        data = _random(self.seed + 1, n)
        before = self._counters()
        self.local.array[:n] = data
        self._run([self._req(OpCode.WRITE, o, o, k) for o, k in spans], "roundtrip write")
        self.local.array[:n] = 0
        self._run([self._req(OpCode.READ, o, o, k) for o, k in spans], "roundtrip read")
        self._compare(0, data, "roundtrip")
        after = self._counters()
        for key, want in (
            ("bytes_written", n),
            ("bytes_read", n),
            ("requests", 2 * len(spans)),
        ):
            grew = int(after.get(key, 0)) - int(before.get(key, 0))
            assert grew == want, f"roundtrip: counter {key} grew by {grew}, expected {want}"
        rid = self.handle.peer.region(self.target_region).region_id
        slices = sum(self.handle.channel.slice_count(k, rid) for _, k in spans)
        grew = int(after.get("slices", 0)) - int(before.get("slices", 0))
        assert grew == 2 * slices, (
            f"roundtrip: counter slices grew by {grew}, expected {2 * slices}"
        )

    def slicing_sizes(self) -> list[int]:
        """Request sizes that straddle the slicing rules of the initiator's config."""
        s, limit = self.slice_size, self.fragment_limit
        merged_tail = max(1, limit - 1)  # joins the last full slice when limit > 1
        sizes = [1, s - 1, s, s + 1, 3 * s + merged_tail, 2 * s + limit, 1 << 20]
        return sorted(set(sizes))

    def check_slicing_sizes(self) -> None:
        """One batch of awkward sizes at unaligned offsets, written then read back."""
        sizes = self.slicing_sizes()
        offsets, cursor = [], 3  # odd offsets: nothing below may assume alignment
        for n in sizes:
            offsets.append(cursor)
            cursor += n + 7
        total = cursor
        assert total <= self.target_capacity and 2 * total <= self.local.size, (
            f"slicing check needs {total} bytes of target and {2 * total} of local memory"
        )
        data = _random(self.seed + 2, total)
        self.local.array[:total] = data
        self._run(
            [self._req(OpCode.WRITE, o, o, n) for o, n in zip(offsets, sizes)], "slicing write"
        )
        base = total  # read into the second half so stale bytes cannot pass for read ones
        self.local.array[base : base + total] = 0
        self._run(
            [self._req(OpCode.READ, base + o, o, n) for o, n in zip(offsets, sizes)],
            "slicing read",
        )
        for o, n in zip(offsets, sizes):
            self._compare(base + o, data[o : o + n], f"slicing: request of {n} bytes")

    def check_concurrent_batches(self, threads: int = 4, batches_per_thread: int = 2) -> None:
        """Several threads, each with several batches in flight, over disjoint ranges."""
        per_thread_target = self.target_capacity // threads
        per_thread_local = self.local.size // threads // 2
        span = min(per_thread_target, per_thread_local) // batches_per_thread
        span -= span % 4096
        assert span >= 4096, "not enough memory for the concurrency check"
        request = max(1, span // 8)
        barrier = threading.Barrier(threads)
        errors: list[BaseException] = []

        def worker(t: int) -> None:
            try:
                rng_data = _random(self.seed + 100 + t, span * batches_per_thread)
                l_base = t * 2 * span * batches_per_thread
                t_base = t * span * batches_per_thread
                n = span * batches_per_thread
                self.local.array[l_base : l_base + n] = rng_data
                barrier.wait(timeout=WAIT_S)
                for op, l_off in ((OpCode.WRITE, l_base), (OpCode.READ, l_base + n)):
                    batches = []
                    for b in range(batches_per_thread):
                        batch = self.initiator.allocate_batch(span // request + 1)
                        reqs = [
                            self._req(op, l_off + b * span + o, t_base + b * span + o, request)
                            for o in range(0, span - request + 1, request)
                        ]
                        self.initiator.submit(batch, reqs)
                        batches.append(batch)
                    for batch in batches:  # every batch of this thread was in flight at once
                        status = self.initiator.wait(batch, timeout=WAIT_S)
                        assert status.state is TransferState.COMPLETED, (
                            f"thread {t}: {op.name} batch ended {status.state.name}: "
                            f"{status.errors[:3]}"
                        )
                covered = (span // request) * request
                for b in range(batches_per_thread):
                    got = self.local.array[l_base + n + b * span :][:covered]
                    want = rng_data[b * span :][:covered]
                    assert np.array_equal(got, want), (
                        f"thread {t} batch {b}: byte {_first_difference(got, want)} differs"
                    )
            except BaseException as e:
                errors.append(e)
                barrier.abort()

        pool = [threading.Thread(target=worker, args=(t,), name=f"kit-{t}") for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join(timeout=2 * WAIT_S)
        assert not any(th.is_alive() for th in pool), "concurrent batches: a thread hung"
        if errors:
            first = next(
                (e for e in errors if not isinstance(e, threading.BrokenBarrierError)),
                errors[0],
            )
            raise AssertionError(f"concurrent batches over {self.handle.transport}: {first}")

    def check_out_of_bounds(self) -> None:
        """Invalid requests raise SegmentError at submit and nothing of that submit moves."""
        cap = self._region_size
        sentinel = _random(self.seed + 3, 4096)
        self.local.array[:4096] = sentinel
        self._run([self._req(OpCode.WRITE, 0, 0, 4096)], "out-of-bounds setup")
        self.local.array[:4096] = 0xA5  # what a wrongly started WRITE would store
        good = self._req(OpCode.WRITE, 0, 0, 4096)
        bad = [
            self._req(OpCode.WRITE, 0, cap - 10, 20),
            self._req(OpCode.READ, 0, cap, 1),
            self._req(OpCode.READ, 0, -1, 2),
            self._req(OpCode.WRITE, self.local.size - 1, 0, 2),
            self._req(OpCode.WRITE, -1, 0, 2),
            self._req(OpCode.WRITE, 0, 0, 0),
            TransferRequest(
                OpCode.WRITE,
                self.local,
                0,
                self.handle,
                0,
                16,
                max(r.region_id for r in self.handle.regions) + 1000,
            ),
        ]
        for request in bad:
            batch = self.initiator.allocate_batch(4)
            try:
                self.initiator.submit(batch, [good, request])
            except SegmentError:
                pass
            else:
                raise AssertionError(f"submit accepted an invalid request: {request}")
            assert not batch.requests, "a refused submit left requests in the batch"
            assert self.initiator.wait(batch, timeout=1).state is TransferState.COMPLETED
        full = self.initiator.allocate_batch(1)
        try:
            self.initiator.submit(full, [good, good])
        except SegmentError:
            pass
        else:
            raise AssertionError("submit accepted more requests than the batch's capacity")
        assert not full.requests
        self.local.array[4096 : 2 * 4096] = 0
        self._run([self._req(OpCode.READ, 4096, 0, 4096)], "out-of-bounds readback")
        self._compare(4096, sentinel, "out-of-bounds: a refused submit moved bytes")

    def check_request_status(self) -> None:
        """Per-request status in submission order, across two submits into one batch."""
        sizes = [1, 100, self.slice_size + 3, 5000, 2 * self.slice_size]
        batch = self.initiator.allocate_batch(len(sizes) + 1)
        offsets, cursor = [], 0
        for n in sizes:
            offsets.append(cursor)
            cursor += n
        first = [self._req(OpCode.WRITE, o, o, n) for o, n in zip(offsets[:2], sizes[:2])]
        rest = [self._req(OpCode.READ, o, o, n) for o, n in zip(offsets[2:], sizes[2:])]
        self.initiator.submit(batch, first)
        self.initiator.submit(batch, rest)
        status = self.initiator.wait(batch, timeout=WAIT_S)
        assert status.state is TransferState.COMPLETED, status.errors[:3]
        assert len(status.requests) == len(sizes), "one status per submitted request"
        for i, (n, r) in enumerate(zip(sizes, status.requests)):
            assert r.state is TransferState.COMPLETED, f"request {i}: {r}"
            assert r.transferred_bytes == n, f"request {i}: {r.transferred_bytes} of {n} bytes"
            assert r.error is None, f"request {i}: {r.error!r}"
        assert status.errors == []
        assert self.initiator.status(batch) == status, "status() disagrees with wait()"
        self.initiator.free_batch(batch)
        try:
            self.initiator.submit(batch, first[:1])
        except SegmentError:
            pass
        else:
            raise AssertionError("submit into a freed batch was accepted")

    def check_all(self) -> None:
        self.check_roundtrip()
        self.check_slicing_sizes()
        self.check_concurrent_batches()
        self.check_out_of_bounds()
        self.check_request_status()


def check_transport(
    initiator: TransferEngine,
    handle: SegmentHandle,
    local_region: MemoryRegion,
    target_capacity: int,
    *,
    target_region: int | None = None,
) -> None:
    """Run every conformance check against ``handle``; raise AssertionError on the first failure.

    Args:
        initiator: the engine that opened ``handle``.
        handle: the segment under test, opened with the transport under test.
        local_region: a region of ``initiator``, at least 4 MiB; overwritten.
        target_capacity: bytes of the target region the checks may overwrite (>= 2 MiB).
        target_region: the target region's id (None: the segment's first region).
    """
    TransportKit(initiator, handle, local_region, target_capacity, target_region).check_all()
