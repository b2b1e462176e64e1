"""The arrays Dynamo's planner reads, and the profile directory's files.

Owns :func:`write_npz` (``selected_prefill_interpolation/raw_data.npz``: ``prefill_isl``,
``prefill_ttft`` (ms), ``prefill_thpt_per_gpu``; ``selected_decode_interpolation/raw_data.npz``:
``x_kv_usage``, ``y_context_length``, ``z_itl`` (ms), ``z_thpt_per_gpu``, ``max_kv_tokens``),
with Dynamo's names and layout (1-D arrays of the measured points, ``max_kv_tokens`` a 1-element
array), and :func:`write_profile` / :func:`read_profile` (``profile.json`` in the directory).

The ``_per_gpu`` arrays hold kvferry's throughput *per instance* (the engine behind the URL,
whatever GPUs or CPUs it has): the names are kept so Dynamo's planner reads the files as they
are; divide by the instance's GPUs to compare with a Dynamo profile.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from kvferry.bench.profile.options import ProfileError
from kvferry.bench.profile.report import ProfileReport
from kvferry.bench.result import ResultError

__all__ = [
    "DECODE_KEYS",
    "DECODE_NPZ",
    "PREFILL_KEYS",
    "PREFILL_NPZ",
    "PROFILE_JSON",
    "read_profile",
    "write_npz",
    "write_profile",
]

PROFILE_JSON = "profile.json"
PREFILL_NPZ = "selected_prefill_interpolation/raw_data.npz"
DECODE_NPZ = "selected_decode_interpolation/raw_data.npz"
PREFILL_KEYS = ("prefill_isl", "prefill_ttft", "prefill_thpt_per_gpu")
DECODE_KEYS = ("x_kv_usage", "y_context_length", "z_itl", "z_thpt_per_gpu", "max_kv_tokens")


def write_npz(report: ProfileReport, out: str | os.PathLike[str]) -> list[Path]:
    """Write the npz files of the stages the profile measured; returns their paths."""
    root = Path(out)
    written = []
    if report.prefill:
        path = root / PREFILL_NPZ
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            prefill_isl=np.array([p.isl for p in report.prefill], dtype=np.float64),
            prefill_ttft=np.array([p.ttft_avg_ms for p in report.prefill]),
            prefill_thpt_per_gpu=np.array([p.tokens_per_s for p in report.prefill]),
        )
        written.append(path)
    if report.decode:
        path = root / DECODE_NPZ
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            x_kv_usage=np.array([p.kv_usage for p in report.decode]),
            y_context_length=np.array([p.context_length for p in report.decode]),
            z_itl=np.array([p.itl_avg_ms for p in report.decode]),
            z_thpt_per_gpu=np.array([p.tokens_per_s for p in report.decode]),
            max_kv_tokens=np.array([report.max_kv_tokens], dtype=np.int64),
        )
        written.append(path)
    return written


def write_profile(report: ProfileReport, out: str | os.PathLike[str]) -> list[Path]:
    """``profile.json`` and the npz files into ``out`` (created); returns the paths.

    Raises:
        ResultError: the directory or a file cannot be written.
    """
    root = Path(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ResultError(f"cannot create --out {out}: {e.strerror or e}") from e
    report.write(root / PROFILE_JSON)
    try:
        return [root / PROFILE_JSON, *write_npz(report, root)]
    except OSError as e:
        raise ResultError(f"cannot write the npz files into {out}: {e.strerror or e}") from e


def read_profile(path: str | os.PathLike[str]) -> ProfileReport:
    """A profile from its directory (``profile.json`` in it) or the JSON file itself.

    Raises:
        ProfileError: no such file, or not a profile.
    """
    p = Path(path)
    file = p / PROFILE_JSON if p.is_dir() else p
    try:
        data = json.loads(file.read_text())
    except OSError as e:
        raise ProfileError(
            f"--profile {path}: cannot read {file} ({e.strerror or e}); give a directory "
            "written by kvferry profile --out"
        ) from e
    except ValueError as e:
        raise ProfileError(f"--profile {path}: {file} is not JSON ({e})") from e
    try:
        return ProfileReport.from_json(data)
    except ResultError as e:
        raise ProfileError(f"--profile {path}: {e}") from e
