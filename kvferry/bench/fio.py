"""fio as the reference for disk benchmarks: what the device gives to a C program with libaio.

Owns building a fio command line, running the real ``fio`` binary and reading its JSON report
into the lab's units (GB/s with GB = 1e9 bytes, IOPS, completion-latency percentiles in
microseconds). It measures nothing itself and knows nothing about kvferry's tiers; a disk bench
runs it beside the disk tier on the same directory, block size and queue depth, so results read
as ratios. fio is a system package (``apt-get install fio``), not a pip extra.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Literal

from kvferry.errors import KvferryError

__all__ = [
    "FIO_FILE",
    "FioFailed",
    "FioRw",
    "MissingTool",
    "fio_command",
    "parse_fio_json",
    "run_fio",
]

FioRw = Literal["read", "write", "randread", "randwrite"]

FIO_FILE = "kvferry-fio.bin"
"""Name of the scratch file fio reads and writes in the directory it is given (removed after)."""


class MissingTool(KvferryError):
    """A system program the lab runs is not installed; the message names the package."""

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(
            f"{tool} is not installed; it is a system package, not a pip extra: "
            f"apt-get install {package}"
        )
        self.tool = tool
        self.package = package


class FioFailed(KvferryError):
    """fio ran but exited with an error or wrote a report that could not be read."""


def fio_command(
    path_dir: str,
    *,
    rw: FioRw,
    block_size: int,
    size_bytes: int,
    iodepth: int = 1,
    numjobs: int = 1,
    direct: bool = True,
    runtime_s: float | None = None,
    fio: str = "fio",
) -> list[str]:
    """The argv :func:`run_fio` runs (libaio, JSON output, one file in ``path_dir``)."""
    cmd = [
        fio,
        "--name=kvferry",
        f"--filename={os.path.join(path_dir, FIO_FILE)}",
        "--ioengine=libaio",
        f"--rw={rw}",
        f"--bs={block_size}",
        f"--size={size_bytes}",
        f"--iodepth={iodepth}",
        f"--numjobs={numjobs}",
        f"--direct={1 if direct else 0}",
        "--group_reporting",
        "--output-format=json",
    ]
    if runtime_s is not None:
        cmd += ["--time_based", f"--runtime={max(1, round(runtime_s * 1000))}ms"]
    return cmd


def run_fio(
    path_dir: str,
    *,
    rw: FioRw,
    block_size: int,
    size_bytes: int,
    iodepth: int = 1,
    numjobs: int = 1,
    direct: bool = True,
    runtime_s: float | None = None,
    fio: str = "fio",
    timeout_s: float = 600.0,
) -> dict[str, float]:
    """Run fio on a file in ``path_dir`` and return what it measured.

    Args:
        path_dir: directory on the filesystem to measure; fio's file is removed afterwards.
        rw: sequential ``read``/``write`` (or ``randread``/``randwrite``).
        block_size: bytes per I/O.
        size_bytes: bytes of the file (and of the run, unless ``runtime_s`` makes it time based).
        iodepth: I/Os in flight per job (libaio).
        numjobs: fio jobs (processes) on the same file, reported as one group.
        direct: O_DIRECT (``--direct=1``).
        runtime_s: run for this long, looping over the file (``--time_based``).
        fio: the fio binary.
        timeout_s: seconds before the run is killed.

    Returns:
        ``gbps`` (1e9 bytes/s), ``iops``, ``lat_p50_us`` and ``lat_p99_us`` (completion latency),
        ``bytes`` moved and ``seconds`` fio ran.

    Raises:
        MissingTool: fio is not installed.
        FioFailed: fio exited with an error, timed out, or its report has no such numbers.
    """
    binary = shutil.which(fio)
    if binary is None:
        raise MissingTool("fio", "fio")
    cmd = fio_command(
        path_dir,
        rw=rw,
        block_size=block_size,
        size_bytes=size_bytes,
        iodepth=iodepth,
        numjobs=numjobs,
        direct=direct,
        runtime_s=runtime_s,
        fio=binary,
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise FioFailed(f"fio ran past {timeout_s}s: {' '.join(cmd)}") from e
    finally:
        try:
            os.unlink(os.path.join(path_dir, FIO_FILE))
        except OSError:
            pass
    if proc.returncode != 0:
        raise FioFailed(
            f"fio exited with {proc.returncode}: {' '.join(cmd)}\n{proc.stderr.strip()}"
        )
    return parse_fio_json(proc.stdout, "read" if "read" in rw else "write")


def parse_fio_json(text: str, direction: Literal["read", "write"]) -> dict[str, float]:
    """The numbers of one group-reported job from fio's ``--output-format=json`` report.

    Raises:
        FioFailed: the text holds no JSON report or the report lacks the numbers.
    """
    start = text.find("{")  # fio may print notes before the JSON
    try:
        report = json.loads(text[start:]) if start >= 0 else None
        side = report["jobs"][0][direction] if isinstance(report, dict) else None
        if not isinstance(side, dict):
            raise KeyError("jobs")
        percentiles = side["clat_ns"].get("percentile", {})
        seconds = side["runtime"] / 1000.0
        return {
            "gbps": side["bw_bytes"] / 1e9,
            "iops": float(side["iops"]),
            "lat_p50_us": percentiles.get("50.000000", 0.0) / 1000.0,
            "lat_p99_us": percentiles.get("99.000000", 0.0) / 1000.0,
            "bytes": float(side["io_bytes"]),
            "seconds": seconds,
        }
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise FioFailed(f"cannot read fio's JSON report ({e!r}): {text[:500]!r}") from e
