"""The shared tiers of a TieredStore (redis, server, mooncake): calls through circuit breakers,
made outside the store's lock, and the outbox of demotions on their way there.

Owns what a store needs to talk to tiers that other processes write too and that may hang or
fail: one :class:`~kvferry.store.breaker.CircuitBreaker` per shared tier, the turning of a
failure into a miss (or NO_SPACE) that is counted and logged, and the write-behind of demotions.
It holds no index and decides no placement: :class:`~kvferry.store.tiered.TieredStore` does,
and composes one of these (empty when the store has no shared tier).

Locking: the store's lock guards the counters and the outbox; every method here that calls a
tier is called *without* it and takes it only to count. An eviction that demotes into a shared
tier (under the lock) copies the victims' bytes into ``outbox`` with :meth:`SharedTiers.queue`;
the thread that queued makes the remote put with :meth:`SharedTiers.drain` after releasing the
lock. Until then the blocks are served from the outbox, so a hung remote tier never holds up a
local get. One drainer at a time (``drain_lock``); a delete takes it too, so that a block it
deletes from a shared tier cannot land there afterwards from a demotion in flight.

Failures: a :class:`~kvferry.errors.StorageError` from a shared tier counts an error and reads as
a miss (NO_SPACE for a put); after ``store.breaker_failures`` in a row the tier is skipped at
once (``breaker_skipped``) and one probe call per open interval finds out when it answers again.
A demotion that fails in flight loses its blocks (``dropped``); one the breaker refuses up front
leaves them where they are, as a full lower tier does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

from kvferry.backends.base import Buffer, Key, PutStatus, Tier
from kvferry.config.models import StoreConfig
from kvferry.errors import StorageError
from kvferry.store.breaker import BreakerState, CircuitBreaker
from kvferry.store.stats import TierCounters

__all__ = ["Promote", "SharedTiers"]

log = logging.getLogger("kvferry.store")

T = TypeVar("T")

Promote = Callable[[list[Key], list[Buffer], list[int] | None], None]
"""Copies blocks found in a shared tier into the first tier: keys, values, each block's depth in
its prefix chain (None: unknown). Called with the store's lock held."""

_Queued = tuple[int, int, bytes]
"""An outbox entry: (source tier, shared tier, the block's bytes)."""


