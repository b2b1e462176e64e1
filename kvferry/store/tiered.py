"""TieredStore: the control plane of kvferry's KV-cache store.

Owns the public batch API (lookup, contains, put, get, the two-phase store and load, delete,
flush, verify, the async forms), pins and their leases, write-through and prefetch, and the
statistics of every call. It moves no bytes itself: tiers (``kvferry.backends``) do. It composes
two parts: :class:`~kvferry.store.placement.Placement` (the index of the local tiers, their
eviction policies, eviction at the high watermark, demotion and promotion) and
:class:`~kvferry.store.shared.SharedTiers` (the shared tiers behind their circuit breakers, and
the write-behind of demotions into them).

Tiers form a pipeline, fastest first (``store.tiers``). *Local* tiers (cpu, disk) are known
exactly: every block they hold is in the index (key -> bit mask of tiers), so ``lookup`` is
O(prefix length) dict probes and never scans a tier. *Shared* tiers (redis, server, mooncake)
are written by other processes too, so the store asks them for what its index does not have.

Concurrency: one lock guards the index, the policies, the leases and the calls into local tiers
(a cpu copy holds the GIL anyway). Calls into shared tiers (network) are never made under it, so
a hung remote tier never holds up the local tiers: :class:`~kvferry.store.shared.SharedTiers`
owns those calls, their circuit breakers and the write-behind of demotions into them (its
docstring has the details). Blocks handed out as views (``prepare_load``, ``prepare_store``) are
pinned or reserved, and eviction skips them, so a view never sees its slot reused.

Failures: a failed tier counts an error and reads as a miss (NO_SPACE for a put); the local
tiers keep serving when a shared one is down.

What the store does not do: it starts no exporter and writes no file of its own. Whoever runs a
store reads its statistics (:meth:`TieredStore.stats`), e.g. through
``kvferry.telemetry.prometheus.export_store``, and hands it what must close with it
(:meth:`TieredStore.attach`). Trace events go to the tracer it is given (``tracer``; by default
one opened from ``store.trace_file``).

Why one class of this length (past ~600 lines): it is the store's whole public API, and each
call reads and changes the index, the policies and the leases in one section under one lock;
the hot paths (put, get, the two-phase forms) read the index inline rather than through
another object, so that no per-block work crosses a class boundary. What could leave with its
own state (placement, the shared tiers) has left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, TypeVar

from kvferry.backends.base import Buffer, Key, PutStatus, SlotTier, Tier
from kvferry.backends.registry import check_tiers, create_tier
from kvferry.config.models import KvferryConfig, StoreConfig
from kvferry.errors import LeaseExpired, StorageError
from kvferry.observe.logs import RateLimitedLog
from kvferry.observe.trace import NullTracer, Tracer, open_tracer
from kvferry.store.eviction import EvictionPolicy, load_policy
from kvferry.store.leases import Lease, LeaseTable, LoadHandle, StoreHandle
from kvferry.store.placement import Placement, eviction_marks
from kvferry.store.shared import Promote, SharedTiers
from kvferry.store.stats import StoreStats, TierCounters

__all__ = ["Closeable", "TieredStore", "eviction_marks"]

log = logging.getLogger("kvferry.store")
_lease_log = RateLimitedLog(log)  # callers that vanish can expire leases by the thousand


T = TypeVar("T")


class Closeable(Protocol):
    """What :meth:`TieredStore.attach` takes: anything closed with the store (an exporter)."""

    def close(self) -> None: ...


_FLUSH_BATCH = 256
"""Blocks :meth:`TieredStore.flush` writes per step (the store's lock is let go between)."""


class TieredStore:
    """A pipeline of tiers behind one batch API.

    Args:
        config: the whole kvferry config; ``store`` and each tier's section are used.
        tiers: already built tiers, fastest first (overrides ``store.tiers``); the store closes
            them on ``close``.
        clock: monotonic seconds (a fake clock in tests of lease expiry and of the shared
            tiers' circuit breakers).
        tracer: where trace events go; the caller closes it. None: one opened from
            ``store.trace_file`` (off when empty), closed with the store.

    Raises:
        ConfigError: an unknown tier or policy name.
        StorageError: a tier cannot be opened.
    """

    def __init__(
        self,
        config: KvferryConfig | None = None,
        *,
        tiers: Sequence[Tier] | None = None,
        clock: Callable[[], float] = time.monotonic,
        tracer: Tracer | NullTracer | None = None,
    ) -> None:
        self.config = config or KvferryConfig()
        cfg: StoreConfig = self.config.store
        self._cfg = cfg
        self._clock = clock
        self._write_through_on = cfg.write_policy == "write_through"
        if tiers is None:
            check_tiers(cfg.tiers, self.config)  # every tier's limits before any allocation
            built: list[Tier] = []
            try:
                for name in cfg.tiers:
                    built.append(create_tier(name, self.config))
            except BaseException:
                for tier in built:
                    tier.close()
                raise
            tiers = built
        if not tiers:
            raise StorageError("a TieredStore needs at least one tier")
        self.tiers: list[Tier] = list(tiers)
        self.names = [t.label for t in self.tiers]
        policy_cls = load_policy(cfg.eviction_policy)
        self._policies: list[EvictionPolicy[Key]] = [policy_cls() for _ in self.tiers]
        self._shared = [i for i, t in enumerate(self.tiers) if t.shared]
        self._lock = threading.RLock()
        self._leases = LeaseTable()
        self._stats = StoreStats(tiers={name: TierCounters() for name in self.names})
        self._counters = [self._stats.tiers[name] for name in self.names]
        # Off by default: the null tracer's span() is one shared no-op object.
        self._own_tracer = tracer is None
        self.tracer = open_tracer(cfg.trace_file) if tracer is None else tracer
        self._shared_tiers = SharedTiers(
            self.tiers, self.names, self._counters, self._lock, cfg, clock
        )
        self._placement = Placement(
            self.tiers,
            self._policies,
            self._counters,
            self._leases,
            self._shared_tiers,
            cfg,
            self.tracer,
        )
        # The same objects under short names: the hot paths read them without an attribute
        # chain, and an empty outbox costs them one truth test.
        place = self._placement
        self._where = place.where
        self._doomed = place.doomed
        self._local = place.local
        self._local_mask = place.local_mask
        self._outbox = self._shared_tiers.outbox
        self._drain = self._shared_tiers.drain
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._attached: list[Closeable] = []
        try:
            place.rebuild()
        except BaseException:
            self.close()
            raise

    @property
    def slot_size(self) -> int:
        return int(self._cfg.slot_size)

    @property
    def first(self) -> Tier:
        return self.tiers[0]

    # -- lookup ---------------------------------------------------------------------------
    def lookup(self, hashes: Sequence[Key], *, tier: str | None = None) -> int:
        """Number of leading blocks of ``hashes`` present in some tier (or in ``tier``).

        O(len(prefix)) probes of the index; shared tiers are asked (one batched round trip
        each) only for the blocks after the locally known prefix.

        Raises:
            ValueError: ``tier`` is not one of this store's tiers.
        """
        t0 = time.perf_counter_ns()
        if tier is not None:
            if tier not in self.names:
                raise ValueError(f"unknown tier {tier!r}; this store has {self.names}")
            ti = self.names.index(tier)
            mask = 1 << ti
            shared = [ti] if self.tiers[ti].shared else []
        else:
            mask = self._local_mask
            shared = self._shared
        with self._lock:
            self._expire()
            where = self._where
            n = 0
            for k in hashes:
                if where.get(k, 0) & mask:
                    n += 1
                else:
                    break
            if not shared:
                self._count_lookup(len(hashes), n, t0)
        if shared:
            # A lookup is on a prompt's prefix: its first block is at depth 0.
            self._shared_tiers.note_chain(hashes, 0)
            if n < len(hashes):
                rest = list(hashes[n:])
                with self._lock:
                    where = self._where
                    found = [bool(where.get(k, 0) & mask) for k in rest]
                self._shared_tiers.fill(rest, found, shared)
                n += found.index(False) if False in found else len(found)
            with self._lock:
                self._count_lookup(len(hashes), n, t0)
        if self._cfg.prefetch_depth and n and tier is None:
            self._schedule_prefetch(list(hashes[: min(n, self._cfg.prefetch_depth)]))
        return n

    def _count_lookup(self, blocks: int, found: int, t0: int) -> None:
        """Lookup statistics; caller holds the lock."""
        st = self._stats
        st.lookups += 1
        st.lookup_blocks += blocks
        st.hit_blocks += found
        if blocks:
            st.request_hit_fraction_sum += found / blocks
        st.lookup_latency.observe_ns(time.perf_counter_ns() - t0)

    def _count_get(self, blocks: int, found: int, t0: int) -> None:
        """Get statistics; caller holds the lock."""
        st = self._stats
        st.gets += 1
        st.get_blocks += blocks
        st.get_hit_blocks += found
        st.get_latency.observe_ns(time.perf_counter_ns() - t0)

    def count_lookup(self, blocks: int, found: int, started_ns: int) -> None:
        """Count one lookup served by a front end through :meth:`contains` (which counts
        nothing itself): ``blocks`` asked about, ``found`` of them present, started at
        ``started_ns`` (``time.perf_counter_ns()``). The store server counts its CONTAINS so."""
        with self._lock:
            self._count_lookup(blocks, found, started_ns)

    def count_get(self, blocks: int, found: int, started_ns: int) -> None:
        """Count one load served by a front end through ``prepare_load`` and ``get`` called
        with ``count=False``: ``blocks`` asked for, ``found`` of them answered, started at
        ``started_ns`` (``time.perf_counter_ns()``). The store server counts GET and LOCATE so.
        """
        with self._lock:
            self._count_get(blocks, found, started_ns)

    def contains(self, hashes: Sequence[Key]) -> list[bool]:
        """Presence of each block in some tier (not only leading ones)."""
        with self._lock:
            where = self._where
            mask = self._local_mask
            out = [bool(where.get(k, 0) & mask) for k in hashes]
        self._shared_tiers.fill(hashes, out, self._shared)
        return out

    # -- put --------------------------------------------------------------------------------
    def put(
        self, hashes: Sequence[Key], values: Sequence[Buffer], *, depth: int | None = None
    ) -> list[PutStatus]:
        """Store blocks in the first tier (and lower ones under write-through).

        Returns per block STORED, EXISTS (already cached, bytes unchanged) or NO_SPACE (no slot
        even after eviction; nothing else was disturbed).

        ``depth``: when ``hashes`` are consecutive blocks of one prefix chain, the position of
        ``hashes[0]`` in it (0 = the prompt's first block); depth-aware eviction policies
        (length-aware) rank blocks by it. None: unknown.

        Raises:
            ValueError: lengths differ, or a block is larger than ``store.slot_size``.
        """
        if len(hashes) != len(values):
            raise ValueError(f"{len(hashes)} hashes but {len(values)} values")
        limit = self.slot_size
        biggest = max(map(len, values), default=0)
        if biggest > limit:
            raise ValueError(
                f"a {biggest}-byte block is larger than store.slot_size ({limit} bytes)"
            )
        t0 = time.perf_counter_ns()
        if depth is not None and self._shared:
            # Also when the blocks go to the first tier only: a shared tier they are demoted
            # into later places them by this chain (server: by prefix chunk).
            self._shared_tiers.note_chain(hashes, depth)
        local_only = not self.first.shared and not (self._write_through_on and len(self.tiers) > 1)
        with self.tracer.span("put", "store", blocks=len(hashes)), self._lock:
            self._check_open()
            self._expire()
            depths = None if depth is None else range(depth, depth + len(hashes))
            status = (
                self._placement.put(0, hashes, values, depths) if not self.first.shared else None
            )
            st = self._stats
            st.puts += 1
            st.put_blocks += len(hashes)
            if local_only:  # the usual case: done, in one lock section
                st.put_latency.observe_ns(time.perf_counter_ns() - t0)
        if local_only:
            if self._outbox:
                self._drain()
            return status  # type: ignore[return-value]  # not None: the first tier is local
        if status is None:
            status = self._shared_tiers.put(0, hashes, values)
        if self._write_through_on and len(self.tiers) > 1:
            self._write_through(hashes, values, status)
        with self._lock:
            self._stats.put_latency.observe_ns(time.perf_counter_ns() - t0)
        self._drain()
        return status

    def _write_through(
        self, hashes: Sequence[Key], values: Sequence[Buffer], status: Sequence[PutStatus]
    ) -> None:
        keep = [i for i, s in enumerate(status) if s is not PutStatus.NO_SPACE]
        keys = [hashes[i] for i in keep]
        vals = [values[i] for i in keep]
        for ti in range(1, len(self.tiers)):
            if self.tiers[ti].shared:
                self._shared_tiers.put(ti, keys, vals)
            else:
                with self._lock:
                    self._placement.put(ti, keys, vals)

    def flush(self, timeout: float) -> int:
        """Write every block that only volatile local tiers (cpu) hold into the first
        persistent local tier below them (disk), for at most ``timeout`` seconds; the number of
        blocks written. For a graceful shutdown: a persistent tier's index is rebuilt at the
        next open, so these blocks survive a restart.

        Blocks go in eviction order (least valuable first), as demotions would have sent them,
        so that the most recent land last and are the last the lower tier would evict. A block
        reserved and not yet committed is not a block yet and is not written.

        Raises:
            StorageError: the store is closed.
        """
        self._check_open()
        deadline = time.monotonic() + timeout
        persistent = [i for i in self._local if self.tiers[i].persistent]
        on_disk = sum(1 << i for i in persistent)
        written = 0
        for src in self._local:
            dst = next((j for j in persistent if j > src), None)
            if self.tiers[src].persistent or dst is None:
                continue
            with self._lock:
                policy = self._policies[src]
                where = self._where
                todo = [
                    k for k in policy.victims(len(policy), None) if not where.get(k, 0) & on_disk
                ]
            for start in range(0, len(todo), _FLUSH_BATCH):
                if time.monotonic() >= deadline:
                    log.warning(
                        "store: flush stopped after %.3gs with %d blocks of %s not written",
                        timeout,
                        len(todo) - start,
                        self.names[src],
                    )
                    return written
                with self._lock:
                    bit = 1 << src
                    batch = [
                        k
                        for k in todo[start : start + _FLUSH_BATCH]
                        if where.get(k, 0) & bit and not where.get(k, 0) & on_disk
                    ]
                    landed = (
                        self._placement.demote(src, dst, batch) if batch else set()
                    )  # counted there
                written += len(landed)
        return written

    # -- get --------------------------------------------------------------------------------
    def get(
        self,
        hashes: Sequence[Key],
        outs: Sequence[memoryview],
        *,
        depth: int | None = None,
        count: bool = True,
    ) -> list[int | None]:
        """Copy each cached block into its buffer; its length, or None for a miss.

        Looks in the local tiers, fastest first, then in the shared tiers; a block found below
        the first tier is promoted into it (``store.promote_on_hit``). ``depth`` as for
        :meth:`put`. ``count=False``: not counted as a get (``gets``, ``get_blocks``, latency)
        because the caller serves part of a larger request with it and counts that once
        (:meth:`count_get`); the tiers' traffic is counted all the same.

        Raises:
            ValueError: lengths differ, or a buffer is smaller than its block.
        """
        if len(hashes) != len(outs):
            raise ValueError(f"{len(hashes)} hashes but {len(outs)} output buffers")
        t0 = time.perf_counter_ns()
        res: list[int | None] = [None] * len(hashes)
        with self.tracer.span("get", "store", blocks=len(hashes)), self._lock:
            self._check_open()
            self._expire()
            where = self._where
            groups: dict[int, list[int]] = {}
            missing: list[int] = []
            got0: list[int | None] | None = None
            if self._local_mask == 1:  # one local tier: indexed means in the first tier
                masks = None
                first_all = all(map(where.__contains__, hashes))
            else:
                masks = [where.get(k, 0) for k in hashes]
                first_all = all(m & 1 for m in masks)
            if first_all:  # the usual case: all in the first tier
                got0 = self._placement.get(0, list(hashes), list(outs), depth)
                if None in got0:  # a block was gone: the general path below sorts it out
                    groups[0] = list(range(len(hashes)))
                else:
                    res = got0
            else:
                if masks is None:
                    masks = [where.get(k, 0) for k in hashes]
                for i, m in enumerate(masks):
                    if m & 1:
                        groups.setdefault(0, []).append(i)
                    elif m:
                        groups.setdefault((m & -m).bit_length() - 1, []).append(i)
                    else:
                        missing.append(i)
            promote: list[int] = []
            for ti, idx in sorted(groups.items()):
                if ti == 0 and got0 is not None:
                    got = got0  # read above
                else:
                    got = self._placement.get(ti, [hashes[i] for i in idx], [outs[i] for i in idx])
                policy = self._policies[ti]
                for i, n in zip(idx, got):
                    res[i] = n
                    if n is None:
                        missing.append(i)
                    else:
                        if depth is not None and policy.uses_depth:
                            policy.set_depth(hashes[i], depth + i)
                        if ti:
                            promote.append(i)
            if promote and self._cfg.promote_on_hit and not self.first.shared:
                self._placement.promote(
                    [hashes[i] for i in promote],
                    [outs[i][: res[i]] for i in promote],
                    None if depth is None else [depth + i for i in promote],
                )
            remote = bool(missing and self._shared)
            if not remote and count:
                self._count_get(len(hashes), len(res) - res.count(None), t0)
        if remote:
            if depth is not None:
                self._shared_tiers.note_chain(hashes, depth)
            with self.tracer.span("get_remote", "store", blocks=len(missing)):
                self._shared_tiers.get(
                    hashes, outs, res, sorted(missing), depth, self._promote_from_shared()
                )
            if count:
                with self._lock:
                    self._count_get(len(hashes), len(res) - res.count(None), t0)
        if self._outbox:  # promotions made room by demoting into a shared tier
            self._drain()
        return res

    def _promote_from_shared(self) -> Promote | None:
        """What a get from the shared tiers promotes with: None unless ``promote_on_hit`` is
        on and the first tier is local."""
        return (
            self._placement.promote if self._cfg.promote_on_hit and not self.first.shared else None
        )

    def verify(self, hashes: Sequence[Key]) -> int:
        """Check the given blocks in the local slot tiers against their checksums (a client
        that received bytes which did not match asks for this); drops and forgets the ones that
        fail. Returns how many were dropped. Tiers that keep no checksums are skipped."""
        dropped = 0
        with self._lock:
            self._check_open()
            for ti in self._local:
                tier = self.tiers[ti]
                if not isinstance(tier, SlotTier):
                    continue
                bit = 1 << ti
                keys = [k for k in hashes if self._where.get(k, 0) & bit]
                for k in tier.verify(keys) if keys else ():
                    self._placement.forget(ti, k)
                    self._counters[ti].corrupt += 1
                    dropped += 1
        return dropped

    # -- delete -----------------------------------------------------------------------------
    def delete(self, hashes: Sequence[Key]) -> int:
        """Remove blocks from every tier; the number of blocks that were cached locally.

        A block pinned by a load stays readable through the views already handed out and is
        freed when its last pin goes; lookups stop finding it at once.
        """
        removed = 0
        with self._lock:
            self._check_open()
            self._shared_tiers.unqueue(hashes)
            for k in hashes:
                m = self._where.pop(k, 0)
                if not m:
                    continue
                removed += 1
                for ti in self._local:
                    if m & (1 << ti):
                        self._policies[ti].remove(k)
                        if ti == 0 and self._leases.pinned(k):
                            self._doomed.add(k)
                        else:
                            self.tiers[ti].delete([k])
        self._shared_tiers.delete(hashes)
        return removed

    # -- two-phase store --------------------------------------------------------------------
    def prepare_store(
        self, hashes: Sequence[Key], sizes: Sequence[int] | None = None
    ) -> StoreHandle:
        """Reserve a slot in the first tier for each block not yet cached.

        Fill ``handle.buffers[i]`` for ``i in handle.pending()``, then call
        ``complete_store``. Until then the blocks are invisible; if the caller never
        completes, the lease expires and the slots return to the free list.

        Raises:
            ValueError: a size is not in (0, store.slot_size].
        """
        t0 = time.perf_counter_ns()
        n = len(hashes)
        sizes = [self.slot_size] * n if sizes is None else list(sizes)
        if len(sizes) != n:
            raise ValueError(f"{n} hashes but {len(sizes)} sizes")
        for s in sizes:
            if not 0 < s <= self.slot_size:
                raise ValueError(f"block size {s} is not in (0, {self.slot_size}] (slot_size)")
        first = self.first
        status = [PutStatus.EXISTS] * n
        buffers: list[memoryview | None] = [None] * n
        locations: list[tuple[int, int] | None] = [None] * n
        with self._lock:
            self._check_open()
            self._expire()
            where = self._where
            todo: list[int] = []
            seen: set[Key] = set()
            for i, k in enumerate(hashes):
                if not (where.get(k, 0) & 1) and k not in seen:
                    seen.add(k)
                    todo.append(i)
            keys = [hashes[i] for i in todo]
            if isinstance(first, SlotTier):
                self._placement.make_room(0, len(todo))
                views = first.reserve(keys, [sizes[i] for i in todo])
                locate = getattr(first, "locate", None)
                locs = locate(keys) if locate is not None else [None] * len(keys)
                staged = False
            else:
                views = [memoryview(bytearray(sizes[i])) for i in todo]
                locs = [None] * len(keys)
                staged = True
            reserved: list[Key] = []
            for i, k, v, loc in zip(todo, keys, views, locs):
                if v is None:
                    status[i] = PutStatus.NO_SPACE
                    self._counters[0].no_space += 1
                else:
                    status[i] = PutStatus.STORED
                    buffers[i] = v
                    locations[i] = loc
                    reserved.append(k)
            lease = self._leases.open("store", reserved, self._deadline()) if reserved else None
            st = self._stats
            st.leases_active = len(self._leases.leases)
            if lease is None:  # nothing to write: the put is over (complete_store counts none)
                st.puts += 1
                st.put_blocks += n
                st.put_latency.observe_ns(time.perf_counter_ns() - t0)
        if self._outbox:  # making room demoted into a shared tier
            self._drain()
        return StoreHandle(
            list(hashes), sizes, buffers, status, locations, lease, staged=staged, started_ns=t0
        )

    def complete_store(
        self,
        handle: StoreHandle,
        ok: bool | Sequence[bool] = True,
        checksums: Sequence[int] | None = None,
    ) -> list[PutStatus]:
        """Publish the written blocks (``ok`` true) and free the others' slots.

        Returns the final status per block (a block not published reads NO_SPACE, or REJECTED
        when its bytes did not match ``checksums``).

        Args:
            handle: from ``prepare_store``.
            ok: per block (or for all): the caller wrote it.
            checksums: per block of ``handle.hashes``, the writer's ``block_checksum`` of the
                bytes it wrote (a writer in another process, through the shared pool); a first
                tier that keeps checksums publishes only blocks whose slot holds exactly those.

        Raises:
            LeaseExpired: the lease ran out (or the handle was completed already); nothing of
                it was published.
        """
        n = len(handle.hashes)
        oks = [bool(ok)] * n if isinstance(ok, bool) else [bool(x) for x in ok]
        if len(oks) != n:
            raise ValueError(f"{n} blocks but {len(oks)} ok flags")
        if checksums is not None and len(checksums) != n:
            raise ValueError(f"{n} blocks but {len(checksums)} checksums")
        final = list(handle.status)
        pending = handle.pending()
        if handle.completed:
            raise LeaseExpired("this store handle was already completed")
        handle.completed = True
        self.tracer.instant("complete_store", "store", blocks=len(pending))
        if handle.lease is None:
            return final
        with self._lock:
            self._expire()
            if not handle.lease.active:
                raise LeaseExpired(
                    f"store lease {handle.lease.lease_id} expired after "
                    f"{self._cfg.lease_seconds}s; its {len(pending)} slots were freed"
                )
            self._leases.close(handle.lease)
            self._stats.leases_active = len(self._leases.leases)
            keys = [handle.hashes[i] for i in pending]
            good = [oks[i] for i in pending]
            c = self._counters[0]
            first = self.first
            if handle.staged:
                vals: list[Buffer] = [handle.buffers[i] or b"" for i, g in zip(pending, good) if g]
                pub = [k for k, g in zip(keys, good) if g]
                got = self._placement.put(0, pub, vals) if not first.shared else None
                if got is None:
                    got = []
                    publish_shared = (pub, vals)
                else:
                    publish_shared = None
                for i, s in zip([i for i, g in zip(pending, good) if g], got):
                    final[i] = s
            else:
                publish_shared = None
                assert isinstance(first, SlotTier)  # staged is False only for slot tiers
                sums = None if checksums is None else [checksums[i] for i in pending]
                published = first.commit(keys, good, sums)
                policy = self._policies[0]
                for i, k, g, landed in zip(pending, keys, good, published):
                    if landed:
                        self._where[k] = self._where.get(k, 0) | 1
                        policy.insert(k)
                        c.blocks_in += 1
                        c.bytes_in += handle.sizes[i]
                    elif g:
                        final[i] = PutStatus.REJECTED
                        c.corrupt += 1
                    else:
                        final[i] = PutStatus.NO_SPACE
            for i, g in zip(pending, good):
                if not g:
                    final[i] = PutStatus.NO_SPACE
            self._stats.puts += 1
            self._stats.put_blocks += n
        if publish_shared is not None:
            got = self._shared_tiers.put(0, *publish_shared)
            for i, s in zip([i for i, g in zip(pending, good) if g], got):
                final[i] = s
        if self._write_through_on and len(self.tiers) > 1:
            idx = [i for i in pending if final[i] is PutStatus.STORED]
            self._write_through(
                [handle.hashes[i] for i in idx],
                [handle.buffers[i] or b"" for i in idx],
                [PutStatus.STORED] * len(idx),
            )
        if handle.started_ns:
            with self._lock:
                self._stats.put_latency.observe_ns(time.perf_counter_ns() - handle.started_ns)
        self._drain()
        return final

    # -- two-phase load ---------------------------------------------------------------------
    def prepare_load(self, hashes: Sequence[Key], *, count: bool = True) -> LoadHandle:
        """Pin the leading cached blocks of ``hashes`` in the first tier and lend read-only
        views of them; blocks found only below are promoted first.

        Read ``handle.buffers`` (``handle.n`` of them), then call ``complete_load``. The pins
        hold until then or until the lease deadline. Counted as a get of ``hashes`` that found
        ``handle.n``, unless ``count=False`` (as for :meth:`get`).
        """
        t0 = time.perf_counter_ns()
        handle = self._prepare_load(hashes)
        if count:
            with self._lock:
                self._count_get(len(hashes), handle.n, t0)
        return handle

    def _prepare_load(self, hashes: Sequence[Key]) -> LoadHandle:
        first = self.first
        with self._lock:
            self._check_open()
            self._expire()
            n = self._placement.local_prefix(hashes)
        keys = list(hashes[:n])
        if n < len(hashes) and self._shared:
            keys += self._fetch_shared_prefix(list(hashes[n:]))
        if not isinstance(first, SlotTier):
            # No views to lend: copy out (still a lease, so the API is the same).
            outs = [memoryview(bytearray(self.slot_size)) for _ in keys]
            got = self.get(keys, outs, count=False)  # counted by prepare_load
            m = next((i for i, g in enumerate(got) if g is None), len(got))
            buffers: list[memoryview] = [outs[i][: got[i] or 0] for i in range(m)]
            keys = keys[:m]
            with self._lock:
                lease = self._leases.open("load", keys, self._deadline()) if keys else None
            return LoadHandle(keys, buffers, [None] * len(keys), lease)
        with self._lock:
            self._check_open()
            # Bring the prefix into the first tier, then pin and lend views.
            below = [k for k in keys if not (self._where.get(k, 0) & 1)]
            if below:
                self._placement.promote_prefix(below)
            m = 0
            for k in keys:
                if self._where.get(k, 0) & 1:
                    m += 1
                else:
                    break
            keys = keys[:m]
            views = first.views(keys)
            cut = next((i for i, v in enumerate(views) if v is None), len(views))
            keys = keys[:cut]
            lease = self._leases.open("load", keys, self._deadline()) if keys else None
            self._stats.leases_active = len(self._leases.leases)
            locate = getattr(first, "locate", None)
            locs = locate(keys) if locate is not None else [None] * len(keys)
            c = self._counters[0]
            touch = self._policies[0].touch
            for k in keys:
                touch(k)
            c.lookups += len(keys)
            c.hits += len(keys)
            c.blocks_out += len(keys)
        if self._outbox:  # promotions made room by demoting into a shared tier
            self._drain()
        return LoadHandle(keys, [v for v in views[:cut] if v is not None], locs, lease)

    def complete_load(self, handle: LoadHandle) -> None:
        """Unpin the handle's blocks.

        Raises:
            LeaseExpired: the lease ran out before this call (the views may have been reused).
        """
        if handle.completed:
            raise LeaseExpired("this load handle was already completed")
        handle.completed = True
        self.tracer.instant("complete_load", "store", blocks=handle.n)
        if handle.lease is None:
            return
        with self._lock:
            self._expire()
            if not handle.lease.active:
                raise LeaseExpired(
                    f"load lease {handle.lease.lease_id} expired after "
                    f"{self._cfg.lease_seconds}s; the blocks may have been evicted meanwhile"
                )
            self._release(handle.lease)
            self._counters[0].bytes_out += sum(len(b) for b in handle.buffers)

    def _fetch_shared_prefix(self, hashes: list[Key]) -> list[Key]:
        """Get the leading blocks of ``hashes`` that shared tiers hold into the first tier;
        returns the keys that landed there."""
        outs = [memoryview(bytearray(self.slot_size)) for _ in hashes]
        res: list[int | None] = [None] * len(hashes)
        promote = self._promote_from_shared()
        self._shared_tiers.get(hashes, outs, res, list(range(len(hashes))), None, promote)
        m = next((i for i, n in enumerate(res) if n is None), len(res))
        if m and (not self._cfg.promote_on_hit or self.first.shared):
            # a get promotes only when promote_on_hit is on; a load needs the bytes in
            # the first tier regardless.
            with self._lock:
                self._placement.put(0, hashes[:m], [outs[i][: res[i] or 0] for i in range(m)])
        return hashes[:m]

    # -- async forms ------------------------------------------------------------------------
    def get_async(
        self, hashes: Sequence[Key], outs: Sequence[memoryview]
    ) -> Future[list[int | None]]:
        """``get`` on the store's background thread; ``.result()`` / ``.done()``."""
        return self._submit(self.get, hashes, outs)

    def put_async(self, hashes: Sequence[Key], values: Sequence[Buffer]) -> Future[list[PutStatus]]:
        """``put`` on the store's background thread."""
        return self._submit(self.put, hashes, values)

    def prepare_load_async(self, hashes: Sequence[Key]) -> Future[LoadHandle]:
        """``prepare_load`` (with its promotions from disk or remote) in the background."""
        return self._submit(self.prepare_load, hashes)

    def _submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        with self._lock:
            self._check_open()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(2, thread_name_prefix="kvferry-store")
            return self._executor.submit(fn, *args)

    def _schedule_prefetch(self, keys: list[Key]) -> None:
        with self._lock:
            if self._closed:
                return
            if all(self._where.get(k, 0) & 1 for k in keys):
                return
        try:
            self._submit(self._prefetch, keys)
        except StorageError:
            pass  # closed meanwhile

    def _prefetch(self, keys: list[Key]) -> None:
        with self._lock:
            if self._closed:
                return
            below = [k for k in keys if (self._where.get(k, 0) & ~1)]
            below = [k for k in below if not (self._where.get(k, 0) & 1)]
            if below:
                self._placement.promote_prefix(below)
        self._drain()

    # -- leases -----------------------------------------------------------------------------
    def _deadline(self) -> float:
        return self._clock() + self._cfg.lease_seconds

    def _expire(self) -> None:
        """Close leases whose deadline passed; caller holds the lock."""
        leases = self._leases
        nxt = leases.next_deadline()
        if nxt is None or nxt > self._clock():
            return
        for lease in leases.due(self._clock()):
            self._stats.leases_expired += 1
            _lease_log.warning(
                "expired",
                "store: %s lease %d expired after %ss; released %d blocks",
                lease.kind,
                lease.lease_id,
                self._cfg.lease_seconds,
                len(lease.keys),
            )
            if lease.kind == "store":
                leases.close(lease)
                first = self.first
                if isinstance(first, SlotTier):
                    # its holder may still write there: the tier guards those slots from now on
                    first.abandon(lease.keys)
            else:
                self._release(lease)
        self._stats.leases_active = len(leases.leases)

    def _release(self, lease: Lease) -> None:
        for k in self._leases.close(lease):
            if k in self._doomed:
                self._doomed.discard(k)
                self.tiers[0].delete([k])
        self._stats.leases_active = len(self._leases.leases)

    # -- stats, lifecycle -------------------------------------------------------------------
    def error_count(self) -> int:
        """Failed or skipped tier operations so far (every tier's ``errors`` and
        ``breaker_skipped``), without asking the tiers.

        The store turns a failing tier (or one its breaker skips) into misses (lookup, get) or
        NO_SPACE (put) and counts it; a caller that must tell "absent" from "unreachable"
        compares this before and after a call.
        """
        with self._lock:
            return sum(c.errors + c.breaker_skipped for c in self._counters)

    def stats(self) -> StoreStats:
        """A consistent snapshot of the counters and of every tier's usage."""
        with self._lock:
            self._expire()
            snap = self._stats.copy()
            snap.leases_active = len(self._leases.leases)
        for i, (name, tier) in enumerate(zip(self.names, self.tiers)):
            if not self._shared_tiers.answering(i):
                continue
            try:
                snap.usage[name] = tier.stats()
            except StorageError as e:
                log.warning("store: stats of %s failed: %s", name, e)
        return snap

    def attach(self, closeable: Closeable) -> None:
        """Close ``closeable`` when the store closes, before its tiers (an exporter reading
        :meth:`stats`: ``kvferry.telemetry.prometheus.export_store`` attaches its own).

        Raises:
            StorageError: the store is closed.
        """
        with self._lock:
            self._check_open()
            self._attached.append(closeable)

    def close(self) -> None:
        """Stop background work, close what was attached, then every tier; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            executor = self._executor
        if executor is not None:
            executor.shutdown(wait=True)
        self._drain(everything=True)  # demotions still queued land before their tier closes
        for closeable in reversed(self._attached):
            try:
                closeable.close()
            except Exception:  # an isolation boundary, as for the tiers below
                log.exception("store: closing %r failed", closeable)
        if self._own_tracer:
            self.tracer.close()
        for tier in self.tiers:
            try:
                tier.close()
            except Exception:  # an isolation boundary: one tier's failure must not leak others
                log.exception("store: closing %s failed", tier.label)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the store is closed")

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TieredStore(tiers={self.names}, blocks={len(self._where)})"
