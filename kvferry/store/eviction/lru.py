"""Least recently used first (the default): an insertion-ordered dict, hits move to the end."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from kvferry.store.eviction.base import EvictionPolicy, K


class LruPolicy(EvictionPolicy[K]):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()

    def insert(self, key: K) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: K) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: K) -> None:
        self._order.pop(key, None)

    def victims(self, n: int, skip: Callable[[K], bool]) -> list[K]:
        out: list[K] = []
        if n <= 0:
            return out
        for key in self._order:
            if not skip(key):
                out.append(key)
                if len(out) >= n:
                    break
        return out

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order
