"""Placement over a store's local tiers (cpu, disk): the exact index of what each holds, their
eviction policies, and the moves between them.

Owns ``where`` (key -> bit mask of the local tiers holding it) and one eviction policy per tier,
and every move that keeps them true: a put into a tier after making room at its high watermark
(``store.evict_start_threshold``, ``store.evict_ratio``), eviction with demotion into the tier
below (write-back), promotion into the first tier, and forgetting a block a tier no longer
vouches for. Plain Python over the tiers' batch calls: every method is called with the store's
lock held, and none makes a network call (a demotion into a shared tier is handed to
:class:`~kvferry.store.shared.SharedTiers`, which makes it after the lock is released).

It decides nothing about requests (which blocks a get wants, leases, statistics of calls):
:class:`~kvferry.store.tiered.TieredStore` does, and composes one of these.

Why one class of this length: put, eviction, demotion and promotion call each other (a put makes
room, which evicts, which demotes, which puts into the next tier) over one index; the put path
is the store's hot path and is written for batches (one dict update per chunk, no per-block
call in the usual case), which takes room.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

from kvferry.backends.base import Buffer, Key, PutStatus, SlotTier, Tier
from kvferry.config.models import StoreConfig
from kvferry.errors import StorageError
from kvferry.observe.trace import NullTracer, Tracer
from kvferry.store.eviction import EvictionPolicy
from kvferry.store.leases import LeaseTable
from kvferry.store.shared import SharedTiers
from kvferry.store.stats import TierCounters

__all__ = ["Placement", "eviction_marks"]

log = logging.getLogger("kvferry.store")

STORED = PutStatus.STORED
EXISTS = PutStatus.EXISTS


def eviction_marks(capacity: int | None, cfg: StoreConfig) -> tuple[int | None, int]:
    """A tier's high watermark (blocks in use that start an eviction round; None: never) and
    its round (the fewest victims a round takes), from ``evict_start_threshold`` and
    ``evict_ratio``."""
    if capacity is None:
        return None, 0
    return int(capacity * cfg.evict_start_threshold), max(1, math.ceil(capacity * cfg.evict_ratio))


class Placement:
    """The index and policies of a store's local tiers; see the module docstring.

    Args:
        tiers: all the store's tiers, fastest first (shared ones have no bit in ``where``).
        policies: one eviction policy per tier, by index.
        counters: each tier's traffic counters.
        leases: the store's pins (eviction skips pinned blocks).
        shared: the store's shared tiers (a demotion into one is queued there).
        cfg: the store's section (``slot_size`` and the eviction marks).
        tracer: where ``evict`` spans go.
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        policies: Sequence[EvictionPolicy[Key]],
        counters: Sequence[TierCounters],
        leases: LeaseTable,
        shared: SharedTiers,
        cfg: StoreConfig,
        tracer: Tracer | NullTracer,
    ) -> None:
        self.tiers = list(tiers)
        self.names = [t.label for t in self.tiers]
        self.policies = list(policies)
        self._counters = list(counters)
        self._leases = leases
        self._shared = shared
        self.slot_size = int(cfg.slot_size)
        self.tracer = tracer
        self.where: dict[Key, int] = {}
        """Key -> bit mask of the local tiers that hold it (bit ``i``: ``tiers[i]``)."""
        self.doomed: set[Key] = set()
        """Blocks deleted while pinned: freed at the last unpin."""
        self.local = [i for i, t in enumerate(self.tiers) if not t.shared]
        self.local_mask = sum(1 << i for i in self.local)
        # the tiers below each tier, as a mask of where bits
        self._lower_masks = [
            sum(1 << j for j in range(i + 1, len(self.tiers))) for i in range(len(self.tiers))
        ]
        self._high: list[int | None] = []
        self._round: list[int] = []
        for t in self.tiers:
            high, round_ = eviction_marks(t.capacity_blocks, cfg)
            self._high.append(high)
            self._round.append(round_)

    def rebuild(self) -> None:
        """Index the blocks persistent tiers already hold (a disk tier after a restart)."""
        for i in self.local:
            tier = self.tiers[i]
            if not tier.persistent:
                continue
            bit = 1 << i
            policy = self.policies[i]
            for k in tier.keys():  # noqa: SIM118 - a Tier, not a dict
                self.where[k] = self.where.get(k, 0) | bit
                policy.insert(k)
            log.info("store: %s holds %d blocks from before", tier.label, len(policy))

    def put(
        self,
        ti: int,
        hashes: Sequence[Key],
        values: Sequence[Buffer],
        depths: Sequence[int | None] | None = None,
    ) -> list[PutStatus]:
        """Put into local tier ``ti`` after making room; caller holds the lock. ``depths``:
        each block's depth in its prefix chain, for depth-aware policies (None: unknown)."""
        bit = 1 << ti
        where = self.where
        status: list[PutStatus] = [PutStatus.EXISTS] * len(hashes)
        todo: list[int] = []
        touched = False
        seen: set[Key] = set()
        policy = self.policies[ti]
        if not policy.uses_depth:
            depths = None
        doomed = self.doomed
        # The usual case: blocks no tier has, no repeats (C-level checks, no loop here).
        fresh = where.keys().isdisjoint(hashes) and len(set(hashes)) == len(hashes)
        # consecutive depths of fresh blocks: one chain, which a policy takes in one call
        chained = fresh and isinstance(depths, range) and depths.step == 1
        if fresh:
            todo = list(range(len(hashes)))
        else:
            masks = [where.get(k, 0) for k in hashes]
            for i, k in enumerate(hashes):
                if masks[i] & bit:
                    policy.touch(k)
                    touched = True
                    if doomed:
                        doomed.discard(k)
                elif k not in seen:
                    seen.add(k)
                    todo.append(i)
        if not todo:
            return status
        if fresh:
            keys, vals = list(hashes), list(values)
        else:
            keys = [hashes[i] for i in todo]
            vals = [values[i] for i in todo]
        # A batch larger than the tier goes in chunks, with room made before each: the older
        # part of the batch is demoted like any other block instead of answering NO_SPACE.
        cap = self.tiers[ti].capacity_blocks
        step = len(keys) if cap is None else max(1, min(len(keys), cap // 2))
        c = self._counters[ti]
        t0 = time.perf_counter()
        for start in range(0, len(keys), step):
            end = min(len(keys), start + step)
            self.make_room(ti, end - start)
            try:
                got = self.tiers[ti].put(keys[start:end], vals[start:end])
            except StorageError as e:
                c.errors += 1
                log.warning("store: put into %s failed: %s", self.names[ti], e)
                got = [PutStatus.NO_SPACE] * (end - start)
            # Indexed chunk by chunk: the next chunk's eviction must see these blocks.
            if got.count(STORED) == len(got) and (depths is None or chained):  # the usual case
                chunk = keys[start:end]
                if fresh:  # todo is 0..n-1
                    status[start:end] = got
                    where.update(dict.fromkeys(chunk, bit))
                else:
                    for i in todo[start:end]:
                        status[i] = STORED
                    where.update(zip(chunk, [where.get(k, 0) | bit for k in chunk]))
                if depths is None:
                    policy.insert_many(chunk)
                else:
                    policy.insert_chain(chunk, depths[start])  # type: ignore[arg-type]
                c.blocks_in += len(chunk)
                c.bytes_in += sum(map(len, vals[start:end]))
                continue
            insert = policy.insert
            stored = nbytes = refused = 0
            for i, k, v, st in zip(todo[start:end], keys[start:end], vals[start:end], got):
                status[i] = st
                if st is STORED or st is EXISTS:
                    where[k] = where.get(k, 0) | bit
                    insert(k)
                    if depths is not None:
                        d = depths[i]
                        if d is not None:
                            policy.set_depth(k, d)
                    if st is STORED:
                        stored += 1
                        nbytes += len(v)
                else:
                    refused += 1
            c.blocks_in += stored
            c.bytes_in += nbytes
            c.no_space += refused
        if touched or len(todo) != len(hashes):
            # Present blocks were touched before room was made (so that making room never
            # evicts a block of this very put); their recency now follows the put's order, as
            # if each block had been used in turn. (A put of blocks new to this tier, none
            # repeated, inserted them in that order already: a demotion, or blocks held only
            # below.)
            policy.reorder(hashes)
        c.save_seconds += time.perf_counter() - t0
        return status

    def make_room(self, ti: int, needed: int) -> None:
        """Evict from local tier ``ti`` when ``needed`` more blocks would pass the high
        watermark; caller holds the lock."""
        tier = self.tiers[ti]
        cap = tier.capacity_blocks
        high = self._high[ti]
        if cap is None or high is None:
            return
        used = tier.used_blocks
        if used + needed <= high:
            return
        must = max(0, used + needed - cap)
        want = max(self._round[ti], used + needed - high, must)
        pins = self._leases
        victims = self.policies[ti].victims(min(want, used), pins.pinned if pins.pins else None)
        if victims:
            with self.tracer.span("evict", "store", tier=self.names[ti], blocks=len(victims)):
                self._evict(ti, victims, must)

    def _evict(self, ti: int, victims: list[Key], must: int) -> None:
        """Remove ``victims`` from local tier ``ti``, demoting to the next tier first those no
        lower tier has (write-back); caller holds the lock.

        A victim whose demotion failed (the lower tier is full or down) is kept unless fewer
        than ``must`` blocks could leave otherwise: the store trades a lost block for room only
        when a put cannot fit at all.
        """
        tier = self.tiers[ti]
        c = self._counters[ti]
        where = self.where
        lower_mask = self._lower_masks[ti]
        demote = [k for k in victims if not (where.get(k, 0) & lower_mask)] if lower_mask else []
        if demote:
            gone = self.demote(ti, ti + 1, demote)
            stuck = [k for k in demote if k not in gone]
        else:
            stuck = []  # no tier below: eviction from the last tier is a plain drop
        if stuck:
            stuck_set = set(stuck)
            safe = [k for k in victims if k not in stuck_set]
            extra = max(0, must - len(safe))
            victims = safe + stuck[:extra]
            c.dropped += min(extra, len(stuck))
        if not victims:
            return
        tier.delete(victims)
        self.policies[ti].remove_many(victims)
        if self.local_mask == 1 << ti:  # the only local tier: nothing else holds them
            pop = where.pop
            for k in victims:
                pop(k, None)
        else:
            clear = ~(1 << ti)
            for k in victims:
                left = where.get(k, 0) & clear
                if left:
                    where[k] = left
                else:
                    where.pop(k, None)
        c.evictions += len(victims)

    def demote(self, src: int, dst: int, keys: list[Key]) -> set[Key]:
        """Copy ``keys`` from local tier ``src`` into tier ``dst``; the keys that may leave
        ``src`` (landed in a local ``dst``, or queued for a shared one). Caller holds the lock.

        Into a shared tier the blocks are queued (``SharedTiers.queue``) and put by
        ``SharedTiers.drain`` once the lock is released: a network call here would hold up
        every local get for as long as the remote tier takes, a whole timeout when it hangs.
        Counted as demotions when they land. A breaker that is open (and not due for a probe)
        refuses them up front.

        A slot tier checks each block's checksum first (when it keeps them): a block that
        fails is dropped there and forgotten here, never copied down with a fresh checksum.
        """
        if self.tiers[dst].shared and self._shared.refuses(dst):
            return set()
        values = self.read(src, keys)
        for k, v in zip(keys, values):
            if v is None and self.where.get(k, 0) & (1 << src):
                self.forget(src, k)
                self._counters[src].corrupt += 1
        present = [(k, v) for k, v in zip(keys, values) if v is not None]
        if not present:
            return set()
        ks = [k for k, _ in present]
        if self.tiers[dst].shared:
            self._shared.queue(src, dst, present)
            return set(ks)
        vs: list[Buffer] = [v for _, v in present]
        src_policy = self.policies[src]
        depths = [src_policy.depth(k) for k in ks] if src_policy.uses_depth else None
        got = self.put(dst, ks, vs, depths)
        landed = {k for k, s in zip(ks, got) if s is not PutStatus.NO_SPACE}
        self._counters[src].demotions += len(landed)
        return landed

    def read(self, ti: int, keys: list[Key]) -> list[Buffer | None]:
        tier = self.tiers[ti]
        if isinstance(tier, SlotTier):
            return list(tier.views(keys, verify=True))
        peeked = tier.peek(keys)
        if peeked is not None:
            return peeked
        outs = [memoryview(bytearray(self.slot_size)) for _ in keys]
        try:
            got = tier.get(keys, outs)
        except StorageError as e:
            self._counters[ti].errors += 1
            log.warning("store: read from %s failed: %s", self.names[ti], e)
            return [None] * len(keys)
        return [None if n is None else o[:n] for o, n in zip(outs, got)]

    def get(
        self, ti: int, keys: list[Key], outs: list[memoryview], depth: int | None = None
    ) -> list[int | None]:
        """Read from local tier ``ti``; drops index entries the tier no longer vouches for.
        ``depth``: ``keys`` are consecutive chain blocks from that depth (told to a depth-aware
        policy when every block was read)."""
        tier = self.tiers[ti]
        c = self._counters[ti]
        t0 = time.perf_counter()
        try:
            got = tier.get(keys, outs)
        except StorageError as e:
            c.errors += 1
            log.warning("store: get from %s failed: %s", self.names[ti], e)
            got = [None] * len(keys)
        c.load_seconds += time.perf_counter() - t0
        c.lookups += len(keys)
        policy = self.policies[ti]
        if None not in got:  # the usual case: every block there
            if depth is not None and policy.uses_depth:
                policy.touch_chain(keys, depth)
            else:
                policy.touch_many(keys)
            n_got = len(keys)
            c.hits += n_got
            c.blocks_out += n_got
            c.bytes_out += sum(got)  # type: ignore[arg-type]  # no None here
            return got
        touch = policy.touch
        nbytes = hits = 0
        for k, n in zip(keys, got):
            if n is None:
                self.forget(ti, k)  # torn/corrupt or lost: never ask this tier for it again
            else:
                touch(k)
                nbytes += n
                hits += 1
        c.hits += hits
        c.blocks_out += hits
        c.bytes_out += nbytes
        return got

    def promote(
        self, keys: list[Key], values: list[Buffer], depths: list[int] | None = None
    ) -> None:
        """Copy blocks found below into the first tier; caller holds the lock."""
        before = self._counters[0].blocks_in
        self.put(0, keys, values, depths)
        self._counters[0].promotions += self._counters[0].blocks_in - before

    def forget(self, ti: int, key: Key) -> None:
        m = self.where.get(key, 0) & ~(1 << ti)
        if m:
            self.where[key] = m
        else:
            self.where.pop(key, None)
        self.policies[ti].remove(key)

    def local_prefix(self, hashes: Sequence[Key]) -> int:
        where, mask = self.where, self.local_mask
        n = 0
        for k in hashes:
            if where.get(k, 0) & mask:
                n += 1
            else:
                break
        return n

    def promote_prefix(self, keys: list[Key]) -> None:
        """Copy ``keys`` (held by lower local tiers) into the first tier; caller holds lock."""
        by_tier: dict[int, list[Key]] = {}
        for k in keys:
            m = self.where.get(k, 0)
            if m:
                by_tier.setdefault((m & -m).bit_length() - 1, []).append(k)
        for ti, ks in by_tier.items():
            outs = [memoryview(bytearray(self.slot_size)) for _ in ks]
            got = self.get(ti, ks, outs)
            present = [(k, o[:n]) for k, o, n in zip(ks, outs, got) if n is not None]
            if present:
                self.promote([k for k, _ in present], [v for _, v in present])
