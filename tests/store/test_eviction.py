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


@pytest.mark.parametrize("name", ["lru", "lfu", "fifo", "length-aware"])
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


@pytest.mark.parametrize("name", ["lru", "lfu", "fifo", "length-aware"])
@pytest.mark.parametrize("seed", range(5))
def test_batch_primitives_equal_their_key_by_key_definition(name: str, seed: int) -> None:
    """The fast batch paths (insert_many, touch_many, remove_many, insert_chain, touch_chain)
    leave exactly the state the contract's key-by-key calls leave, repeats and unknown keys
    included."""
    import random

    from kvferry.store.eviction.base import EvictionPolicy

    rng = random.Random(seed)
    fast, slow = load_policy(name)(), load_policy(name)()
    universe = [f"k{i}" for i in range(40)]
    for _ in range(400):
        keys = [rng.choice(universe) for _ in range(rng.randint(0, 8))]
        if rng.random() < 0.5:  # mostly fresh blocks, as a store's put sends them
            keys = list(dict.fromkeys(f"n{rng.randint(0, 10**6)}" for _ in keys))
            universe.extend(keys)
        op = rng.choice(["insert_many", "touch_many", "remove_many", "insert_chain", "touch_chain"])
        if op.endswith("_chain"):
            depth = rng.choice([0, 1, 3])
            getattr(fast, op)(keys, depth)
            getattr(EvictionPolicy, op)(slow, keys, depth)
        else:
            getattr(fast, op)(keys)
            getattr(EvictionPolicy, op)(slow, keys)
        assert len(fast) == len(slow)
        assert fast.victims(len(fast), None) == slow.victims(len(slow), None), op
        assert [fast.depth(k) for k in universe] == [slow.depth(k) for k in universe]


@pytest.mark.parametrize("name", ["lru", "lfu", "fifo", "length-aware"])
def test_tracked_is_a_live_view_of_the_keys(name: str) -> None:
    p = load_policy(name)()
    view = p.tracked()
    p.insert_many(["a", "b", "c"])
    p.insert_chain(["d"], 0)
    p.remove_many(["b"])
    assert [k in view for k in "abcde"] == [True, False, True, True, False]
    assert [k in view for k in "abcde"] == [k in p for k in "abcde"]
