"""``kvferry bench router`` for real: fresh fleets of ``kvferry serve mock`` engines behind a real
``kvferry serve router``, loaded by the real endpoint bench, through the library and through
argv; the report's JSON round trip; the old ``benchmarks/router_bench.py`` files; clear errors.
Small runs (2 workers, few requests, a 100x mock) with a prefix-heavy load; no timing is
asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvferry.bench.result import SCHEMA, load_result
from kvferry.bench.router.harness import RouterBenchOptions, RouterBenchReport, RouterProgress, run
from kvferry.cli.main import main
from kvferry.errors import ConfigError

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

SMALL = {
    "workers": 2,
    "num_blocks": 256,
    "speedup_ratio": 100.0,
    "prefix_ratios": (0.9,),
    "groups": 4,
    "isl": 256,
    "osl": 4,
    "requests": 40,
    "rate": 50.0,
}


def test_kv_routing_hits_at_least_as_often_as_round_robin() -> None:
    seen: list[RouterProgress] = []
    options = RouterBenchOptions(policies=("kv", "round-robin"), **SMALL)  # type: ignore[arg-type]
    report = run(options, seen.append)
    kv, rr = report.case("0.9", "kv"), report.case("0.9", "round-robin")
    assert kv is not None and rr is not None
    for case in (kv, rr):
        assert case.requests == 40 and case.errors == 0
        # Every routed request, and the endpoint bench's one test request, reached a worker.
        assert sum(case.requests_per_worker) == 41 and len(case.requests_per_worker) == 2
        assert case.hit_rate_basis == "blocks" and 0 < case.hit_rate < 1
        assert case.metrics is not None and case.metrics.request_count == 40
        assert case.ttft_p50_ms == case.metrics.value("time_to_first_token", "p50")
    # 4 groups of 90% shared prefix over 2 workers: kv sends a group where it is cached,
    # round-robin sends every group to both workers.
    assert kv.hit_rate >= rr.hit_rate
    # A fresh fleet per run: the router's prediction is what the workers found.
    assert kv.predicted_hit_rate == pytest.approx(kv.hit_rate, abs=0.05)
    (ttft, hits) = [r for r in report.ratios if r.subject == "kv"]
    assert ttft.reference == hits.reference == "round-robin" and ttft.case == "0.9"
    assert hits.value == pytest.approx(kv.hit_rate / rr.hit_rate)
    assert [(p.index, p.policy, p.phase) for p in seen if p.phase != "running"] == [
        (0, "kv", "starting"), (0, "kv", "done"),
        (1, "round-robin", "starting"), (1, "round-robin", "done"),
    ]  # fmt: skip
    assert any(p.serve is not None and p.serve.done > 0 for p in seen)
    assert report.ended_at > report.started_at > 0

    data = json.loads(json.dumps(report.to_json()))
    assert data["schema"] == SCHEMA and data["tool"] == "router" and data["environment"]["cpus"]
    assert load_result(data) == report


def test_through_argv_with_the_random_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(
        ["bench", "router", "--quiet", "--workers", "2", "--num-blocks", "256",
         "--speedup-ratio", "100", "--ratios", "0.9", "--groups", "4", "--isl", "256",
         "--osl", "4", "--requests", "20", "--rate", "50", "--policies", "random",
         "--json", str(out), "--plot", str(png)]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "kvferry bench router: random on 2 mock workers" in printed and "0.9" in printed
    report = load_result(out)
    assert isinstance(report, RouterBenchReport)
    (case,) = report.cases
    assert case.policy == "random" and case.requests == 20 and case.errors == 0
    assert report.options.policies == ("random",) and "bench router" in report.command
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "name", ["router_mock.json", "router_trace.json", "router_vllm.json", "router_vllm_rate2.json"]
)
def test_old_router_bench_results_load(name: str) -> None:
    old = json.loads((RESULTS / name).read_text())
    report = load_result(RESULTS / name)
    assert isinstance(report, RouterBenchReport)
    assert len(report.cases) == len(old["rows"])
    for case, row in zip(report.cases, old["rows"], strict=True):
        assert case.policy == row["mode"] and case.ttft_p50_ms == row["ttft_p50_ms"]
        assert case.hit_rate == row["hit_rate"]
        assert case.predicted_hit_rate == row["predicted_hit_rate"]
        assert case.requests_per_worker == row["requests_per_worker"]
    assert report.options.workers == old["args"]["workers"]
    basis = "tokens" if old["args"]["engine"] == "vllm" else "blocks"
    assert {c.hit_rate_basis for c in report.cases} == {basis}
    kv_over_rr = [r for r in report.ratios if r.metric == "hit rate"]
    assert len(kv_over_rr) == len(old["rows"]) // 2
    assert load_result(json.loads(json.dumps(report.to_json()))) == report


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"policies": ("kv", "fair")}, "unknown policy 'fair'"),
        ({"policies": ()}, "--policies is empty"),
        ({"policies": ("kv", "kv")}, "names a policy twice"),
        ({"prefix_ratios": (1.5,)}, "--ratios values must be in [0, 1], got 1.5"),
        ({"worker_urls": ("localhost:8000",)}, "--worker must be http://HOST:PORT"),
        ({"trace": "t", "trace_scale": 3}, "--trace-scale must be a divisor of"),
        ({"workers": 0}, "--workers must be >= 1, got 0"),
    ],
)
def test_bad_options_are_clear_errors(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run(RouterBenchOptions(**changes))  # type: ignore[arg-type]


def test_a_worker_that_is_not_there_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "router", "--quiet", "--worker", "http://127.0.0.1:9", "--ratios", "0.5",
               "--policies", "kv"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "GET http://127.0.0.1:9/metrics failed" in err and "Traceback" not in err


def test_the_lab_surfaces_are_pinned() -> None:
    """The router and endpoint benches' public names: what a Python caller may rely on."""
    from kvferry.bench.endpoint import harness as serve
    from kvferry.bench.router import fleet, harness, plot

    assert set(harness.__all__) == {
        "POLICIES", "RouterBenchError", "RouterBenchOptions", "RouterBenchReport",
        "RouterProgress", "RouterRun", "run",
    }  # fmt: skip
    assert set(fleet.__all__) == {
        "RouterBenchError", "ServeProcess", "WorkerCounters", "router_stats", "worker_counters",
    }  # fmt: skip
    assert set(plot.__all__) == {"plot_router", "router_figure", "router_identity"}
    assert {"ServeBenchOptions", "ServeBenchReport", "LevelResult", "run"} <= set(serve.__all__)
    for module in (harness, fleet, plot, serve):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
    assert harness.RouterBenchReport.tool == "router" and serve.ServeBenchReport.tool == "serve"
