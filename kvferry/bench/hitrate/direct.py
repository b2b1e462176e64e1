"""One tier of the store, simulated by driving its eviction policy directly.

A simulation over a single tier only needs, per block, "is it in the tier" and the policy's
order; :class:`~kvferry.store.TieredStore` around them adds an index of bit masks, the tier's
own dict, leases, statistics, latency histograms, locks and input checks, which cost about two
thirds of a simulated request. :func:`count` keeps the part that decides hits: the store's own
policy class (the registry's, unchanged), called with the same primitives, in the same order,
with the same arguments as ``TieredStore`` calls them for one local tier. The tier's blocks are
the policy's tracked keys (it sees every insert and removal), probed through
``EvictionPolicy.tracked()``. Request by request, as :func:`kvferry.bench.hitrate.serve` does it:

- ``lookup``: the leading blocks tracked;
- ``get`` of that prefix: ``touch_chain(prefix, 0)`` (policies with ``uses_depth``) or
  ``touch_many(prefix)``;
- ``put`` of the rest: all-new blocks (none held, none repeated) go in chunks of at most half
  the capacity, room made before each chunk (the tier's watermarks: ``eviction_marks``), then
  ``insert_chain`` / ``insert_many``; otherwise the held blocks are touched one by one first,
  the new ones (first occurrences) go in the same chunks with ``insert`` and ``set_depth`` per
  block, and ``reorder`` takes the whole put.

Room is made as ``TieredStore._make_room`` does with nothing pinned and no tier below: victims
are dropped. So the counts (hits per request, evictions) are the store loop's, for any policy,
capacity and watermarks; a test holds them equal for every registered policy on the bundled
trace and on random ones with repeated blocks and tiny capacities. A tier pipeline
(promotion, demotion) still runs the store loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvferry.backends.base import Key
from kvferry.config.models import StoreConfig
from kvferry.store.eviction import load_policy
from kvferry.store.tiered import eviction_marks

PROGRESS_EVERY = 512
"""Requests between two progress calls."""


@dataclass
class DirectCounts:
    """What one run counted."""

    hits: np.ndarray[Any, Any]
    """Prefix hit blocks of each request, in trace order."""
    evictions: int


def refusal(n_tiers: int) -> str | None:
    """None when :func:`count` counts a simulation over ``n_tiers`` tiers as the store loop
    would; else why not."""
    if n_tiers != 1:
        return f"{n_tiers} tiers: the direct engine covers one (a pipeline promotes and demotes)"
    return None


def count(
    keys: Sequence[Sequence[Key]],
    policy: str,
    capacity: int | None,
    store: StoreConfig,
    on_progress: Callable[[int, int], None] | None = None,
) -> DirectCounts:
    """Serve every request of ``keys`` from one tier of ``capacity`` blocks (None: unbounded)
    under ``policy`` with ``store``'s watermarks; see the module docstring.

    Raises:
        ConfigError: ``policy`` is not a registered eviction policy.
    """
    pol = load_policy(policy)()
    high, round_ = eviction_marks(capacity, store)
    cap = 0 if capacity is None else capacity
    depthy = pol.uses_depth
    touch_prefix = pol.touch_chain if depthy else None
    touch_many, insert_many, insert_chain = pol.touch_many, pol.insert_many, pol.insert_chain
    victims, remove_many = pol.victims, pol.remove_many
    held = pol.tracked()  # the tier's keys are the policy's: it sees every insert and removal
    contains = held.__contains__
    hits: list[int] = []
    hit = hits.append
    evictions = 0
    total = len(keys)
    for r, ks in enumerate(keys):
        if on_progress is not None and r % PROGRESS_EVERY == 0:
            on_progress(r, total)
        n = 0
        for k in ks:
            if k in held:
                n += 1
            else:
                break
        hit(n)
        size = len(ks)
        if n:
            if touch_prefix is not None:
                touch_prefix(ks[:n], 0)
            else:
                touch_many(ks[:n])
            if n == size:
                continue
        elif not size:
            continue
        rest = ks[n:] if n else ks
        fresh = not any(map(contains, rest)) and len(set(rest)) == len(rest)
        if fresh:
            todo: list[Key] = rest if isinstance(rest, list) else list(rest)
            at: list[int] = []
        else:
            todo, at = [], []
            seen: set[Key] = set()
            touch = pol.touch
            for i, k in enumerate(rest):
                if contains(k):
                    touch(k)
                elif k not in seen:
                    seen.add(k)
                    todo.append(k)
                    at.append(i)
            if not todo:
                continue
        m = len(todo)
        step = m if high is None else max(1, min(m, cap // 2))
        for start in range(0, m, step):
            chunk = todo[start : start + step] if step < m else todo
            if high is not None:
                used = len(pol)
                after = used + len(chunk)
                if after > high:
                    want = max(round_, after - high, after - cap)
                    out = victims(min(want, used), None)
                    if out:
                        remove_many(out)
                        evictions += len(out)
            if not depthy:
                insert_many(chunk)
            elif fresh:
                insert_chain(chunk, n + start)
            else:
                for i, k in zip(at[start : start + step], chunk):
                    pol.insert(k)
                    pol.set_depth(k, n + i)
        if not fresh:  # the store's "touched a block, or the put repeats one", for one tier
            pol.reorder(rest)
    if on_progress is not None:
        on_progress(total, total)
    return DirectCounts(hits=np.array(hits, np.int64), evictions=evictions)
