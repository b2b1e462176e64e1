"""Pins as leases with a deadline, and the handles of the two-phase API.

A pin protects a block from eviction while a caller moves its bytes. Every pin belongs to a
lease that ends at ``complete_*`` or at its deadline, whichever comes first, so a caller that
disappears can never pin a block forever (the leak that drives a cache's hit rate to zero).
The table is plain data under the store's lock; expiry is checked on every store call, so no
thread is needed.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Literal

from kvferry.backends.base import Key, PutStatus


@dataclass(eq=False)
class Lease:
    """Pins held by one two-phase operation."""

    lease_id: int
    kind: Literal["load", "store"]
    keys: list[Key]
    """Pinned blocks (load) or reserved, not yet published blocks (store)."""
    deadline: float
    active: bool = True


class LeaseTable:
    """Active leases and pin counts; not thread-safe (the store's lock guards it)."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.leases: dict[int, Lease] = {}
        self._heap: list[tuple[float, int]] = []
        self.pins: dict[Key, int] = {}
        self.expired = 0

    def open(self, kind: Literal["load", "store"], keys: list[Key], deadline: float) -> Lease:
        lease = Lease(next(self._ids), kind, keys, deadline)
        self.leases[lease.lease_id] = lease
        heapq.heappush(self._heap, (deadline, lease.lease_id))
        if kind == "load":
            pins = self.pins
            for k in keys:
                pins[k] = pins.get(k, 0) + 1
        return lease

    def close(self, lease: Lease) -> list[Key]:
        """End ``lease``; returns the load keys whose last pin just went."""
        lease.active = False
        self.leases.pop(lease.lease_id, None)
        released: list[Key] = []
        if lease.kind == "load":
            pins = self.pins
            for k in lease.keys:
                c = pins[k] - 1
                if c:
                    pins[k] = c
                else:
                    del pins[k]
                    released.append(k)
        return released

    def due(self, now: float) -> list[Lease]:
        """Leases whose deadline passed (still active); the caller closes them."""
        heap = self._heap
        out: list[Lease] = []
        while heap and heap[0][0] <= now:
            _, lease_id = heapq.heappop(heap)
            lease = self.leases.get(lease_id)
            if lease is not None and lease.active:
                out.append(lease)
        return out

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pinned(self, key: object) -> bool:
        return key in self.pins


@dataclass(eq=False)
class StoreHandle:
    """What ``prepare_store`` hands out: one writable buffer per block to fill, then
    ``complete_store``.

    ``status[i]`` is STORED where ``buffers[i]`` is a reserved slot to write, EXISTS where the
    block is already cached (nothing to write), NO_SPACE where no slot could be had.
    """

    hashes: list[Key]
    sizes: list[int]
    buffers: list[memoryview | None]
    status: list[PutStatus]
    locations: list[tuple[int, int] | None]
    """(offset, length) of each reserved slot inside the first tier's memory region, when it
    has one (a store server's peers write there directly)."""
    lease: Lease | None
    staged: bool = False
    """True when the first tier lends no views: buffers are staging copies put at complete."""
    completed: bool = field(default=False)
    started_ns: int = 0
    """``time.perf_counter_ns()`` at ``prepare_store``: the put's latency runs from there."""

    def done(self) -> bool:
        """The slots are ready to be written (prepare is synchronous)."""
        return True

    def pending(self) -> list[int]:
        """Indexes of the blocks the caller must write."""
        return [i for i, s in enumerate(self.status) if s is PutStatus.STORED]


@dataclass(eq=False)
class LoadHandle:
    """What ``prepare_load`` hands out: read-only views of the first ``n`` blocks, valid until
    ``complete_load`` or the lease deadline."""

    hashes: list[Key]
    buffers: list[memoryview]
    locations: list[tuple[int, int] | None]
    lease: Lease | None
    completed: bool = field(default=False)

    @property
    def n(self) -> int:
        """Blocks loaded: the leading blocks of ``hashes`` that were found."""
        return len(self.buffers)

    def done(self) -> bool:
        return True
