"""kvferry tune (issue 24, part 2): the search on synthetic objectives with known optima (it
finds them, adopts nothing on a flat or noisy objective, never adopts a value that lost a round,
and stops at its budget), one real short transfer tune, the cache tuner against the hit-rate
lab, and the CLI's files and errors."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from kvferry.bench.hitrate import HitRateOptions
from kvferry.bench.hitrate import run as run_hitrate
from kvferry.bench.result import Ratio, load_result
from kvferry.bench.store import StoreBenchOptions
from kvferry.bench.tune.cache import CacheTuneOptions
from kvferry.bench.tune.cache import tune as tune_cache
from kvferry.bench.tune.report import TuneReport, from_transfer
from kvferry.bench.tune.search import MIN_GAIN, SearchResult, Step, coordinate_search, helped
from kvferry.bench.tune.store import StoreTuneOptions, StoreTuneResult
from kvferry.bench.tune.store import tune as tune_store
from kvferry.bench.tune.transfer import TransferTuneOptions, TransferTuneResult
from kvferry.bench.tune.transfer import tune as tune_transfer
from kvferry.cli.main import main
from kvferry.config.loader import load_config
from kvferry.errors import ConfigError
from kvferry.report.build import build_report

SPACE = {"a": ("1", "2", "3"), "b": ("x", "y"), "c": ("on",)}
# per-knob scores: the optimum is a=2, b=y, c unchanged (its one value is worse)
SCORES = {"a": {"0": 1.0, "1": 1.2, "2": 1.5, "3": 1.1}, "b": {"w": 1.0, "x": 0.9, "y": 1.3},
          "c": {"off": 1.0, "on": 0.7}}  # fmt: skip
START = {"a": "0", "b": "w", "c": "off"}


def score(config: Mapping[str, str]) -> float:
    value = 1.0
    for knob, table in SCORES.items():
        value *= table[config.get(knob, START[knob])]
    return value


def synthetic(noise: float = 0.0, rounds: int = 3):  # type: ignore[no-untyped-def]
    """A measure: candidate / best per round, each round off by a fixed pattern of +-noise."""
    pattern = itertools.cycle([1 + noise, 1 - noise, 1.0])

    def measure(best: Mapping[str, str], candidate: Mapping[str, str]) -> list[float]:
        full = {**START, **best}
        ratio = score({**full, **candidate}) / score(full)
        return [ratio * next(pattern) for _ in range(rounds)]

    return measure


def test_the_search_finds_the_known_optimum() -> None:
    result = coordinate_search(
        SPACE, synthetic(0.02), higher_better=True, budget_s=1e9, start=START
    )
    assert result.best == {"a": "2", "b": "y"}
    for step in result.steps:  # never a value that lost a round
        assert step.adopted == (min(step.ratios) > 1 and sorted(step.ratios)[1] >= 1 + MIN_GAIN)


def test_a_flat_or_noisy_objective_adopts_nothing() -> None:
    def flat(best: Mapping[str, str], candidate: Mapping[str, str]) -> list[float]:
        return [1.02, 1.03, 1.01]  # every round better, but within the 5% margin

    assert coordinate_search(SPACE, flat, higher_better=True, budget_s=1e9).best == {}

    def mixed(best: Mapping[str, str], candidate: Mapping[str, str]) -> list[float]:
        return [1.5, 0.9, 1.5]  # a big median, one round lost

    assert coordinate_search(SPACE, mixed, higher_better=True, budget_s=1e9).best == {}


def test_lower_is_better_objectives_search_downwards() -> None:
    def inverse(best: Mapping[str, str], candidate: Mapping[str, str]) -> list[float]:
        return [1 / r for r in synthetic()(best, candidate)]

    result = coordinate_search(SPACE, inverse, higher_better=False, budget_s=1e9, start=START)
    assert result.best == {"a": "2", "b": "y"}
    assert helped([0.8, 0.85, 0.9], higher_better=False)
    assert not helped([0.8, 1.01, 0.9], higher_better=False)


def test_the_budget_stops_the_search_and_lists_what_it_left() -> None:
    now = [0.0]

    def measure(best: Mapping[str, str], candidate: Mapping[str, str]) -> list[float]:
        now[0] += 10.0  # every measurement costs 10 s
        return [1.0, 1.0, 1.0]

    result = coordinate_search(
        SPACE, measure, higher_better=True, budget_s=25.0, clock=lambda: now[0]
    )
    assert len(result.steps) == 2  # a third would end at 30 s > 25 s
    assert result.untried == [("a", "3"), ("b", "x"), ("b", "y"), ("c", "on")]


def test_bad_search_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="nothing to tune"):
        coordinate_search({}, synthetic(), higher_better=True, budget_s=1)
    with pytest.raises(ConfigError, match="--budget"):
        coordinate_search(SPACE, synthetic(), higher_better=True, budget_s=0)
    with pytest.raises(ConfigError, match="--objective 'speed'"):
        TransferTuneOptions(objective="speed")
    with pytest.raises(ConfigError, match="not a transfer key"):
        TransferTuneOptions(space={"store.slot_size": ("4KiB",)})
    with pytest.raises(ConfigError, match=r"transfer\.workers"):
        TransferTuneOptions(space={"transfer.workers": ("0",)})


@pytest.mark.slow
def test_a_real_transfer_tune_measures_every_candidate() -> None:
    options = TransferTuneOptions(
        block_size=64 << 10,
        batch_size=4,
        rounds=2,
        duration=0.2,
        space={"transfer.workers": ("2",), "transfer.vectored_io": ("false",)},
    )
    result = tune_transfer(options)
    steps = result.search.steps
    assert [(s.knob, s.value) for s in steps] == [
        ("transfer.workers", "2"),
        ("transfer.vectored_io", "false"),
    ]
    assert all(len(s.ratios) == 2 and all(r > 0 for r in s.ratios) for s in steps)
    adopted = {s.knob: s.value for s in steps if s.adopted}
    assert result.search.best == adopted  # only measured winners
    assert all(min(s.ratios) > 1 for s in steps if s.adopted)
    assert (result.final_ratio is not None) == bool(adopted)
    # recommended only when the final interleaved run confirms it in every round
    assert result.tuned in ({}, adopted)
    if result.tuned:
        assert min(result.final_rounds) > 1


def test_a_pick_the_final_run_does_not_confirm_is_not_recommended() -> None:
    options = TransferTuneOptions()
    search = SearchResult(best={"transfer.slice_size": "1MiB"})
    for rounds, confirmed in (([1.2, 1.1, 1.3], True), ([1.2, 0.97, 1.3], False), ([], False)):
        final = Ratio("bw_gbps", "a", "b", 1.2, rounds) if rounds else None
        result = TransferTuneResult(options=options, search=search, final_ratio=final)
        assert result.confirmed == confirmed
        assert result.tuned == ({"transfer.slice_size": "1MiB"} if confirmed else {})


@pytest.mark.slow
def test_a_real_store_tune_measures_alternating_pairs() -> None:
    bench = StoreBenchOptions(
        backend="cpu", value_size=16 << 10, batch_size=8, num_keys=256, duration=0.2, warmup=0.05
    )
    options = StoreTuneOptions(
        bench=bench, capacity=64 << 20, rounds=2, space={"cpu.checksum": ("off", "on")}
    )
    result = tune_store(options)
    steps = result.search.steps
    assert [(s.knob, s.value) for s in steps][:1] == [("cpu.checksum", "off")]
    assert all(len(s.ratios) == 2 and all(r > 0 for r in s.ratios) for s in steps)
    assert all(min(s.ratios) > 1 for s in steps if s.adopted)
    assert result.search.best == {s.knob: s.value for s in steps if s.adopted}
    # the final run (verify on) happens only for a winner, and gates the recommendation
    assert (len(result.final_rounds) == 3) == bool(result.search.best)
    assert result.tuned in ({}, result.search.best)
    with pytest.raises(ConfigError, match="no built-in knobs for backend 'redis'"):
        StoreTuneOptions(bench=StoreBenchOptions(backend="redis"))
    with pytest.raises(ConfigError, match="--objective 'fast'"):
        StoreTuneOptions(objective="fast")


@pytest.mark.slow
def test_cache_tuning_answers_both_questions_from_the_lab() -> None:
    target = tune_cache(
        CacheTuneOptions(
            trace="mooncake-synthetic",
            model_kv="32,8,128,bf16",
            target_hit_rate=0.3,
            policies=("lru", "fifo"),
        )
    )
    assert target.best is not None and target.best.capacity_blocks is not None
    assert all(c.block_hit_rate >= 0.3 for c in target.choices)
    assert target.best.capacity_blocks == min(c.capacity_blocks or 0 for c in target.choices)
    # LRU's answer is exact: one block less misses the target
    lru = next(c for c in target.choices if c.policy == "lru")
    assert lru.capacity_blocks is not None
    below = run_hitrate(
        HitRateOptions(
            trace="mooncake-synthetic", policies=["lru"], capacities=[lru.capacity_blocks - 1]
        )
    )
    assert below.cases[0].block_hit_rate < 0.3

    block = target.block_bytes
    assert block == 32 * 8 * 128 * 2 * 2 * 512  # layers x heads x dim x 2 B x (K, V) x tokens
    budget = tune_cache(
        CacheTuneOptions(
            trace="mooncake-synthetic",
            model_kv="32,8,128,bf16",
            memory_budget=5000 * block + 7,
            prefill_tokens_per_s=10000,
            policies=("lru", "lfu"),
        )
    )
    assert {c.capacity_blocks for c in budget.choices} == {5000}
    assert budget.best is not None
    assert budget.best.block_hit_rate == max(c.block_hit_rate for c in budget.choices)
    assert budget.best.seconds_saved_per_gb and budget.best.seconds_saved_per_gb > 0


@pytest.mark.slow
def test_the_cli_writes_a_config_file_that_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = tmp_path / "tuned.yaml", tmp_path / "tune.json"
    argv = ["tune", "transfer", "--block-size", "64KiB", "--batch-size", "4", "--rounds", "2"]
    argv += ["--duration", "0.2", "--knob", "transfer.workers=2", "-o", str(out)]
    assert main([*argv, "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "kvferry tune transfer: 64KiB x 4 x 1, throughput (BW)" in printed
    loaded = load_config(config_file=out, environ={})
    data = json.loads(report.read_text())
    if data["tuned"]:
        assert loaded.config.transfer.workers == 2 and min(data["final_rounds"]) > 1
    else:  # nothing won or the final run did not confirm: the defaults of what was tried
        assert "keep the defaults" in printed or "keep them" in printed
        assert loaded.config.transfer.workers == 1
    cache = tmp_path / "cache.yaml"
    argv = ["tune", "cache", "--trace", "mooncake-synthetic", "--model-kv", "32,8,128,bf16"]
    assert main([*argv, "--target-hit-rate", "0.3", "--policy", "lru", "-o", str(cache)]) == 0
    assert load_config(config_file=cache, environ={}).config.store.eviction_policy == "lru"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tune", "transfer", "--objective", "speed"], "--objective 'speed'"),
        (["tune", "transfer", "--knob", "transfer.workers"], "is not KEY=V1,V2"),
        (["tune", "transfer", "--budget", "0"], "--budget 0"),
        (["tune", "cache", "--target-hit-rate", "0.5"], "give one of --trace FILE"),
        (["tune", "cache", "--trace", "x", "--memory-budget", "1GiB"], "--memory-budget needs"),
    ],
)
def test_bad_input_is_one_error_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_page_cache_win_comes_with_its_caveat() -> None:
    bench = StoreBenchOptions(backend="disk", value_size=1 << 20, num_keys=128)
    options = StoreTuneOptions(bench=bench)
    search = SearchResult(best={"disk.direct_io": "false"})
    result = StoreTuneResult(options=options, search=search, final_rounds=[6.1, 6.4, 6.2])
    assert result.tuned == {"disk.direct_io": "false"}
    (caveat,) = result.caveats
    assert "128 MiB fit in RAM" in caveat
    assert StoreTuneResult(options=options, search=search, final_rounds=[1.0]).caveats == []


def test_a_tune_result_is_a_lab_result_the_report_shows(tmp_path: Path) -> None:
    options = TransferTuneOptions(space={"transfer.workers": ("2",)})
    steps = [Step("transfer.workers", "2", {}, [1.2, 1.1, 1.3], True, 3.0)]
    search = SearchResult(best={"transfer.workers": "2"}, steps=steps)
    final = Ratio("bw_gbps", "a", "b", 1.15, [1.1, 1.15, 1.2])
    report = from_transfer(TransferTuneResult(options=options, search=search, final_ratio=final))
    report.write(tmp_path / "tune.json")
    back = load_result(tmp_path / "tune.json")
    assert isinstance(back, TuneReport) and back.tuned == {"transfer.workers": "2"}
    assert back.steps[0].ratios == [1.2, 1.1, 1.3] and back.final_rounds == [1.1, 1.15, 1.2]
    doc = build_report([tmp_path / "tune.json"])
    (section,) = [s for s in doc.sections if s.anchor == "tune"]
    (sub,) = section.subsections
    assert "Recommended: transfer.workers=2." in sub.intro and "x1.150" in sub.intro
    (steps_table,) = sub.tables
    assert steps_table.rows == [
        ["transfer.workers", "2", "defaults", "1.200", "1.200, 1.100, 1.300", "yes"]
    ]


def test_a_churn_workload_searches_the_eviction_knobs_too() -> None:
    plain = StoreTuneOptions(bench=StoreBenchOptions(backend="cpu", op="batch-put"))
    churn = StoreTuneOptions(bench=StoreBenchOptions(backend="cpu", op="batch-put", overfill=True))
    assert "store.evict_ratio" not in plain.knobs
    assert set(churn.knobs) == set(plain.knobs) | {
        "store.evict_start_threshold",
        "store.evict_ratio",
    }
