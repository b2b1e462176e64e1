"""`kvferry bench transfer` end to end: a real target process, a real sweep, checked bytes.

The sweeps here are tiny (a 64 KiB buffer, 0.1 s per case, no warm-up): they check the harness
(case grid, skip rule, consistency check, JSON and CSV), not the speed.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

KiB = 1 << 10


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def sweep(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "kvferry", "bench", "transfer", "--local", "--quiet"]
    argv += ["--total-buffer-size", "64KiB", "--start-block-size", "16KiB"]
    argv += ["--max-block-size", "32KiB", "--max-batch-size", "2", "--max-threads", "2"]
    argv += ["--duration", "0.1", "--warmup", "0", "--check-consistency"]
    argv += ["--json", str(tmp_path / "out.json"), "--csv", str(tmp_path / "out.csv"), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def engines(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Contender label -> what its engine reported, from a report's JSON."""
    return {c["label"]: c["engine"] for c in doc["contenders"]}


def check_report(tmp_path: Path, seg_type: str) -> dict[str, Any]:
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["schema_version"] == 1 and doc["tool"] == "transfer"
    assert doc["options"]["seg_type"] == seg_type
    assert engines(doc)["kvferry"]["seg_type"] == seg_type
    grid = {(c["block_size"], c["batch_size"], c["threads"]) for c in doc["cases"]}
    # powers of two from the start values; 32 KiB x 2 x 2 = 128 KiB exceeds the buffer: skipped
    want = {(b, n, t) for b in (16 * KiB, 32 * KiB) for n in (1, 2) for t in (1, 2)}
    assert grid == want - {(32 * KiB, 2, 2)}
    for case in doc["cases"]:
        assert case["consistency_checked"] is True
        assert (
            case["batches"] > 0
            and case["bytes"] == case["batches"] * case["block_size"] * (case["batch_size"])
        )
        assert case["bw_gbps"] > 0 and case["transfer_us"]["count"] == case["samples"]
    with (tmp_path / "out.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(doc["cases"])
    return doc


def test_local_sweep_moves_checked_bytes_and_reports_every_case(tmp_path: Path) -> None:
    run = sweep(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = check_report(tmp_path, "DRAM")
    assert "BW (GB/S)" in run.stdout
    # the verdict names what was checked: 16 KiB x (1+2+2+4) + 32 KiB x (1+2+2) = 304 KiB
    checked = sum(c["block_size"] * c["batch_size"] * c["threads"] for c in doc["cases"])
    assert checked == 304 * KiB == sum(c["consistency_bytes"] for c in doc["cases"])
    verdict = (
        "consistency: 7 cases of kvferry, every byte of 304KiB written with a pattern then "
        "read back matched: OK"
    )
    assert verdict in " ".join(run.stdout.split())


@pytest.mark.skipif(has_cuda(), reason="this machine has a GPU: the VRAM sweep test runs")
def test_vram_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    run = sweep(tmp_path, "--seg-type", "VRAM")
    assert run.returncode == 2
    assert "--seg-type VRAM needs" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.skipif(not has_cuda(), reason="no CUDA device here (runs on a GPU machine)")
def test_vram_sweep_on_a_gpu(tmp_path: Path) -> None:
    run = sweep(tmp_path, "--seg-type", "VRAM", "--transport", "tcp")
    assert run.returncode == 0, run.stderr[-3000:]
    doc = check_report(tmp_path, "VRAM")
    assert engines(doc)["kvferry"]["transport"] == "tcp"


def test_rounds_interleave_two_backends_and_report_per_round_ratios(tmp_path: Path) -> None:
    pytest.importorskip("mooncake")
    argv = [sys.executable, "-m", "kvferry", "bench", "transfer", "--local", "--quiet"]
    argv += ["--backend", "kvferry,mooncake", "--transport", "tcp", "--rounds", "3"]
    argv += ["--total-buffer-size", "64KiB", "--start-block-size", "16KiB"]
    argv += ["--max-block-size", "32KiB", "--duration", "0.1", "--warmup", "0"]
    argv += ["--check-consistency", "--reference", "--json", str(tmp_path / "out.json")]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "median of 3 alternating rounds" in run.stdout
    assert "reference socket_stream_1MiB" in run.stdout
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["options"]["rounds"] == 3
    assert doc["command"].startswith("kvferry bench transfer ") and "--rounds 3" in doc["command"]
    assert set(engines(doc)) == {"kvferry", "mooncake"}
    cases = {(c["backend"], c["block_size"]) for c in doc["cases"]}
    assert cases == {(b, s) for b in ("kvferry", "mooncake") for s in (16 * KiB, 32 * KiB)}
    for case in doc["cases"]:
        assert case["consistency_checked"] is True
        assert case["bytes"] == case["batches"] * case["block_size"] > 0
        assert case["samples"] == case["batches"]  # three rounds' samples pooled: batch 1
    assert [(r["subject"], r["reference"], r["case"], r["metric"]) for r in doc["ratios"]] == [
        ("kvferry", "mooncake", f"{16 * KiB}x1x1", "bw_gbps"),
        ("kvferry", "mooncake", f"{16 * KiB}x1x1", "p99_tx_us"),
        ("kvferry", "mooncake", f"{32 * KiB}x1x1", "bw_gbps"),
        ("kvferry", "mooncake", f"{32 * KiB}x1x1", "p99_tx_us"),
    ]
    for r in doc["ratios"]:
        assert len(r["rounds"]) == 3 and all(x > 0 for x in r["rounds"])
        assert r["value"] == sorted(r["rounds"])[1]


def test_merge_rounds_pools_samples_and_sums_the_rest() -> None:
    from kvferry.bench.stats import Samples, Summary
    from kvferry.bench.transfer.cases import Case, CaseResult, merge_rounds
    from kvferry.bench.transfer.report import round_ratio

    def result(batches: int, seconds: float, cpu: float, target: float | None) -> CaseResult:
        return CaseResult(
            backend="kvferry",
            block_size=4096,
            batch_size=2,
            threads=2,
            op="read",
            batches=batches,
            bytes=batches * 8192,
            seconds=seconds,
            bw_gbps=batches * 8192 / 1e9 / seconds,
            avg_lat_us=0.0,
            transfer_us=Summary.empty(),
            initiator_cpu_s=cpu,
            target_cpu_s=target,
            consistency_checked=True,
        )

    a, b = Samples(), Samples()
    a.extend([1.0, 2.0, 3.0])
    b.extend([10.0])
    merged = merge_rounds([result(3, 1.0, 0.5, 0.25), result(1, 3.0, 0.25, 0.5)], [a, b])
    assert (merged.batches, merged.bytes, merged.seconds) == (4, 4 * 8192, 4.0)
    assert merged.bw_gbps == 4 * 8192 / 1e9 / 4.0
    assert merged.avg_lat_us == 4.0 * 1e6 * 2 / 4  # seconds x threads / batches
    assert merged.transfer_us.count == 4 and merged.transfer_us.max == 10.0
    assert merged.transfer_us.avg == 4.0
    assert (merged.initiator_cpu_s, merged.target_cpu_s) == (0.75, 0.75)
    assert merged.consistency_checked
    # each round's own BW and P99 are kept: the spread an A/B comparison's noise band reads
    assert merged.round_bw_gbps == [3 * 8192 / 1e9 / 1.0, 1 * 8192 / 1e9 / 3.0]
    assert merged.round_p99_tx_us == [0.0, 0.0]
    unknown = merge_rounds([result(1, 1.0, 0.1, None), result(1, 1.0, 0.1, 0.2)], [a, b])
    assert unknown.target_cpu_s is None  # one round without the target's CPU: not a sum
    bw = round_ratio("bw_gbps", "kvferry", "mooncake", Case(4096, 1, 1), [1.5, 0.9, 2.0])
    p99 = round_ratio("p99_tx_us", "kvferry", "mooncake", Case(4096, 1, 1), [1.0, 3.0])
    assert (bw.value, p99.value) == (1.5, 2.0)
    assert bw.rounds == [1.5, 0.9, 2.0] and bw.spread == (0.9, 2.0) and bw.case == "4096x1x1"


def test_rounds_must_be_positive(tmp_path: Path) -> None:
    run = sweep(tmp_path, "--rounds", "0")
    assert run.returncode == 2
    assert "--rounds 0 is invalid: must be 1..1000" in run.stderr and "Traceback" not in run.stderr


def test_two_configs_of_one_engine_side_by_side(tmp_path: Path) -> None:
    """An entry's overrides reach its engine's config (and its own target's); results and
    ratios carry the entry as typed."""
    other = "kvferry+transfer.grace_period_ns=0+transfer.slice_size=32KiB"
    argv = [sys.executable, "-m", "kvferry", "bench", "transfer", "--local", "--quiet"]
    argv += ["--backend", f"kvferry,{other}", "--transport", "tcp", "--rounds", "2"]
    argv += ["--total-buffer-size", "256KiB", "--start-block-size", "64KiB"]
    argv += ["--max-block-size", "64KiB", "--duration", "0.1", "--warmup", "0"]
    argv += ["--check-consistency", "--json", str(tmp_path / "out.json")]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((tmp_path / "out.json").read_text())
    assert list(engines(doc)) == ["kvferry", other]
    assert engines(doc)["kvferry"]["config"]["grace_period_ns"] == 50_000
    assert engines(doc)[other]["config"]["grace_period_ns"] == 0
    assert engines(doc)[other]["config"]["slice_size"] == "32KiB"
    assert doc["contenders"][1]["overrides"] == {
        "transfer.grace_period_ns": "0",
        "transfer.slice_size": "32KiB",
    }
    assert [c["backend"] for c in doc["cases"]] == ["kvferry", other]
    assert all(c["consistency_checked"] for c in doc["cases"])
    assert (doc["ratios"][0]["subject"], doc["ratios"][0]["reference"]) == ("kvferry", other)


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("kvferry,kvferry", "names an entry twice"),
        ("kvferry+grace", "'grace' is not SECTION.KEY=VALUE"),
        ("kvferry+transfer.grace_period_ns=-5", "transfer.grace_period_ns = '-5'"),
        ("kvferry+transfer.nosuch=1", "unknown key transfer.nosuch"),
    ],
)
def test_bad_backend_entries_are_clear_errors(tmp_path: Path, backend: str, message: str) -> None:
    run = sweep(tmp_path, "--backend", backend)
    assert run.returncode == 2, run.stderr[-2000:]
    assert message in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("width", [100, 80])
