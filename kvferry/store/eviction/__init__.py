"""Eviction policies behind one ABC and one registry: lru (default), lfu, fifo, length-aware."""

from __future__ import annotations

from typing import Any

from kvferry.plugins import Registry
from kvferry.store.eviction.base import EvictionPolicy

POLICIES = Registry(
    "eviction policy",
    {
        "lru": "kvferry.store.eviction.lru:LruPolicy",
        "lfu": "kvferry.store.eviction.lfu:LfuPolicy",
        "fifo": "kvferry.store.eviction.fifo:FifoPolicy",
        "length-aware": "kvferry.store.eviction.length_aware:LengthAwarePolicy",
    },
)


def load_policy(name: str) -> type[EvictionPolicy[Any]]:
    """The policy class registered as ``name`` (or a "module:Class" path).

    Raises:
        ConfigError: unknown name or not an EvictionPolicy.
    """
    return POLICIES.load(name, EvictionPolicy)  # type: ignore[type-abstract]


__all__ = ["POLICIES", "EvictionPolicy", "load_policy"]
