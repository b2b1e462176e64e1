"""LRU hit counts for every capacity at once, from one pass over a trace (Mattson's stack
algorithm), equal to what the store's LRU counts block for block.

Why one pass is enough: under LRU, between two requests, a tier of C blocks holds exactly the
C most recently used distinct blocks (the inclusion property of stack algorithms; Mattson et
al., 1970). So a block is in the tier when a request starts if and only if fewer than C other
distinct blocks were used since its own last use. Call that number the block's *distance*
``D`` (infinite at a block's first use). ``D`` does not depend on C, and for any capacity:

- a request's prefix hit is its leading run of blocks with ``D < C``;
- the blocks put (stored) are those with ``D >= C``, and the evictions are the puts minus
  what the tier holds at the end, ``min(C, distinct blocks)``.

This matches the store's LRU (``TieredStore`` over one tier, exact capacities: evict only what
a put needs) under two conditions, which :meth:`LruStack.exact_for` checks: C is at least the
longest request (so making room never evicts a block of the request being served), and no
request names a block twice. A test holds the two equal on real and random traces.

The distances come from counting, for each use ``i`` of a block whose previous use was ``p``,
the distinct blocks used in ``(p, s)`` (``s``: the start of ``i``'s request). With ``prev[k]``
the previous use of the block used at ``k`` (-1 for a first use), a block used in ``(p, s)``
is counted once, at its first use in that window, which is a ``k`` in ``(p, s)`` with
``prev[k] < p``; every ``k <= p`` has ``prev[k] < p``, so
``D = #{k < s : prev[k] < p} - (p + 1)``: a dominance count, answered for all uses at once
by a wavelet matrix over ``prev`` (``log2(n)`` vectorised levels; about 0.1 s per 100k
blocks here).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvferry.bench.traces import Trace


class LruStack:
    """One trace's block distances; per capacity, the counts the store's LRU would produce.

    Args:
        trace: the requests, in order.
    """

    def __init__(self, trace: Trace) -> None:
        reqs = trace.requests
        lens = np.fromiter((len(r.hash_ids) for r in reqs), np.int64, len(reqs))
        n = int(lens.sum())
        ids = np.fromiter((h for r in reqs for h in r.hash_ids), np.uint64, n)
        self.block_tokens = trace.block_tokens
        self.lengths = lens
        self.input_lengths = np.fromiter((r.input_length for r in reqs), np.int64, len(reqs))
        self.blocks = n
        ends = np.cumsum(lens)
        self._bounds = np.concatenate(([0], ends))
        starts = np.repeat(ends - lens, lens)
        prev = _previous_use(ids)
        self.distinct = int(np.count_nonzero(prev < 0))
        again = prev >= 0
        # a block named twice by one request: the store dedups it, this model does not
        self.repeats_in_request = bool(np.any(prev[again] >= starts[again]))
        self.longest = int(lens.max()) if len(lens) else 0
        never = n + 1  # the distance of a first use: more than any capacity can matter
        dist = np.full(n, never, np.int64)
        if np.any(again):
            p = prev[again]
            dist[again] = _count_less(prev + 1, starts[again], p + 1) - (p + 1)
        # running maximum within each request: a block is a prefix hit iff every block up to it
        # is present, i.e. iff this maximum is below the capacity
        owner = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
        shift = owner * (never + 1)
        self._runmax = np.maximum.accumulate(shift + dist) - shift
        self._dist = dist

    def exact_for(self, capacity: int | None) -> str | None:
        """None when the counts for ``capacity`` (None: unbounded) are exactly the store's; else
        why not."""
        if self.repeats_in_request:
            return "a request names the same block twice"
        if capacity is not None and capacity < self.longest:
            return (
                f"capacity {capacity} is below the longest request ({self.longest} blocks), "
                "where making room evicts blocks of the request itself"
            )
        return None

    def counts(self, capacity: int | None) -> dict[str, Any]:
        """What a run at ``capacity`` blocks (None: unbounded) counts: ``hits`` (prefix hit
        blocks per request, an array), ``stored`` (blocks put) and ``evictions``."""
        cap = self.blocks + 1 if capacity is None else min(capacity, self.blocks + 1)
        cum = np.concatenate(([0], np.cumsum(self._runmax < cap)))
        hits = cum[self._bounds[1:]] - cum[self._bounds[:-1]]
        stored = int(np.count_nonzero(self._dist >= cap))
        return {
            "hits": hits,
            "stored": stored,
            "evictions": stored - min(cap, self.distinct),
        }


def _previous_use(ids: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """For each position, the previous position of the same id (-1 for the first)."""
    order = np.argsort(ids, kind="stable")
    same = ids[order][1:] == ids[order][:-1]
    prev = np.full(ids.size, -1, np.int64)
    prev[order[1:][same]] = order[:-1][same]
    return prev


def _count_less(
    values: np.ndarray[Any, Any], ends: np.ndarray[Any, Any], bounds: np.ndarray[Any, Any]
) -> np.ndarray[Any, Any]:
    """``#{k < ends[q] : values[k] < bounds[q]}`` for every query q (values and bounds are
    non-negative integers), with a wavelet matrix: one stable partition of the values per bit,
    most significant first, and the queries walked down it together."""
    n = values.size
    top = max(int(values.max(initial=0)), int(bounds.max(initial=0)), n)
    levels = max(1, top.bit_length())
    dt: Any = np.int32 if top < 2**31 - 1 else np.int64  # half the memory traffic where it fits
    arr: Any = values.astype(dt)
    bnd: Any = bounds.astype(dt)
    out: Any = np.zeros(ends.size, dt)
    lo: Any = np.zeros(ends.size, dt)  # the query's range [lo, hi) in this level's order
    hi: Any = ends.astype(dt)
    zeros: Any = np.zeros(n + 1, dt)
    nxt: Any = np.empty(n, dt)
    zero = np.empty(n, bool)
    for bit in range(levels - 1, -1, -1):
        mask = dt(1 << bit)
        np.equal(arr & mask, 0, out=zero)
        np.cumsum(zero, out=zeros[1:])  # zeros[k]: values with a 0 bit among the first k
        total = zeros[n]
        one = (bnd & mask) != 0
        z_lo = np.take(zeros, lo)
        z_hi = np.take(zeros, hi)
        # where the bound has a 1 here, every value of the range with a 0 is below it: count
        # them, and follow the 1s; where it has a 0, follow the 0s
        out += np.where(one, z_hi - z_lo, 0)
        lo = np.where(one, lo - z_lo + total, z_lo)
        hi = np.where(one, hi - z_hi + total, z_hi)
        # the next level's order: this one's 0s, then its 1s, each in order (np.compress into
        # place is several times faster than boolean indexing here)
        np.compress(zero, arr, out=nxt[:total])
        np.compress(~zero, arr, out=nxt[total:])
        arr, nxt = nxt, arr
    result: np.ndarray[Any, Any] = out.astype(np.int64)
    return result
