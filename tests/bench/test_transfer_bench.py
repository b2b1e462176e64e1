"""`kvferry bench transfer` end to end: a real target process, a real sweep, checked bytes.

The sweeps here are tiny (a 64 KiB buffer, 0.1 s per case, no warm-up): they check the harness
(case grid, skip rule, consistency check, JSON and CSV), not the speed.
"""

from __future__ import annotations

import csv
import json
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


def check_report(tmp_path: Path, seg_type: str) -> dict[str, Any]:
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["schema_version"] == 1
    assert doc["options"]["seg_type"] == seg_type
    assert doc["backends"]["kvferry"]["seg_type"] == seg_type
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
    assert doc["backends"]["kvferry"]["transport"] == "tcp"


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
    assert set(doc["backends"]) == {"kvferry", "mooncake"}
    cases = {(c["backend"], c["block_size"]) for c in doc["cases"]}
    assert cases == {(b, s) for b in ("kvferry", "mooncake") for s in (16 * KiB, 32 * KiB)}
    for case in doc["cases"]:
        assert case["consistency_checked"] is True
        assert case["bytes"] == case["batches"] * case["block_size"] > 0
        assert case["samples"] == case["batches"]  # three rounds' samples pooled: batch 1
    assert [(r["base"], r["other"], r["block_size"]) for r in doc["ratios"]] == [
        ("kvferry", "mooncake", 16 * KiB),
        ("kvferry", "mooncake", 32 * KiB),
    ]
    for r in doc["ratios"]:
        assert len(r["bw"]) == len(r["p99"]) == 3 and all(x > 0 for x in r["bw"])
        assert r["bw_median"] == sorted(r["bw"])[1]


def test_merge_rounds_pools_samples_and_sums_the_rest() -> None:
    from kvferry.bench.stats import Samples, Summary
    from kvferry.bench.transfer.harness import CaseResult, RoundRatios, merge_rounds

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
    unknown = merge_rounds([result(1, 1.0, 0.1, None), result(1, 1.0, 0.1, 0.2)], [a, b])
    assert unknown.target_cpu_s is None  # one round without the target's CPU: not a sum
    ratios = RoundRatios(4096, 1, 1, "kvferry", "mooncake", bw=[1.5, 0.9, 2.0], p99=[1.0, 3.0])
    assert (ratios.bw_median, ratios.p99_median) == (1.5, 2.0)
    assert ratios.to_dict()["bw_median"] == 1.5


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
    assert list(doc["backends"]) == ["kvferry", other]
    assert doc["backends"]["kvferry"]["config"]["grace_period_ns"] == 50_000
    assert doc["backends"][other]["config"]["grace_period_ns"] == 0
    assert doc["backends"][other]["config"]["slice_size"] == "32KiB"
    assert [c["backend"] for c in doc["cases"]] == ["kvferry", other]
    assert all(c["consistency_checked"] for c in doc["cases"])
    assert (doc["ratios"][0]["base"], doc["ratios"][0]["other"]) == ("kvferry", other)


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
    from kvferry.bench.transfer.harness import (
        COLUMNS,
        CaseResult,
        RoundRatios,
        TransferBenchOptions,
        TransferBenchReport,
        row,
    )
    from kvferry.cli.bench_cmd import _print_report
    from kvferry.testing.tables import assert_values_whole, narrow_console, printed

    tx = Summary(
        count=9, min=1.0, max=9e5, avg=12_345.6, std=1.0, p50=11_634.5, p90=1.0, p95=1.0,
        p99=223_456.7, p999=924_567.8,
    )  # fmt: skip
    report = TransferBenchReport(TransferBenchOptions(rounds=3))
    for backend in ("kvferry+transfer.grace_period_ns=200000", "mooncake"):
        report.backends[backend] = {"transport": "tcp"}
        case = CaseResult(
            backend=backend, block_size=67_108_864, batch_size=128, threads=16, op="read",
            batches=9, bytes=1, seconds=1.0, bw_gbps=24.512345, avg_lat_us=123_456.7,
            transfer_us=tx, initiator_cpu_s=1.0, target_cpu_s=None,
        )  # fmt: skip
        report.cases.append(case)
    ratio = RoundRatios(67_108_864, 128, 16, "kvferry", "mooncake", [1.23, 0.98, 1.5], [2, 3, 4])
    report.ratios.append(ratio)
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