def test_tables_keep_every_number_whole_in_a_narrow_terminal(width: int) -> None:
    from kvferry.bench.stats import Summary
    from kvferry.bench.transfer.cases import Case, CaseResult
    from kvferry.bench.transfer.harness import COLUMNS, TransferBenchOptions, row
    from kvferry.bench.transfer.report import ContenderInfo, TransferBenchReport, round_ratio
    from kvferry.cli.bench_cmd import _print_report
    from kvferry.testing.tables import assert_values_whole, narrow_console, printed

    tx = Summary(
        count=9, min=1.0, max=9e5, avg=12_345.6, std=1.0, p50=11_634.5, p90=1.0, p95=1.0,
        p99=223_456.7, p999=924_567.8,
    )  # fmt: skip
    report = TransferBenchReport(options=TransferBenchOptions(rounds=3))
    for backend in ("kvferry+transfer.grace_period_ns=200000", "mooncake"):
        report.contenders.append(ContenderInfo(backend, backend, engine={"transport": "tcp"}))
        case = CaseResult(
            backend=backend, block_size=67_108_864, batch_size=128, threads=16, op="read",
            batches=9, bytes=1, seconds=1.0, bw_gbps=24.512345, avg_lat_us=123_456.7,
            transfer_us=tx, initiator_cpu_s=1.0, target_cpu_s=None,
        )  # fmt: skip
        report.cases.append(case)
    case = Case(67_108_864, 128, 16)
    report.ratios.append(round_ratio("bw_gbps", "kvferry", "mooncake", case, [1.23, 0.98, 1.5]))
    report.ratios.append(round_ratio("p99_tx_us", "kvferry", "mooncake", case, [2, 3, 4]))
    console = narrow_console(width)
    _print_report(console, report, multi=True)
    text = printed(console)
    headers = ["Backend", "Transport", *COLUMNS]
    cases = [["", "tcp", *row(c)] for c in report.cases]  # Backend: a label, may wrap
    dropped = assert_values_whole(text, width, headers, cases)
    assert "BW (GB/S)" not in dropped and "P99 Tx (us)" not in dropped
    ratio_cells = ["1.23x", "0.98-1.50", "3.00x", "2.00-4.00"]
    ratio_headers = ["BW ratio", "BW ratio range", "P99 Tx ratio (lower better)", "P99 ratio range"]
    assert_values_whole(text, width, ratio_headers, [ratio_cells])


