"""The hit-rate lab as a library: its pinned surface, ``run(HitRateOptions) -> HitRateReport``
on the result model, ``exact_capacity`` the same for a Python caller and the CLI, the JSON
round trip, and the reports in benchmarks/results written before the model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import kvferry.bench.hitrate as hitrate
from kvferry.bench.hitrate import HitRateOptions, HitRateReport, run
from kvferry.bench.result import SCHEMA, BenchResult, ResultError, load_result
from kvferry.cli.main import main
from kvferry.config.models import KvferryConfig
from kvferry.errors import ConfigError

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

WORKLOAD = "multi-turn:sessions=6,turns=4"

PUBLIC = {
    "CSV_FIELDS", "DTYPE_BYTES", "ENGINES", "FRACTIONS", "HIT_RATE_DEFINITIONS", "SIM_SLOT_SIZE",
    "Advice", "HitRateError", "HitRateOptions", "HitRateProgress", "HitRateReport",
    "HitRateResult", "ProgressFn", "SimCase", "SweepProgressFn", "Tally", "TierSpec", "advise",
    "default_jobs", "expand_cases", "kv_bytes_per_token", "load_trace", "parse_capacity",
    "parse_tiers", "peak_rss_mib", "read_reference", "replay", "run", "search_tiers", "serve",
    "sim_config", "sim_store_config", "simulate", "stack_refusal", "stack_result", "sweep",
    "trace_keys", "write_csv", "write_json",
}  # fmt: skip

# Written by `kvferry bench hitrate --json` before the result model: they load as legacy.
LEGACY_LAB_FILES = {
    "hitrate_300k.json": 3,
    "hitrate_conv_sweep3_auto.json": 30,
    "hitrate_conv_sweep3_store.json": 30,
    "hitrate_conv_sweep_stack.json": 10,
    "hitrate_conv_sweep_store.json": 10,
    "hitrate_fig9_auto.json": 10,
    "hitrate_fig9_store.json": 10,
    "hitrate_replay.json": 1,
    "hitrate_speed.json": 12,
}
# Written by benchmarks/hitrate_speed.py (rows of lookups/s): not lab reports, refused.
SCRIPT_FILES = {
    "hitrate_bare_reference.json",
    "hitrate_speed_conv_bare_stack.json",
    "hitrate_speed_direct_bare.json",
    "hitrate_speed_direct_conv.json",
    "hitrate_speed_stack_bare.json",
    "hitrate_speed_store_bare.json",
    "hitrate_speed_vs_base.json",
}


class Recorder:
    """A :class:`~kvferry.bench.hitrate.HitRateProgress` that keeps what it was told."""

    def __init__(self) -> None:
        self.tasks: list[tuple[str, int | None]] = []
        self.done: dict[int, int] = {}
        self.removed: list[int] = []

    def add(self, label: str, total: int | None) -> int:
        self.tasks.append((label, total))
        return len(self.tasks) - 1

    def update(self, task: int, done: int) -> None:
        self.done[task] = done

    def remove(self, task: int) -> None:
        self.removed.append(task)


def test_the_public_surface_is_pinned() -> None:
    assert set(hitrate.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(hitrate, name) is not None, name


def test_run_returns_a_report_on_the_result_model() -> None:
    progress = Recorder()
    options = HitRateOptions(
        workload=WORKLOAD,
        policies=["lru", "fifo"],
        capacities=[8, "40"],
        target_hit_rate=0.5,
        jobs=1,
    )
    report = run(options, progress)
    assert isinstance(report, BenchResult) and report.tool == "hitrate"
    assert report.options is options and report.environment.cpus > 0
    assert report.ended_at >= report.started_at > 0
    assert [(c.policy, c.capacity_blocks) for c in report.cases] == [
        ("lru", 8), ("lru", 40), ("fifo", 8), ("fifo", 40),
    ]  # fmt: skip
    assert (report.requests, report.blocks, report.distinct_blocks) == (24, 132, 44)
    assert [a.policy for a in report.advice] == ["lru", "fifo"]
    assert all(a.reachable and a.block_hit_rate >= 0.5 for a in report.advice)
    # one bar per run, each run to its end, and one per search, removed when it is over
    assert progress.tasks[:4] == [(f"{p} cpu:{c}", 24) for p in ("lru", "fifo") for c in (8, 40)]
    assert progress.tasks[4:] == [("advice lru", None), ("advice fifo", None)]
    assert progress.done == {0: 24, 1: 24, 2: 24, 3: 24} and progress.removed == [4, 5]
    assert report.config is not None
    assert report.config.values["store.evict_ratio"] == 0.0
    assert report.config.sources["store.evict_ratio"] == "bench"
    assert report.config.sources["store.write_policy"] == "default"
    assert report.notes == [
        "simulated with exact capacities: a tier evicts only what a put needs, when full"
    ]


def _cli_cases(tmp_path: Path, *flags: str) -> list[dict[str, Any]]:
    out = tmp_path / "cli.json"
    argv = ["bench", "hitrate", "--workload", WORKLOAD, "--capacity", "30", "--jobs", "1"]
    assert main([*argv, "--quiet", "--json", str(out), *flags]) == 0
    cases: list[dict[str, Any]] = json.loads(out.read_text())["cases"]
    return cases


def _counted(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    drop = ("seconds", "lookups_per_s", "engine")
    return [{k: v for k, v in c.items() if k not in drop} for c in cases]


def test_a_python_caller_and_the_cli_simulate_alike(tmp_path: Path) -> None:
    """The watermarks come from the options, never from where a config value came from: a
    config that sets ``store.evict_ratio`` does not change an exact-capacity simulation, from
    Python or from the CLI; the CLI's watermark flags are ``exact_capacity=False``."""
    ratio = KvferryConfig.model_validate({"store": {"evict_ratio": 0.3}})
    exact = HitRateOptions(workload=WORKLOAD, capacities=[30], jobs=1)
    from_python = run(exact, config=ratio).to_json()["cases"]
    from_cli = _cli_cases(tmp_path, "--set", "store.evict_ratio=0.3")
    assert _counted(from_cli) == _counted(from_python)
    assert _counted(from_python) == _counted(run(exact).to_json()["cases"])

    batch = KvferryConfig.model_validate(
        {"store": {"evict_start_threshold": 1.0, "evict_ratio": 0.3}}
    )
    watermarks = HitRateOptions(workload=WORKLOAD, capacities=[30], jobs=1, exact_capacity=False)
    from_python = run(watermarks, config=batch).to_json()["cases"]
    from_cli = _cli_cases(tmp_path, "--evict-ratio", "0.3")
    assert _counted(from_cli) == _counted(from_python)
    # and the option matters on this trace: batch eviction evicts more than it must
    assert from_python[0]["evictions"] > _counted(run(exact).to_json()["cases"])[0]["evictions"]


