"""Least recently used chain first, and within a chain its deepest blocks first.

In the spirit of the LengthAwareCache of the Mooncake paper (FAST'25), which favours blocks that
occur early in requests. In a prefix cache a block is only reachable through every block before
it: losing block 0 of a chain makes the rest of the chain dead weight. Plain LRU does exactly
that, because an engine touches a prompt's blocks front to back, so the front of the chain is
the least recent. This policy ranks by recency of the *chain*, not of the block: the blocks a
request touches in chain order (depth 0, 1, 2, ... as the store reports through ``set_depth``)
share one recency, and within it the deepest block goes first. A chain's front leaves only after
its tail.

A run of ``set_depth`` calls with consecutive depths (the hit prefix a ``get`` read, then the
blocks the following ``put`` stored) is one chain access. Blocks whose depth nobody reports are
each their own access, so with no depths at all this is plain LRU.

Structure: one dict of keys per access group ("tick"), the groups in an insertion-ordered dict
(oldest first), keys within a group in depth order; ``victims`` walks groups oldest first and each
group backwards. O(1) per call except ``victims``, which is O(groups visited + victims).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, KeysView, Sequence
from itertools import chain

from kvferry.store.eviction.base import EvictionPolicy, K, take


class LengthAwarePolicy(EvictionPolicy[K]):
    name = "length-aware"
    uses_depth = True

    def __init__(self) -> None:
        self._tick = 0
        self._group: dict[K, int] = {}  # key -> tick of its group
        self._groups: dict[int, dict[K, None]] = {}  # tick -> keys, oldest tick first
        self._depth: dict[K, int] = {}
        self._chain = -1  # tick of the chain being extended
        self._last_depth = -2

    def _move(self, key: K, tick: int) -> None:
        old = self._group.get(key)
        if old is not None:
            left = self._groups[old]
            del left[key]
            if not left:
                del self._groups[old]
        keys = self._groups.get(tick)
        if keys is None:
            keys = self._groups[tick] = {}
        keys[key] = None
        self._group[key] = tick

    def _fresh(self, key: K) -> None:
        self._tick += 1
        self._move(key, self._tick)

    def insert(self, key: K) -> None:
        self._fresh(key)

    def touch(self, key: K) -> None:
        if key in self._group:
            self._fresh(key)

    def set_depth(self, key: K, depth: int) -> None:
        tick = self._group.get(key)
        if tick is None:
            return
        self._depth[key] = depth
        if depth == self._last_depth + 1 and self._chain in self._groups:
            self._move(key, self._chain)
        else:
            self._chain = tick
        self._last_depth = depth

    def depth(self, key: K) -> int | None:
        return self._depth.get(key)

    def insert_chain(self, keys: Sequence[K], first_depth: int) -> None:
        # insert(k); set_depth(k, d) key by key, going straight to each key's final group
        group, groups = self._group, self._groups
        if len(keys) > 1 and group.keys().isdisjoint(keys) and len(set(keys)) == len(keys):
            self._link(keys[0], first_depth)  # the usual put: new blocks, one chain
            self._join(keys[1:], first_depth + 1)
            return
        for i, k in enumerate(keys):
            old = group.get(k)
            if old is not None:
                left = groups[old]
                del left[k]
                if not left:
                    del groups[old]
            self._link(k, first_depth + i)

    def touch_chain(self, keys: Sequence[K], first_depth: int) -> None:
        # touch_many(keys), then set_depth(k, d) key by key (unknown keys are left out)
        if len(set(keys)) != len(keys):  # a repeated key: the literal definition
            super().touch_chain(keys, first_depth)
            return
        group, groups = self._group, self._groups
        known = []
        for i, k in enumerate(keys):
            old = group.get(k)
            if old is None:
                continue
            left = groups[old]
            del left[k]
            if not left:
                del groups[old]
            known.append(i)
        if len(known) == len(keys) > 1:  # the usual get: every block, one run of depths
            self._link(keys[0], first_depth)
            self._join(keys[1:], first_depth + 1)
            return
        for i in known:
            self._link(keys[i], first_depth + i)

    def _join(self, keys: Sequence[K], first_depth: int) -> None:
        """``_link`` of each of ``keys`` (in no group now) at depths from ``first_depth``, right
        after ``_link`` placed the block at ``first_depth - 1``: they all join its chain."""
        tick = self._chain
        self._groups[tick].update(dict.fromkeys(keys))
        self._group.update(dict.fromkeys(keys, tick))
        self._depth.update(zip(keys, range(first_depth, first_depth + len(keys))))
        self._tick += len(keys)
        self._last_depth = first_depth + len(keys) - 1

    def _link(self, key: K, depth: int) -> None:
        """Place ``key`` (in no group now) as a fresh access at ``depth``: joins the chain being
        extended when it follows on, else starts one."""
        self._tick += 1
        groups = self._groups
        if depth == self._last_depth + 1 and self._chain in groups:
            tick = self._chain
            groups[tick][key] = None
        else:
            tick = self._chain = self._tick
            groups[tick] = {key: None}
        self._group[key] = tick
        self._depth[key] = depth
        self._last_depth = depth

    def remove_many(self, keys: Iterable[K]) -> None:
        group, groups, depth_of = self._group, self._groups, self._depth
        for k in keys:
            tick = group.pop(k, None)
            if tick is None:
                continue
            depth_of.pop(k, None)
            left = groups[tick]
            del left[k]
            if not left:
                del groups[tick]

    def remove(self, key: K) -> None:
        tick = self._group.pop(key, None)
        if tick is None:
            return
        self._depth.pop(key, None)
        keys = self._groups[tick]
        del keys[key]
        if not keys:
            del self._groups[tick]

    def victims(self, n: int, skip: Callable[[K], bool] | None) -> list[K]:
        groups = self._groups.values()
        return take(chain.from_iterable(reversed(keys) for keys in groups), n, skip)

    def tracked(self) -> KeysView[K]:
        return self._group.keys()

    def __len__(self) -> int:
        return len(self._group)

    def __contains__(self, key: object) -> bool:
        return key in self._group
