"""LRU's one-pass shortcut: its counts equal the store loop's, field for field, on the real trace
and on random ones; it is used only where that holds, and refuses clearly elsewhere."""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest

from kvferry.bench import hitrate
from kvferry.bench.hitrate import SimCase, TierSpec, simulate, sweep
from kvferry.bench.hitrate.lru_stack import LruStack, _count_less
from kvferry.bench.traces import Trace, TraceRequest, bundled_path
from kvferry.config.models import KvferryConfig
from kvferry.store.eviction.lru import LruPolicy


def _random_trace(seed: int, requests: int = 150, longest: int = 12, pool: int = 40) -> Trace:
    """Requests of two kinds: prefix chains down a small tree (shared prefixes, and the holes
    LRU leaves when it evicts a parent before its child) and unordered draws from a small set."""
    rnd = random.Random(seed)
    reqs = []
    for i in range(requests):
        n = rnd.randint(0, longest)
        if rnd.random() < 0.5:
            ids = list(dict.fromkeys(rnd.randrange(pool) for _ in range(n)))
        else:
            ids, node = [], 0
            for _ in range(n):
                node = node * 3 + rnd.randint(1, 3)
                ids.append(node)
        tokens = max(1, len(ids) * 16 - rnd.randint(0, 15))
        reqs.append(TraceRequest(i + 1, float(i), tokens, 1, ids))
    return Trace("random", 16, reqs)


def test_count_less_matches_brute_force() -> None:
    rng = np.random.default_rng(7)
    for n in (1, 2, 17, 300):
        values = rng.integers(0, n + 3, n)
        ends = rng.integers(0, n + 1, 200)
        bounds = rng.integers(0, n + 5, 200)
        want = [int(np.count_nonzero(values[:e] < b)) for e, b in zip(ends, bounds)]
        assert _count_less(values, ends, bounds).tolist() == want


@pytest.mark.parametrize("seed", range(40))
def test_random_traces_count_the_same_as_the_store(seed: int) -> None:
    trace = _random_trace(seed)
    stack = LruStack(trace)
    for cap in (12, 13, 20, 50, 400, None):
        tiers = [TierSpec("cpu", cap)]
        loop = simulate(trace, tiers, engine="store")
        short = simulate(trace, tiers, engine="stack", stack=stack)
        assert (loop.engine, short.engine) == ("store", "stack")
        assert short.counted() == loop.counted(), (seed, cap)


def test_real_trace_counts_the_same_as_the_store(mooncake: Trace) -> None:
    keys = hitrate.trace_keys(mooncake)
    stack = LruStack(mooncake)
    with open(bundled_path("mooncake-fig9"), newline="") as f:
        caps = [int(r["capacity_blocks"]) for r in csv.DictReader(f)][::3]
    for cap in [*caps, None]:
        tiers = [TierSpec("cpu", cap)]
        loop = simulate(mooncake, tiers, keys=keys, engine="store")
        assert simulate(mooncake, tiers, stack=stack).counted() == loop.counted(), cap
    assert stack.distinct == 43924 and stack.blocks == 121877


def test_auto_goes_elsewhere_where_the_shortcut_is_not_exact(mooncake: Trace) -> None:
    small = Trace(mooncake.path, mooncake.block_tokens, mooncake.requests[:300])
    longest = max(len(r.hash_ids) for r in small.requests)
    watermarks = hitrate.sim_store_config("lru", evict_start_threshold=0.9, evict_ratio=0.05)
    cases: list[tuple[list[TierSpec], str, KvferryConfig | None, str]] = [
        ([TierSpec("cpu", 2000)], "lfu", None, "policy 'lfu' is not lru"),
        ([TierSpec("cpu", 500), TierSpec("disk", 2000)], "lru", None, "2 tiers"),
        ([TierSpec("cpu", 2000)], "lru", watermarks, "watermarks"),
        ([TierSpec("cpu", longest - 1)], "lru", None, "below the longest request"),
    ]
    for tiers, policy, config, why in cases:
        auto = simulate(small, tiers, policy=policy, config=config)
        assert auto.engine == ("store" if len(tiers) > 1 else "direct")
        with pytest.raises(hitrate.HitRateError, match=why):
            simulate(small, tiers, policy=policy, config=config, engine="stack")
    assert simulate(small, [TierSpec("cpu", longest)]).engine == "stack"
    with pytest.raises(hitrate.HitRateError, match="engine must be one of"):
        simulate(small, [TierSpec("cpu", 10)], engine="fast")


def test_a_block_named_twice_in_a_request_is_not_for_the_stack() -> None:
    reqs = [TraceRequest(1, 0.0, 48, 1, [1, 2, 1]), TraceRequest(2, 1.0, 32, 1, [1, 2])]
    trace = Trace("twice", 16, reqs)
    assert LruStack(trace).exact_for(10) == "a request names the same block twice"
    r = simulate(trace, [TierSpec("cpu", 10)])
    assert r.engine == "direct" and r.tally.hit_blocks == 2


def test_sweep_mixes_the_two_and_keeps_case_order(mooncake: Trace) -> None:
    small = Trace(mooncake.path, mooncake.block_tokens, mooncake.requests[:400])
    cases = [
        SimCase("lfu", [TierSpec("cpu", 3000)]),
        SimCase("lru", [TierSpec("cpu", 3000)]),
        SimCase("lru", [TierSpec("cpu", 1000), TierSpec("disk", 2000)]),
        SimCase("lru", [TierSpec("cpu", None)]),
    ]
    seen: list[tuple[int, int, int]] = []
    got = sweep(small, cases, on_progress=lambda *a: seen.append(a))
    want = sweep(small, cases, engine="store")
    assert [r.engine for r in got] == ["direct", "stack", "store", "stack"]
    assert [r.engine for r in want] == ["store"] * 4
    assert [r.counted() for r in got] == [r.counted() for r in want]
    # every case reported its end under its own index
    assert {i for i, done, total in seen if done == total} == {0, 1, 2, 3}
    with pytest.raises(hitrate.HitRateError, match="not exact for lfu cpu:3000"):
        sweep(small, cases, engine="stack")


def test_advice_is_the_same_either_way(mooncake: Trace) -> None:
    small = Trace(mooncake.path, mooncake.block_tokens, mooncake.requests[:500])
    tiers = [TierSpec("cpu", None)]
    fast = hitrate.advise(small, tiers, 0.05)
    slow = hitrate.advise(small, tiers, 0.05, engine="store")
    assert fast == slow and fast.reachable and fast.runs > 5


def test_lru_recency_follows_the_order_of_a_put() -> None:
    """A put touches its present blocks before it inserts the others (so that making room
    never evicts them), then puts their recency back in the put's order."""
    from kvferry.backends.memory import MemoryTier
    from kvferry.store.tiered import TieredStore

    cfg = hitrate.sim_store_config("lru")
    store = TieredStore(cfg, tiers=[MemoryTier.sized(4, label="cpu", slot_size=4096)])
    v = memoryview(b"x")
    try:
        store.put([b"a", b"b", b"c"], [v] * 3)
        store.put([b"x", b"a"], [v] * 2)  # a is present, x new: a is now the newest
        store.put([b"y", b"z"], [v] * 2)  # evicts b and c
        store.put([b"w"], [v])  # evicts x, the oldest left
        assert store.contains([b"a", b"x", b"b", b"c"]) == [True, False, False, False]
    finally:
        store.close()
    policy: LruPolicy[str] = LruPolicy()
    policy.insert_many(["p", "q", "r"])
    policy.reorder(["r", "missing", "p"])
    assert policy.victims(3, None) == ["q", "r", "p"] and "missing" not in policy
