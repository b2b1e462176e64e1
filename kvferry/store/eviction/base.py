"""The eviction policy plug-in point: which unpinned blocks of a tier go first.

A policy only orders keys; it never touches bytes, tiers or pins. The store (and the hit-rate
simulator, unchanged) calls it under its own lock, so implementations need no locking.

Primitives and their contracts:

``insert(key)``
    A block entered the tier. Inserting a present key counts as an access.
``touch(key)``
    The block was read (a hit). Unknown keys are ignored.
``remove(key)``
    The block left the tier (deleted, evicted, lost). Unknown keys are ignored.
``victims(n, skip) -> list[key]``
    Up to ``n`` keys in eviction order, leaving out those for which ``skip(key)`` is true
    (pinned blocks); ``skip`` is None when nothing is pinned. Does not remove them: the store
    removes what it really evicts.
``reorder(keys)``
    A put just touched the present blocks of ``keys`` and then inserted the others: the
    tracked ones take their places as the most recent in ``keys``' order, with no access
    counted. Only a policy with a recency order (LRU) does anything; the base class nothing.
``__len__``, ``__contains__``
    Keys tracked.
``tracked() -> Container[key]``
    A live, read-only view of the keys tracked, whose ``in`` answers as ``__contains__`` does
    (a policy returns its own dict's ``keys()``, so a caller that probes many keys, such as
    the hit-rate lab's direct engine, pays no Python call per probe). The base class returns
    the policy itself.
``insert_many(keys)``, ``touch_many(keys)``, ``remove_many(keys)``
    The same for a batch, in order; the base class loops, a policy overrides them to go faster
    (the store calls these on its hot paths).

Optional, for policies that rank blocks by their depth in a prefix chain (``uses_depth = True``;
the store skips these calls for the others):

``set_depth(key, depth)``
    After ``insert``: the block is block number ``depth`` (0 = first) of its prefix chain. With
    chained hashes a key's depth never changes, so the store passes it whenever the caller told
    it (``put(..., depth=)``, ``get(..., depth=)``) or a demotion carries it down a tier.
    Unknown keys are ignored.
``depth(key) -> int | None``
    The depth recorded for a tracked key, None when unknown.
``insert_chain(keys, first_depth)``
    Consecutive blocks of one chain entered the tier, ``keys[i]`` at depth ``first_depth + i``:
    exactly ``insert(k); set_depth(k, d)`` key by key (what a put does).
``touch_chain(keys, first_depth)``
    The same blocks were read: exactly ``touch_many(keys)``, then ``set_depth(k, d)`` key by key
    (what a get does). The base class does both literally; a policy overrides them to do it in
    one pass.

Constructor shape: ``Policy()``; every policy is created fresh per tier.

Every policy registered in ``kvferry.store.eviction.POLICIES`` passes the conformance kit,
``kvferry.testing.eviction_kit.check_policy`` (tests/store/test_eviction.py runs it over the
registry); an out-of-tree policy's tests call it too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Container, Hashable, Iterable, Sequence
from itertools import islice
from typing import ClassVar, Generic, TypeVar

K = TypeVar("K", bound=Hashable)


def take(order: Iterable[K], n: int, skip: Callable[[K], bool] | None) -> list[K]:
    """The first ``n`` keys of ``order`` that ``skip`` lets through: ``victims`` of a policy is
    this over its eviction order."""
    if n <= 0:
        return []
    if skip is None:
        return list(islice(order, n))
    return list(islice((k for k in order if not skip(k)), n))


class EvictionPolicy(ABC, Generic[K]):
    """Orders the blocks of one tier for eviction."""

    name: ClassVar[str]
    uses_depth: ClassVar[bool] = False

    def set_depth(self, key: K, depth: int) -> None:
        """Record the depth of a tracked block (policies with ``uses_depth``)."""

    def depth(self, key: K) -> int | None:
        """The depth recorded for ``key``; None when unknown or not tracked."""
        return None

    def insert_chain(self, keys: Sequence[K], first_depth: int) -> None:
        """Insert consecutive chain blocks, ``keys[i]`` at depth ``first_depth + i``."""
        for i, k in enumerate(keys):
            self.insert(k)
            self.set_depth(k, first_depth + i)

    def touch_chain(self, keys: Sequence[K], first_depth: int) -> None:
        """Touch consecutive chain blocks, ``keys[i]`` at depth ``first_depth + i``."""
        self.touch_many(keys)
        for i, k in enumerate(keys):
            self.set_depth(k, first_depth + i)

    @abstractmethod
    def insert(self, key: K) -> None: ...

    @abstractmethod
    def touch(self, key: K) -> None: ...

    @abstractmethod
    def remove(self, key: K) -> None: ...

    @abstractmethod
    def victims(self, n: int, skip: Callable[[K], bool] | None) -> list[K]: ...

    def insert_many(self, keys: Iterable[K]) -> None:
        for k in keys:
            self.insert(k)

    def touch_many(self, keys: Iterable[K]) -> None:
        for k in keys:
            self.touch(k)

    def remove_many(self, keys: Iterable[K]) -> None:
        for k in keys:
            self.remove(k)

    def reorder(self, keys: Sequence[K]) -> None:
        """Put the tracked ``keys`` back in this order as the most recent, counting no access
        (policies with a recency order; the others ignore it)."""

    def tracked(self) -> Container[K]:
        """A live read-only view of the tracked keys, for fast ``in`` (see the module doc)."""
        return self

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...
