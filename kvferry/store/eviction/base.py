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
    (pinned blocks). Does not remove them: the store removes what it really evicts.
``__len__``, ``__contains__``
    Keys tracked.

Constructor shape: ``Policy()``; every policy is created fresh per tier.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from typing import ClassVar, Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class EvictionPolicy(ABC, Generic[K]):
    """Orders the blocks of one tier for eviction."""

    name: ClassVar[str]

    @abstractmethod
    def insert(self, key: K) -> None: ...

    @abstractmethod
    def touch(self, key: K) -> None: ...

    @abstractmethod
    def remove(self, key: K) -> None: ...

    @abstractmethod
    def victims(self, n: int, skip: Callable[[K], bool]) -> list[K]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...