# -- the library, driven directly ----------------------------------------------------------------
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def tiny(**kw: Any) -> Any:
    from kvferry.bench.transfer import TransferBenchOptions

    base: dict[str, Any] = {
        "transport": "tcp",
        "total_buffer_size": 64 * KiB,
        "start_block_size": 4 * KiB,
        "max_block_size": 8 * KiB,
        "duration": 0.1,
        "warmup": 0.0,
        "check_consistency": True,
    }
    return TransferBenchOptions(**{**base, **kw})


def test_the_library_runs_two_contenders_and_the_report_round_trips_through_json() -> None:
    from kvferry.bench.result import Reference, load_result
    from kvferry.bench.transfer import TransferBenchReport, run
    from kvferry.config.loader import load_config

    other = "kvferry+transfer.grace_period_ns=0"
    options = tiny(backend=f"kvferry,{other}", rounds=2, reference=True)
    loaded = load_config(flags={"transfer.slice_size": "64KiB"}, environ={})
    seen: list[tuple[int, int, str]] = []
    report = run(
        options,
        lambda done, total, what: seen.append((done, total, what)),
        config=loaded.config,
        sources=loaded.sources,
    )
    assert isinstance(report, TransferBenchReport) and report.tool == "transfer"
    # 2 cases x 2 rounds x 2 contenders, then the reference step
    assert [s[:2] for s in seen] == [(i, 8) for i in range(8)] + [(0, 0)]
    assert seen[0][2] == "4096B x1 t1" and seen[-1][2].startswith("reference:")
    assert [(c.label, c.backend, c.overrides) for c in report.contenders] == [
        ("kvferry", "kvferry", {}),
        (other, "kvferry", {"transfer.grace_period_ns": "0"}),
    ]
    assert report.backends[other]["config"]["grace_period_ns"] == 0
    assert report.backends[other]["config"]["slice_size"] == "64KiB"  # the run's config, under
    assert [(c.backend, c.block_size) for c in report.cases] == [
        (b, s) for s in (4 * KiB, 8 * KiB) for b in ("kvferry", other)
    ]
    assert all(c.consistency_checked and c.batches > 0 for c in report.cases)
    assert [(r.metric, r.case, len(r.rounds)) for r in report.ratios] == [
        (m, f"{s}x1x1", 2) for s in (4 * KiB, 8 * KiB) for m in ("bw_gbps", "p99_tx_us")
    ]
    assert all(r.subject == "kvferry" and r.reference == other for r in report.ratios)
    assert [r.name for r in report.references] == ["socket_stream_1MiB", "memcpy_16MiB"]
    assert all(isinstance(r, Reference) and r.value > 0 for r in report.references)
    assert report.config is not None
    assert report.config.sources["transfer.slice_size"] == "flag"
    assert report.config.sources["transfer.workers"] == "default"
    assert 0 < report.started_at < report.ended_at and report.environment.cpus > 0
    assert report.skipped == []

    text = json.dumps(report.to_json())
    doc = json.loads(text)
    assert (doc["schema"], doc["tool"]) == ("kvferry.bench.result", "transfer")
    assert doc["cases"][0]["samples"] == doc["cases"][0]["transfer_us"]["count"]
    back = load_result(json.loads(text))
    assert isinstance(back, TransferBenchReport) and back == report
    assert TransferBenchReport.from_json(doc) == report


