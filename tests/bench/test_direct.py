"""The direct engine (the store's eviction policy driven without the store around it) counts
what the store loop counts, field for field, for every registered policy, capacity and
watermark setting; and it is used only for one tier."""

from __future__ import annotations

import random

import pytest

from kvferry.bench import hitrate
from kvferry.bench.hitrate import SimCase, TierSpec, direct, simulate, sweep
from kvferry.bench.traces import Trace, TraceRequest
from kvferry.config.models import KvferryConfig
from kvferry.errors import ConfigError
from kvferry.store.eviction import POLICIES

POLICY_NAMES = POLICIES.names()


def _random_trace(seed: int, requests: int = 120) -> Trace:
    """Prefix chains down a small tree (shared prefixes), unordered draws from a small pool
    with repeats inside a request, and empty requests."""
    rnd = random.Random(seed)
    reqs = []
    for i in range(requests):
        n = rnd.randint(0, 14)
        kind = rnd.random()
        if kind < 0.4:
            ids = [rnd.randrange(30) for _ in range(n)]  # repeats allowed
        else:
            ids, node = [], 0
            for _ in range(n):
                node = node * 3 + rnd.randint(1, 3)
                ids.append(node)
            if ids and kind > 0.9:
                ids.insert(rnd.randrange(len(ids)), ids[0])  # a chain naming a block twice
        tokens = max(1, len(ids) * 16 - rnd.randint(0, 15))
        reqs.append(TraceRequest(i + 1, float(i), tokens, 1, ids))
    return Trace("random", 16, reqs)


def _watermarks(policy: str, threshold: float, ratio: float) -> KvferryConfig:
    return hitrate.sim_store_config(policy, evict_start_threshold=threshold, evict_ratio=ratio)


def test_every_builtin_policy_is_covered() -> None:
    assert set(POLICY_NAMES) >= {"lru", "lfu", "fifo", "length-aware"}


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("seed", range(12))
def test_random_traces_count_the_same_as_the_store(policy: str, seed: int) -> None:
    trace = _random_trace(seed)
    keys = hitrate.trace_keys(trace)
    for cap in (1, 2, 3, 7, 20, 60, None):
        for config in (None, _watermarks(policy, 0.8, 0.1), _watermarks(policy, 0.5, 0.3)):
            tiers = [TierSpec("cpu", cap)]
            loop = simulate(trace, tiers, policy=policy, config=config, keys=keys, engine="store")
            got = simulate(trace, tiers, policy=policy, config=config, keys=keys, engine="direct")
            assert (loop.engine, got.engine) == ("store", "direct")
            assert got.counted() == loop.counted(), (seed, cap, config and config.store)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_real_trace_counts_the_same_as_the_store(mooncake: Trace, policy: str) -> None:
    keys = hitrate.trace_keys(mooncake)
    for cap in (195, 1953, 19531, None):
        tiers = [TierSpec("cpu", cap)]
        loop = simulate(mooncake, tiers, policy=policy, keys=keys, engine="store")
        got = simulate(mooncake, tiers, policy=policy, keys=keys)
        assert got.engine == ("stack" if policy == "lru" and cap != 195 else "direct")
        assert got.counted() == loop.counted(), cap
        if cap is not None and cap < 43924:  # fewer than the trace's distinct blocks
            assert got.evictions > 0 and 0 < got.block_hit_rate < 1


def test_a_pipeline_is_not_for_the_direct_engine(mooncake: Trace) -> None:
    small = Trace(mooncake.path, mooncake.block_tokens, mooncake.requests[:200])
    two = [TierSpec("cpu", 500), TierSpec("disk", 2000)]
    assert simulate(small, two, policy="lfu").engine == "store"
    with pytest.raises(hitrate.HitRateError, match="engine 'direct' is not exact here: 2 tiers"):
        simulate(small, two, policy="lfu", engine="direct")
    cases = [SimCase("fifo", [TierSpec("cpu", 800)]), SimCase("fifo", two)]
    with pytest.raises(hitrate.HitRateError, match="not exact for fifo cpu:500\\+disk:2000"):
        sweep(small, cases, engine="direct")
    assert direct.refusal(1) is None


def test_sweep_runs_direct_cases_in_workers_with_progress(mooncake: Trace) -> None:
    small = Trace(mooncake.path, mooncake.block_tokens, mooncake.requests[:600])
    cases = [SimCase(p, [TierSpec("cpu", 2000)]) for p in ("fifo", "lfu", "length-aware")]
    seen: list[tuple[int, int, int]] = []
    forked = sweep(small, cases, jobs=2, on_progress=lambda *a: seen.append(a))
    here = sweep(small, cases, jobs=1)
    loop = sweep(small, cases, jobs=1, engine="store")
    assert [r.engine for r in forked] == ["direct"] * 3 == [r.engine for r in here]
    assert (
        [r.counted() for r in forked] == [r.counted() for r in here] == [r.counted() for r in loop]
    )
    assert {i for i, done, total in seen if done == total == 600} == {0, 1, 2}


def test_a_policy_given_by_path_and_an_unknown_one() -> None:
    trace = _random_trace(3)
    tiers = [TierSpec("cpu", 9)]
    by_path = simulate(trace, tiers, policy="kvferry.store.eviction.lfu:LfuPolicy")
    assert by_path.engine == "direct"
    assert by_path.counted() | {"policy": "lfu"} == simulate(trace, tiers, policy="lfu").counted()
    with pytest.raises(ConfigError, match="eviction policy"):
        simulate(trace, tiers, policy="nope")


def test_a_policy_without_a_fast_view_counts_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tracked()`` of the base class (the policy itself, probed through ``__contains__``):
    what a plug-in policy that does not override it gets."""
    from kvferry.store.eviction.base import EvictionPolicy
    from kvferry.store.eviction.lfu import LfuPolicy

    trace = _random_trace(5)
    tiers = [TierSpec("cpu", 11)]
    fast = simulate(trace, tiers, policy="lfu", engine="direct")
    monkeypatch.setattr(LfuPolicy, "tracked", EvictionPolicy.tracked)
    assert LfuPolicy().tracked().__class__ is LfuPolicy
    assert simulate(trace, tiers, policy="lfu", engine="direct").counted() == fast.counted()