def test_without_exact_capacity_a_simulation_counts_what_a_replay_does() -> None:
    config = KvferryConfig.model_validate(
        {"store": {"tiers": ["cpu"], "evict_ratio": 0.2}, "cpu": {"buffer_number": 30}}
    )
    real = run(HitRateOptions(workload=WORKLOAD, replay=True, kv_bytes_per_token=8), config=config)
    (case,) = real.cases
    assert case.mode == "replay" and case.tiers == [hitrate.TierSpec("cpu", 30)]
    assert real.notes == ["replayed against the configured store with real bytes"]
    options = HitRateOptions(workload=WORKLOAD, capacities=[30], exact_capacity=False, jobs=1)
    (sim,) = run(options, config=config).cases
    assert sim.tally == case.tally and sim.evictions == case.evictions
    (exact,) = run(HitRateOptions(workload=WORKLOAD, capacities=[30], jobs=1)).cases
    assert exact.evictions < case.evictions


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (HitRateOptions(), "no input: give trace (a file) or workload"),
        (HitRateOptions(trace="t.jsonl", workload=WORKLOAD), "not both"),
        (HitRateOptions(workload=WORKLOAD, policies=[]), "give at least one policy"),
        (HitRateOptions(workload=WORKLOAD, policies=["mru"]), "unknown eviction policy"),
        (HitRateOptions(workload=WORKLOAD, block_tokens=0), "block_tokens must be"),
        (HitRateOptions(workload=WORKLOAD, kv_bytes_per_token=8, model_kv="1,1,1,fp8"), "once"),
        (HitRateOptions(workload=WORKLOAD, model_kv="32,8,128"), "layers,kv_heads,head_dim"),
        (HitRateOptions(workload=WORKLOAD, engine="fast"), "engine must be one of auto"),
        (HitRateOptions(workload=WORKLOAD, jobs=0), "jobs must be at least 1"),
        (HitRateOptions(workload=WORKLOAD, target_hit_rate=1.5), "target_hit_rate must be"),
        (HitRateOptions(workload=WORKLOAD, speedup=0.0), "speedup must be a number > 0"),
        (HitRateOptions(workload=WORKLOAD, replay=True), "give the KV geometry"),
        (
            HitRateOptions(workload=WORKLOAD, replay=True, kv_bytes_per_token=8, capacities=[9]),
            "size its tiers in the config",
        ),
    ],
)
def test_bad_options_are_one_line_errors(options: HitRateOptions, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)) as caught:
        run(options)
    assert "\n" not in str(caught.value)


