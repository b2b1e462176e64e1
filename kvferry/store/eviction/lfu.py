"""Least frequently used first; ties go least recently used first.

Keys sit in one insertion-ordered bucket per access count; a hit moves a key to the next
bucket's end. ``victims`` walks buckets from the lowest count, so a round costs O(buckets +
victims), not a sort of the whole tier.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, KeysView
from itertools import chain

from kvferry.store.eviction.base import EvictionPolicy, K, take


class LfuPolicy(EvictionPolicy[K]):
    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[K, int] = {}
        self._buckets: dict[int, OrderedDict[K, None]] = {}

    def insert(self, key: K) -> None:
        if key in self._count:
            self.touch(key)
            return
        self._count[key] = 1
        self._buckets.setdefault(1, OrderedDict())[key] = None

    def touch(self, key: K) -> None:
        c = self._count.get(key)
        if c is None:
            return
        bucket = self._buckets[c]
        del bucket[key]
        if not bucket:
            del self._buckets[c]
        self._count[key] = c + 1
        self._buckets.setdefault(c + 1, OrderedDict())[key] = None

    def remove(self, key: K) -> None:
        c = self._count.pop(key, None)
        if c is None:
            return
        bucket = self._buckets[c]
        del bucket[key]
        if not bucket:
            del self._buckets[c]

    def insert_many(self, keys: Iterable[K]) -> None:
        keys = keys if isinstance(keys, list) else list(keys)
        new = dict.fromkeys(keys, 1)
        if len(new) == len(keys) and self._count.keys().isdisjoint(new):
            self._count.update(new)  # the usual case: new blocks, no repeats
            self._buckets.setdefault(1, OrderedDict()).update(dict.fromkeys(keys))
            return
        for k in keys:
            self.insert(k)

    def touch_many(self, keys: Iterable[K]) -> None:
        count, buckets = self._count, self._buckets
        for k in keys:
            c = count.get(k)
            if c is None:
                continue
            bucket = buckets[c]
            del bucket[k]
            if not bucket:
                del buckets[c]
            count[k] = c + 1
            up = buckets.get(c + 1)
            if up is None:
                up = buckets[c + 1] = OrderedDict()
            up[k] = None

    def remove_many(self, keys: Iterable[K]) -> None:
        count, buckets = self._count, self._buckets
        for k in keys:
            c = count.pop(k, None)
            if c is None:
                continue
            bucket = buckets[c]
            del bucket[k]
            if not bucket:
                del buckets[c]

    def victims(self, n: int, skip: Callable[[K], bool] | None) -> list[K]:
        buckets = self._buckets
        return take(chain.from_iterable(buckets[c] for c in sorted(buckets)), n, skip)

    def tracked(self) -> KeysView[K]:
        return self._count.keys()

    def __len__(self) -> int:
        return len(self._count)

    def __contains__(self, key: object) -> bool:
        return key in self._count
