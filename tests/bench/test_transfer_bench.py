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
    check_report(tmp_path, "DRAM")
    assert "BW (GB/S)" in run.stdout


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