def test_capacities_against_a_closed_last_tier_fail_before_any_run() -> None:
    options = HitRateOptions(workload=WORKLOAD, tiers="cpu:10,disk:5", capacities=[9])
    with pytest.raises(ConfigError, match="leave its capacity out"):
        run(options, Recorder())


def _same(a: HitRateReport, b: HitRateReport) -> None:
    assert type(b) is HitRateReport
    assert b == a  # every field, the environment and each case's counts included


def test_to_json_round_trips_through_load_result(tmp_path: Path) -> None:
    options = HitRateOptions(
        workload=WORKLOAD,
        policies=["lru", "lfu"],
        tiers="cpu:10,disk",
        capacities=["20", "60"],
        target_hit_rate=0.6,
        model_kv="32,8,128,bf16",
        prefill_tokens_per_s=10000.0,
        reference="mooncake-fig9",
        jobs=1,
    )
    report = run(options)
    assert len(report.references) == 10 and report.reference_name() == "mooncake-fig9"
    data = json.loads(json.dumps(report.to_json()))
    assert (data["schema"], data["tool"]) == (SCHEMA, "hitrate")
    assert data["cases"][0]["tier_block_hit_rate"].keys() == {"cpu", "disk"}
    assert data["advice"][0]["tier_bytes"]["cpu"] == 10 * report.block_bytes  # type: ignore[operator]
    _same(report, load_result(data))  # type: ignore[arg-type]
    _same(report, HitRateReport.from_json(data))
    path = tmp_path / "r.json"
    hitrate.write_json(path, report)
    _same(report, load_result(path))  # type: ignore[arg-type]


def test_a_replay_report_round_trips(tmp_path: Path) -> None:
    config = KvferryConfig.model_validate(
        {"store": {"tiers": ["cpu"]}, "cpu": {"buffer_number": 20}}
    )
    report = run(
        HitRateOptions(workload=WORKLOAD, replay=True, kv_bytes_per_token=8), config=config
    )
    assert report.cases[0].replay is not None
    report.write(tmp_path / "r.json")
    _same(report, load_result(tmp_path / "r.json"))  # type: ignore[arg-type]


def test_a_malformed_case_is_a_result_error() -> None:
    report = run(HitRateOptions(workload=WORKLOAD, capacities=[30], jobs=1))
    data = report.to_json()
    del data["cases"][0]["tiers"]
    with pytest.raises(ResultError, match="malformed hitrate result"):
        load_result(data)


@pytest.mark.parametrize("name", sorted(LEGACY_LAB_FILES))
def test_reports_written_before_the_model_load(name: str) -> None:
    path = RESULTS / name
    old = json.loads(path.read_text())
    report = load_result(path)
    assert isinstance(report, HitRateReport)
    assert len(report.cases) == LEGACY_LAB_FILES[name] == len(old["results"])
    assert (report.source, report.blocks, report.requests) == (
        old["source"], old["blocks"], old["requests"],
    )  # fmt: skip
    for case, row in zip(report.cases, old["results"], strict=True):
        # the rates are recomputed from the counts the file holds, and agree with its rates
        assert case.block_hit_rate == pytest.approx(row["block_hit_rate"], abs=1e-12)
        assert case.token_hit_rate == pytest.approx(row["token_hit_rate"], abs=1e-12)
        assert case.capacity_blocks == row["capacity_blocks"]
        assert case.engine == row.get("engine", "store")
    assert report.environment.host == "" and "before the result model" in report.notes[0]
    assert report.options.policies == list(dict.fromkeys(r["policy"] for r in old["results"]))
    # and it is written back in the new shape, which reads back equal
    _same(report, load_result(json.loads(json.dumps(report.to_json()))))  # type: ignore[arg-type]


def test_every_hitrate_file_in_results_is_a_lab_report_or_a_script_output() -> None:
    names = {p.name for p in RESULTS.glob("hitrate*.json")}
    assert set(LEGACY_LAB_FILES) | SCRIPT_FILES <= names
    for name in sorted(names - set(LEGACY_LAB_FILES) - SCRIPT_FILES):
        assert isinstance(load_result(RESULTS / name), HitRateReport), name  # a newer report


@pytest.mark.parametrize("name", sorted(SCRIPT_FILES))
def test_benchmark_script_outputs_are_refused_clearly(name: str) -> None:
    with pytest.raises(ResultError, match='no "tool" field and not a known older kvferry result'):
        load_result(RESULTS / name)