def test_cases_larger_than_the_buffer_are_reported_as_skipped() -> None:
    from kvferry.bench.transfer import Case, run

    report = run(tiny(total_buffer_size=4 * KiB, max_threads=2, check_consistency=False))
    assert [c.case for c in report.cases] == [Case(4 * KiB, 1, 1)]
    assert report.skipped == [Case(4 * KiB, 1, 2), Case(8 * KiB, 1, 1), Case(8 * KiB, 1, 2)]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"rounds": 0}, "--rounds 0 is invalid: must be 1..1000"),
        ({"op": "copy"}, "--op 'copy' is invalid: must be read, write or mix"),
        ({"max_block_size": 1024}, "--max-block-size 1024 is invalid: must be >= --start-block"),
        ({"backend": " , "}, "--backend is empty"),
        ({"backend": "kvferry,kvferry"}, "names an entry twice"),
        ({"backend": "kvferry+grace"}, "'grace' is not SECTION.KEY=VALUE"),
    ],
)
def test_options_are_validated_when_built(kw: dict[str, Any], message: str) -> None:
    from kvferry.bench.transfer import TransferBenchOptions
    from kvferry.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        TransferBenchOptions(**kw)


def test_an_override_the_config_rejects_names_the_entry() -> None:
    from kvferry.bench.transfer import parse_contenders, run
    from kvferry.config.models import KvferryConfig
    from kvferry.errors import ConfigError

    [spec] = parse_contenders("kvferry+transfer.nosuch=1")
    with pytest.raises(ConfigError, match=r"--backend kvferry\+transfer.nosuch=1.*unknown key"):
        spec.config(KvferryConfig())
    with pytest.raises(ConfigError, match=re.escape("transfer.grace_period_ns = '-5'")):
        run(tiny(backend="kvferry,kvferry+transfer.grace_period_ns=-5"))  # before any target


