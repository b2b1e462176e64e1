"""Eviction policies: the order each one evicts in, and every registered policy passes the
conformance kit (``kvferry.testing.eviction_kit``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest

from kvferry.errors import ConfigError
from kvferry.store.eviction import POLICIES, load_policy
from kvferry.store.eviction.lru import LruPolicy
from kvferry.testing.eviction_kit import check_policy


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


@pytest.mark.parametrize("name", POLICIES.names())
def test_no_pins_gives_the_same_order_as_a_skip_that_skips_nothing(name: str) -> None:
    p = load_policy(name)()
    for k in "abcdef":
        p.insert(k)
    p.touch("b")
    p.touch("a")
    for n in range(7):
        assert p.victims(n, None) == p.victims(n, lambda k: False)


def test_length_aware_evicts_chains_by_recency_and_each_chain_tail_first() -> None:
    p = load_policy("length-aware")()
    assert p.uses_depth

    def access(keys: str, first_depth: int = 0, *, insert: bool = True) -> None:
        for k in keys:
            p.insert(k) if insert else p.touch(k)
        for d, k in enumerate(keys, start=first_depth):
            p.set_depth(k, d)

    access("abc")  # chain 1: a is block 0
    access("xyz")  # chain 2, more recent
    assert p.depth("c") == 2 and p.depth("nobody") is None
    assert p.victims(6, None) == ["c", "b", "a", "z", "y", "x"]
    access("ab", insert=False)  # a request hits a, b of chain 1 ...
    access("d", 2)  # ... and stores its own block 2: one access, depths 0..2
    assert p.victims(6, None) == ["c", "z", "y", "x", "d", "b"]
    assert p.victims(2, lambda k: k == "z") == ["c", "y"]
    p.remove("c")
    p.remove("y")
    assert p.victims(2, None) == ["z", "x"] and len(p) == 5
    p.set_depth("nobody", 9)  # unknown keys are ignored
    assert "nobody" not in p


def test_without_depths_length_aware_is_lru() -> None:
    lru, la = load_policy("lru")(), load_policy("length-aware")()
    for p in (lru, la):
        for k in "abcde":
            p.insert(k)
        p.touch("c")
        p.insert("a")
    assert la.victims(5, None) == lru.victims(5, None)


@pytest.mark.parametrize("name", POLICIES.names())
def test_every_registered_policy_passes_the_conformance_kit(name: str) -> None:
    """Every name in the registry, so a new policy is checked without editing this test."""
    check_policy(lambda: load_policy(name)(), seeds=5)


class _IgnoresPins(LruPolicy[bytes]):
    """LRU whose victims ignore the pins: what the kit exists to catch."""

    def victims(self, n: int, skip: Callable[[bytes], bool] | None) -> list[bytes]:
        return super().victims(n, None)


class _ForgetsNothing(LruPolicy[bytes]):
    """LRU whose remove_many does nothing: its batch form differs from its definition."""

    def remove_many(self, keys: Iterable[bytes]) -> None:
        return None


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (_IgnoresPins, "pinned key"),
        (_ForgetsNothing, "remove_many did not forget"),
    ],
)
def test_the_kit_catches_a_broken_policy(policy: type[LruPolicy[bytes]], message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_policy(policy)
