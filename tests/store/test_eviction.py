"""Eviction policies: the order each one evicts in, and pinned keys are skipped."""

from __future__ import annotations

import pytest

from kvferry.errors import ConfigError
from kvferry.store.eviction import load_policy


def test_lru_order_and_touch() -> None:
    p = load_policy("lru")()
    for k in "abcd":
        p.insert(k)
    p.touch("a")
    assert p.victims(2, lambda k: False) == ["b", "c"]
    assert p.victims(2, lambda k: k == "b") == ["c", "d"]
    p.remove("c")
    assert "c" not in p and len(p) == 3


def test_fifo_ignores_hits() -> None:
    p = load_policy("fifo")()
    for k in "abc":
        p.insert(k)
    p.touch("a")
    p.insert("a")
    assert p.victims(3, lambda k: False) == ["a", "b", "c"]


def test_lfu_least_frequent_then_oldest() -> None:
    p = load_policy("lfu")()
    for k in "abcd":
        p.insert(k)
    p.touch("a")
    p.touch("a")
    p.touch("c")
    assert p.victims(4, lambda k: False) == ["b", "d", "c", "a"]
    p.remove("b")
    assert p.victims(1, lambda k: k == "d") == ["c"]
    assert p.victims(0, lambda k: False) == []


def test_unknown_policy() -> None:
    with pytest.raises(ConfigError, match="unknown eviction policy 'mru'"):
        load_policy("mru")