def test_a_target_that_fails_to_start_is_a_clear_error_with_its_stderr() -> None:
    from kvferry.bench.transfer.targets import spawn_local_target
    from kvferry.config.models import KvferryConfig
    from kvferry.launcher import LaunchError

    with (
        pytest.raises(LaunchError, match=r"(?s)target process exited .*rc=2.*nosuch") as info,
        spawn_local_target("nosuch", tiny(), KvferryConfig()),
    ):
        pass
    assert info.value.exit_code == 2


def _old_files(tool: str) -> list[Path]:
    found = []
    for path in sorted([*RESULTS.glob("*.json"), *RESULTS.glob("*/*.json")]):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and doc.get("tool") == tool:
            found.append(path)
    return found


def test_every_old_transfer_result_file_loads() -> None:
    from kvferry.bench.result import load_result
    from kvferry.bench.transfer import TransferBenchReport

    paths = _old_files("kvferry bench transfer")
    assert len(paths) >= 50  # benchmarks/results holds 61 of them today
    for path in paths:
        old = json.loads(path.read_text())
        report = load_result(path)
        assert isinstance(report, TransferBenchReport), path
        assert [c.label for c in report.contenders] == list(old["backends"]), path
        assert [c.bw_gbps for c in report.cases] == [c["bw_gbps"] for c in old["cases"]], path
        assert [c.transfer_us.p99 for c in report.cases] == [
            c["transfer_us"]["p99"] for c in old["cases"]
        ]
        assert report.options.rounds == old["options"].get("rounds", 1)
        assert {r.name: r.value for r in report.references} == {
            name: ref["gbps"] for name, ref in old["references"].items()
        }
        ratios = old.get("ratios", [])
        assert len(report.ratios) == 2 * len(ratios), path
        assert [r.value for r in report.ratios[::2]] == [r["bw_median"] for r in ratios]
        assert report.environment.host == old["machine"]["hostname"]
        # and it writes back in the new shape, which reads back equal
        assert TransferBenchReport.from_json(json.loads(json.dumps(report.to_json()))) == report
