"""The hit-rate lab: simulation on the real trace against the published curve, replay against
real tiers equal to the simulation, capacity advice, and bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from kvferry.bench import hitrate
from kvferry.bench.hitrate import TierSpec, advise, replay, simulate, trace_keys
from kvferry.bench.traces import Trace, bundled_path
from kvferry.config.models import KvferryConfig
from kvferry.errors import ConfigError


def _head(trace: Trace, n: int) -> Trace:
    return Trace(trace.path, trace.block_tokens, trace.requests[:n])


def test_lru_token_weighted_follows_figure_9(mooncake: Trace) -> None:
    keys = trace_keys(mooncake)
    with open(bundled_path("mooncake-fig9"), newline="") as f:
        curve = [(int(r["capacity_blocks"]), float(r["hit_rate"])) for r in csv.DictReader(f)]
    assert len(curve) == 10
    for blocks, published in curve:
        got = simulate(mooncake, [TierSpec("cpu", blocks)], policy="lru", keys=keys)
        assert abs(got.token_hit_rate - published) <= 0.02, (blocks, got.token_hit_rate)
        assert got.tally.blocks == 121877
    # past the distinct blocks nothing is evicted: the infinite-cache figures
    big = simulate(mooncake, [TierSpec("cpu", None)], keys=keys)
    assert big.block_hit_rate == pytest.approx(1 - 43924 / 121877)
    assert big.evictions == 0


def test_rates_are_labelled_and_consistent(mooncake: Trace) -> None:
    r = simulate(_head(mooncake, 600), [TierSpec("cpu", 800)], policy="lfu")
    j = r.to_json()
    t = r.tally
    assert j["block_hit_rate"] == t.hit_blocks / t.blocks
    assert j["token_hit_rate"] == t.hit_tokens / t.tokens
    assert j["request_mean_hit_rate"] == pytest.approx(t.hit_fraction_sum / t.requests)
    assert j["tier_hit_blocks"] == {"cpu": t.hit_blocks}
    assert 0 < r.block_hit_rate < 1 and r.evictions > 0


def test_two_tiers_split_hits_and_move_blocks(mooncake: Trace) -> None:
    r = simulate(mooncake, [TierSpec("cpu", 1000), TierSpec("disk", 9000)], policy="lru")
    one = simulate(mooncake, [TierSpec("cpu", 10000)], policy="lru")
    hits = r.tier_hit_blocks
    assert hits["cpu"] > 0 and hits["disk"] > 0
    assert hits["cpu"] + hits["disk"] == r.tally.hit_blocks
    assert r.demotions > 0 and r.promotions == hits["disk"]
    # promotion copies a hit up, so the two tiers hold fewer distinct blocks than one of 10000
    assert r.block_hit_rate <= one.block_hit_rate + 1e-9
    assert r.block_hit_rate > simulate(mooncake, [TierSpec("cpu", 1000)]).block_hit_rate


@pytest.mark.parametrize("policy", ["lru", "length-aware"])
def test_replay_hit_rate_equals_simulation(mooncake: Trace, policy: str) -> None:
    trace = _head(mooncake, 1500)
    config = KvferryConfig.model_validate(
        {"store": {"tiers": ["cpu"], "eviction_policy": policy}, "cpu": {"buffer_number": 700}}
    )
    real = replay(trace, config, kv_bytes_per_token=8)  # 4 KiB blocks
    assert real.tiers == [TierSpec("cpu", 700)]
    assert real.replay is not None and real.replay["corrupt_blocks"] == 0
    sim = simulate(trace, real.tiers, policy=policy, config=config)
    assert real.tally == sim.tally
    assert 0 < real.block_hit_rate < 1
    r = real.replay
    assert r["bytes_written"] == (real.tally.blocks - real.tally.hit_blocks) * 4096
    assert r["bytes_read"] == real.tally.hit_blocks * 4096
    assert 0 < r["write_ratio"] < 1 and r["qps"] > 0
    assert r["request_latency_us"]["count"] == 1500


def test_replay_through_cpu_and_disk_equals_simulation(mooncake: Trace, tmp_path: Path) -> None:
    trace = _head(mooncake, 800)
    config = KvferryConfig.model_validate(
        {
            "store": {"tiers": ["cpu", "disk"]},
            "cpu": {"buffer_number": 300},
            "disk": {"path": str(tmp_path / "disk"), "capacity": "8MiB"},
        }
    )
    real = replay(trace, config, kv_bytes_per_token=8)
    assert [t.name for t in real.tiers] == ["cpu", "disk"]
    sim = simulate(trace, real.tiers, policy="lru", config=config)
    assert real.tally == sim.tally
    assert real.tier_hit_blocks == sim.tier_hit_blocks
    assert real.tier_hit_blocks["disk"] > 0
    assert real.replay is not None and real.replay["corrupt_blocks"] == 0


def test_replay_paces_at_scaled_timestamps(mooncake: Trace) -> None:
    trace = _head(mooncake, 40)  # spans 0..~? ms in the trace
    span_ms = trace.requests[-1].timestamp_ms - trace.requests[0].timestamp_ms
    now = [0.0]
    slept: list[float] = []

    def clock() -> float:
        return now[0]

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    config = KvferryConfig.model_validate(
        {"store": {"tiers": ["cpu"]}, "cpu": {"buffer_number": 64}}
    )
    replay(trace, config, kv_bytes_per_token=8, speedup=10.0, clock=clock, sleep=sleep)
    assert sum(slept) == pytest.approx(span_ms / 1000 / 10)


def test_advice_finds_the_smallest_capacity(mooncake: Trace) -> None:
    trace = _head(mooncake, 1200)
    keys = trace_keys(trace)
    a = advise(trace, [TierSpec("cpu", None)], 0.15, policy="lru", keys=keys)
    assert a.reachable
    cap = a.tiers[-1].capacity_blocks
    assert cap is not None
    assert simulate(trace, [TierSpec("cpu", cap)], keys=keys).block_hit_rate >= 0.15
    assert simulate(trace, [TierSpec("cpu", cap - 1)], keys=keys).block_hit_rate < 0.15
    split = advise(trace, [TierSpec("cpu", 200), TierSpec("disk", None)], 0.15, keys=keys)
    assert split.tiers[0] == TierSpec("cpu", 200) and split.reachable
    never = advise(trace, [TierSpec("cpu", None)], 0.99, keys=keys)
    assert not never.reachable and never.block_hit_rate < 0.99


def test_sizes_and_geometry() -> None:
    assert hitrate.kv_bytes_per_token("32,8,128,bf16") == 131072
    per_block = 131072 * 512
    assert hitrate.parse_capacity("5000", None) == 5000
    assert hitrate.parse_capacity("64GiB", per_block) == (64 << 30) // per_block
    tiers = hitrate.parse_tiers("cpu:100,disk", None)
    assert tiers == [TierSpec("cpu", 100), TierSpec("disk", None)]


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: hitrate.kv_bytes_per_token("32,8,128"), "layers,kv_heads,head_dim,dtype"),
        (lambda: hitrate.kv_bytes_per_token("32,8,128,fp12"), "unknown dtype"),
        (lambda: hitrate.kv_bytes_per_token("0,8,128,bf16"), "layers must be"),
        (lambda: hitrate.parse_capacity("4GiB", None), "give the KV geometry"),
        (lambda: hitrate.parse_capacity("lots", None), "neither a block count"),
        (lambda: hitrate.parse_capacity("0", None), "holds no block"),
        (lambda: hitrate.parse_tiers("cpu,disk:5", None), "needs a capacity"),
        (lambda: hitrate.parse_tiers("cpu:5,cpu:6", None), "named twice"),
    ],
)
def test_bad_input_is_a_clear_error(call: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        call()  # type: ignore[operator]


def test_sweep_in_worker_processes_equals_the_runs_one_by_one(mooncake: Trace) -> None:
    trace = _head(mooncake, 1500)
    cases = [
        hitrate.SimCase(policy, [TierSpec("cpu", cap)])
        for policy in ("lru", "length-aware")
        for cap in (300, 3000)
    ] + [hitrate.SimCase("lfu", [TierSpec("cpu", 200), TierSpec("disk", 900)])]
    seen: dict[int, tuple[int, int]] = {}

    def progress(i: int, done: int, total: int) -> None:
        seen[i] = (done, total)

    forked = hitrate.sweep(trace, cases, jobs=2, on_progress=progress)
    here = hitrate.sweep(trace, cases, jobs=1)

    def same(r: hitrate.HitRateResult) -> dict[str, object]:
        j = r.to_json()
        return {k: v for k, v in j.items() if k not in ("seconds", "lookups_per_s")}

    assert [same(r) for r in forked] == [same(r) for r in here]
    assert [(r.policy, r.tiers) for r in forked] == [(c.policy, c.tiers) for c in cases]
    assert all(r.seconds > 0 for r in forked)
    assert seen == {i: (1500, 1500) for i in range(len(cases))}
    with pytest.raises(hitrate.HitRateError, match="jobs must be at least 1"):
        hitrate.sweep(trace, cases, jobs=0)
