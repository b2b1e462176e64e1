"""Least recently used first (the default): a plain dict in access order.

A plain dict keeps insertion order and costs about half of an OrderedDict per key (about 60
against 115 bytes here), which is most of the store's per-block bookkeeping; a hit moves a key
to the end by pop-and-reinsert. The holes a pop leaves are compacted when the dict resizes, so
iterating from the front (the oldest) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, KeysView, Sequence

from kvferry.store.eviction.base import EvictionPolicy, K, take


class LruPolicy(EvictionPolicy[K]):
    name = "lru"

    def __init__(self) -> None:
        self._order: dict[K, None] = {}

    def insert(self, key: K) -> None:
        order = self._order
        if key in order:
            del order[key]
        order[key] = None

    def touch(self, key: K) -> None:
        order = self._order
        if key in order:
            del order[key]
            order[key] = None

    def remove(self, key: K) -> None:
        self._order.pop(key, None)

    def insert_many(self, keys: Iterable[K]) -> None:
        order = self._order
        keys = keys if isinstance(keys, list) else list(keys)
        new = dict.fromkeys(keys)
        if len(new) == len(keys) and order.keys().isdisjoint(new):
            order.update(new)  # the usual case (new blocks, no repeats): one C-level pass
            return
        pop = order.pop
        for k in keys:
            pop(k, None)
            order[k] = None

    def touch_many(self, keys: Iterable[K]) -> None:
        order = self._order
        pop = order.pop
        for k in keys:
            if pop(k, 0) is None:  # present (its value is None): move it to the end
                order[k] = None

    def reorder(self, keys: Sequence[K]) -> None:
        self.touch_many(keys)  # a touch here is a move to the end; nothing is counted

    def remove_many(self, keys: Iterable[K]) -> None:
        pop = self._order.pop
        for k in keys:
            pop(k, None)

    def victims(self, n: int, skip: Callable[[K], bool] | None) -> list[K]:
        return take(self._order, n, skip)

    def tracked(self) -> KeysView[K]:
        return self._order.keys()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order
