"""Least frequently used first; ties go least recently used first.

Keys sit in one insertion-ordered bucket per access count; a hit moves a key to the next
bucket's end. ``victims`` walks buckets from the lowest count, so a round costs O(buckets +
victims), not a sort of the whole tier.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
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

    def victims(self, n: int, skip: Callable[[K], bool] | None) -> list[K]:
        buckets = self._buckets
        return take(chain.from_iterable(buckets[c] for c in sorted(buckets)), n, skip)

    def __len__(self) -> int:
        return len(self._count)

    def __contains__(self, key: object) -> bool:
        return key in self._count