class SharedTiers:
    """The shared tiers among a store's ``tiers`` (by index), behind their breakers.

    Args:
        tiers: all the store's tiers, fastest first; those with ``shared`` set are used.
        names: each tier's label (for logs).
        counters: each tier's traffic counters, updated under ``lock``.
        lock: the store's lock.
        cfg: the store's section (``breaker_*``).
        clock: monotonic seconds, for the breakers.
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        names: Sequence[str],
        counters: Sequence[TierCounters],
        lock: threading.RLock,
        cfg: StoreConfig,
        clock: Callable[[], float],
    ) -> None:
        self.tiers = list(tiers)
        self.names = list(names)
        self.indexes = [i for i, t in enumerate(self.tiers) if t.shared]
        """The shared tiers' positions in ``tiers``, fastest first."""
        self._counters = list(counters)
        self._lock = lock
        self.breakers = {
            i: CircuitBreaker(
                cfg.breaker_failures,
                cfg.breaker_open_seconds,
                cfg.breaker_max_open_seconds,
                clock=clock,
            )
            for i in self.indexes
        }
        self.outbox: dict[Key, _Queued] = {}
        """Demotions queued under the store's lock, put by :meth:`drain`: key -> entry."""
        self.drain_lock = threading.Lock()
        # .owes: this thread queued demotions, so it drains before its call returns (a thread
        # that queued nothing, a local get, never waits for a remote put)
        self._tls = threading.local()

    # -- one call ---------------------------------------------------------------------------
    def call(self, si: int, what: str, fn: Callable[[], T]) -> T | None:
        """``fn()`` into shared tier ``si`` through its circuit breaker; the caller does not
        hold the lock.

        Returns None when the breaker skipped the call or the tier failed (StorageError), both
        counted (``breaker_skipped``, ``errors``) and a failure logged; the caller reads None
        as a miss, or NO_SPACE. Any other exception (the caller's ValueError) propagates and
        says nothing about the tier.
        """
        breaker = self.breakers[si]
        c = self._counters[si]
        if not breaker.allow():
            with self._lock:
                c.breaker_skipped += 1
            return None
        try:
            out = fn()
        except StorageError as e:
            opened = breaker.failure()
            with self._lock:
                c.errors += 1
                if opened:
                    c.breaker_opens += 1
                    c.breaker_open = 1
            log.warning("store: %s %s failed: %s", what, self.names[si], e)
            if opened:
                log.warning(
                    "store: %s keeps failing; skipping it for %.1fs (circuit breaker open)",
                    self.names[si],
                    breaker.open_seconds,
                )
            return None
        except BaseException:
            breaker.cancel()
            raise
        if breaker.success():
            with self._lock:
                c.breaker_closes += 1
                c.breaker_open = 0
            log.warning("store: %s answers again; circuit breaker closed", self.names[si])
        return out

    def answering(self, si: int) -> bool:
        """Whether tier ``si`` is local, or shared with its breaker closed (a tier being skipped
        is not asked for its stats either: a server tier's is a call)."""
        breaker = self.breakers.get(si)
        return breaker is None or breaker.state is BreakerState.CLOSED

    # -- lookup -----------------------------------------------------------------------------
    def note_chain(self, keys: Sequence[Key], depth: int) -> None:
        """Tell each shared tier that ``keys`` are consecutive blocks of one prefix chain from
        ``depth`` (``Tier.note_chain``: a server tier places blocks by prefix chunk with it).
        No I/O; the caller may hold the lock."""
        for si in self.indexes:
            self.tiers[si].note_chain(keys, depth)

    def contains(self, si: int, keys: list[Key]) -> list[bool]:
        """Ask shared tier ``si`` (blocks on their way there count); a failure or an open
        breaker reads as absent."""
        got = self.call(si, "lookup in", partial(self.tiers[si].contains, keys))
        out = [False] * len(keys) if got is None else got
        if self.outbox:
            with self._lock:
                box = self.outbox
                out = [ok or (k in box and box[k][1] == si) for k, ok in zip(keys, out)]
        return out

    def fill(self, keys: Sequence[Key], found: list[bool], among: Sequence[int]) -> None:
        """Set ``found[i]`` for each block of ``keys`` not found yet that a shared tier of
        ``among`` holds; each tier is asked once, for the blocks not found before it."""
        for si in among:
            ask = [i for i, ok in enumerate(found) if not ok]
            if not ask:
                return
            for i, ok in zip(ask, self.contains(si, [keys[i] for i in ask])):
                found[i] = ok

    # -- put --------------------------------------------------------------------------------
    def put(self, ti: int, hashes: Sequence[Key], values: Sequence[Buffer]) -> list[PutStatus]:
        """Put into shared tier ``ti``; all NO_SPACE when it failed or was skipped."""
        c = self._counters[ti]
        t0 = time.perf_counter()
        got = self.call(ti, "put into", partial(self.tiers[ti].put, hashes, values))
        if got is None:
            return [PutStatus.NO_SPACE] * len(hashes)
        with self._lock:
            c.save_seconds += time.perf_counter() - t0
            for v, s in zip(values, got):
                if s is PutStatus.STORED:
                    c.blocks_in += 1
                    c.bytes_in += len(v)
                elif s is PutStatus.NO_SPACE:
                    c.no_space += 1
        return got

    # -- write-behind demotions ---------------------------------------------------------------
    def refuses(self, dst: int) -> bool:
        """Whether demotions into shared tier ``dst`` are refused up front (its breaker is open
        and not due for a probe), counted; caller holds the lock."""
        if self.breakers[dst].ready():
            return False
        self._counters[dst].breaker_skipped += 1
        return True

    def queue(self, src: int, dst: int, blocks: Sequence[tuple[Key, Buffer]]) -> None:
        """Queue demotions of ``blocks`` from local tier ``src`` into shared tier ``dst``; the
        calling thread drains them before its call returns. Caller holds the lock."""
        box = self.outbox
        for k, v in blocks:
            box[k] = (src, dst, bytes(v))  # a copy: the slot is reused once the caller returns
        self._tls.owes = True

    def drain(self, *, everything: bool = False) -> None:
        """Make the demotions queued in ``outbox``, when this thread queued some (or
        ``everything``); the caller does not hold the lock.

        Blocks stay in the outbox (and are served from it) until their put is over; a block
        the shared tier did not take is lost (``dropped``). The thread that queued waits for
        the put, as it would have under the lock, but no other thread waits with it.
        """
        if not (everything or getattr(self._tls, "owes", False)):
            return
        self._tls.owes = False
        with self.drain_lock:
            while True:
                with self._lock:
                    batch = list(self.outbox.items())
                if not batch:
                    return
                by_dst: dict[int, list[tuple[Key, _Queued]]] = {}
                for k, entry in batch:
                    by_dst.setdefault(entry[1], []).append((k, entry))
                for dst, items in by_dst.items():
                    got = self.put(dst, [k for k, _ in items], [e[2] for _, e in items])
                    with self._lock:
                        box = self.outbox
                        for (k, entry), st in zip(items, got):
                            if box.get(k) is entry:
                                del box[k]
                            c = self._counters[entry[0]]
                            if st is PutStatus.NO_SPACE:
                                c.dropped += 1
                            else:
                                c.demotions += 1

    # -- get --------------------------------------------------------------------------------
    def get(
        self,
        hashes: Sequence[Key],
        outs: Sequence[memoryview],
        res: list[int | None],
        missing: list[int],
        depth: int | None,
        promote: Promote | None,
    ) -> None:
        """Read the blocks ``missing`` (indexes into ``hashes``) from the outbox, then from
        each shared tier in turn, into ``outs``, setting their lengths in ``res``.

        ``promote``: called (under the lock) with what a shared tier below the first one
        answered, to copy it into the first tier; None: no promotion. ``depth``: the depth of
        ``hashes[0]`` in its prefix chain (None: unknown), passed on to ``promote``.
        """
        if self.outbox:
            missing = self._get_outbox(hashes, outs, res, missing)
        for si in self.indexes:
            if not missing:
                return
            tier = self.tiers[si]
            c = self._counters[si]
            t0 = time.perf_counter()
            call = partial(tier.get, [hashes[i] for i in missing], [outs[i] for i in missing])
            got = self.call(si, "get from", call)
            if got is None:
                continue
            found = [(i, n) for i, n in zip(missing, got) if n is not None]
            for i, n in found:
                res[i] = n
            with self._lock:
                c.load_seconds += time.perf_counter() - t0
                c.lookups += len(missing)
                c.hits += len(found)
                c.blocks_out += len(found)
                c.bytes_out += sum(n for _, n in found)
                if found and promote is not None and si:
                    promote(
                        [hashes[i] for i, _ in found],
                        [outs[i][:n] for i, n in found],
                        None if depth is None else [depth + i for i, _ in found],
                    )
            missing = [i for i in missing if res[i] is None]

    def _get_outbox(
        self,
        hashes: Sequence[Key],
        outs: Sequence[memoryview],
        res: list[int | None],
        missing: list[int],
    ) -> list[int]:
        """Copy the missing blocks that are on their way into a shared tier out of the outbox
        (hits of that tier); returns the indexes still missing."""
        left: list[int] = []
        with self._lock:
            box = self.outbox
            for i in missing:
                entry = box.get(hashes[i])
                if entry is None:
                    left.append(i)
                    continue
                data, out = entry[2], outs[i]
                if len(out) < len(data):
                    raise ValueError(
                        f"block {i} is {len(data)} bytes but its buffer holds {len(out)}"
                    )
                out[: len(data)] = data
                res[i] = len(data)
                c = self._counters[entry[1]]
                c.lookups += 1
                c.hits += 1
                c.blocks_out += 1
                c.bytes_out += len(data)
        return left

    # -- delete -----------------------------------------------------------------------------
    def unqueue(self, hashes: Sequence[Key]) -> None:
        """Drop queued demotions of ``hashes``; caller holds the lock."""
        if self.outbox:
            for k in hashes:
                self.outbox.pop(k, None)

    def delete(self, hashes: Sequence[Key]) -> None:
        """Delete ``hashes`` from every shared tier, after any demotion in flight has landed;
        the caller does not hold the lock."""
        if not self.indexes:
            return
        with self.drain_lock:
            for si in self.indexes:
                self.call(si, "delete from", partial(self.tiers[si].delete, hashes))
