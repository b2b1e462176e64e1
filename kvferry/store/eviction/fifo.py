"""First in, first out: insertion order only; hits do not reorder."""

from __future__ import annotations

from collections.abc import Iterable

from kvferry.store.eviction.base import K
from kvferry.store.eviction.lru import LruPolicy


class FifoPolicy(LruPolicy[K]):
    name = "fifo"

    def insert(self, key: K) -> None:
        if key not in self._order:
            self._order[key] = None

    def touch(self, key: K) -> None:
        return None

    def insert_many(self, keys: Iterable[K]) -> None:
        order = self._order
        new = dict.fromkeys(keys)  # first occurrence order, as the loop below keeps it
        if order.keys().isdisjoint(new):
            order.update(new)
            return
        for k in new:
            if k not in order:
                order[k] = None

    def touch_many(self, keys: Iterable[K]) -> None:
        return None
