"""What a report is built from: result files and run directories, read into results.

Owns :func:`collect`: each argument is a result file (it must load, or the report stops with
one :class:`~kvferry.bench.result.ResultError` naming it) or a run directory (what
``--artifact-dir``/``--out`` writes): every ``*.json`` under it, recursively, that
:func:`~kvferry.bench.result.load_result` reads, and the PNGs beside them, which the report shows
as the benches' own figures. In a directory a JSON that is not a kvferry result (an aiperf
export, a script's raw output) is skipped and listed with the reason in the report's sources; a
file that says it is a kvferry result (``"schema": "kvferry.bench.result"``) but cannot be read
(a newer ``schema_version``, a malformed body) is an error, because skipping it would drop a run
without a word. A directory with no result at all is an error too.

It reads files and nothing else: no figure is drawn and no number computed here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvferry.bench.result import SCHEMA, BenchResult, ResultError, load_result

__all__ = ["Inputs", "LoadedResult", "Skipped", "collect"]

MAX_PNG_BYTES = 8 << 20
"""A bench's own PNG larger than this is listed, not embedded: one image must not make the
self-contained page tens of megabytes."""


@dataclass
class LoadedResult:
    """One result and where it came from."""

    path: Path
    name: str
    """How the report names the run: the file's path relative to the argument that found it
    (``transfer.json``, ``serve/run1.json``), unique in the report."""
    result: BenchResult


@dataclass
class Skipped:
    """A file the report read past, and why."""

    path: Path
    reason: str


@dataclass
class Inputs:
    """Everything :func:`collect` found, in the order the arguments named it."""

    results: list[LoadedResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    pngs: list[tuple[Path, str]] = field(default_factory=list)
    """(path, name) of each PNG found in a run directory."""

    @property
    def sources(self) -> list[str]:
        return [str(r.path) for r in self.results]


def _is_result_doc(data: object) -> bool:
    return isinstance(data, dict) and data.get("schema") == SCHEMA


def _load_file(path: Path) -> BenchResult:
    """The result at ``path``; every failure names the file."""
    try:
        return load_result(path)
    except ResultError as e:
        if str(path) in str(e):
            raise
        raise ResultError(f"{path}: {e}") from e


def _load_in_directory(path: Path) -> BenchResult | str:
    """The result at ``path``, or why it is not one (a string); raises for a kvferry result
    that cannot be read."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ResultError(f"cannot read {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"not JSON ({e})"
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not a result object"
    try:
        return load_result(data)
    except ResultError as e:
        if _is_result_doc(data):
            raise ResultError(f"{path}: {e}") from e
        return str(e)


def _run_key(result: BenchResult) -> tuple[str, float, float, str] | None:
    """What makes two files the same run (``bench serve`` writes its result to ``--json`` and
    to ``sweep_summary.json``); None for files without a start time, which cannot tell."""
    if not result.started_at:
        return None
    return (result.tool, result.started_at, result.ended_at, result.environment.host)


def _unique(name: str, taken: set[str]) -> str:
    out, n = name, 2
    while out in taken:
        out, n = f"{name} ({n})", n + 1
    taken.add(out)
    return out


def collect(paths: Sequence[str | os.PathLike[str]]) -> Inputs:
    """Read every result the arguments name (module docstring).

    Args:
        paths: result files and run directories, at least one.

    Returns:
        The results in argument order (a directory's sorted by path), what was skipped, and the
        PNGs found in directories.

    Raises:
        ResultError: no argument; a missing path; a file argument that is not a readable result;
            a kvferry result in a directory that cannot be read; a directory with no result.
    """
    if not paths:
        raise ResultError("no input: give result files or run directories")
    out = Inputs()
    names: set[str] = set()
    seen: set[Path] = set()
    runs: dict[tuple[str, float, float, str], str] = {}

    def add(path: Path, name: str, result: BenchResult) -> None:
        key = _run_key(result)
        if key is not None and key in runs:
            out.skipped.append(
                Skipped(path, f"the same run as {runs[key]} (same tool, start and end time, host)")
            )
            return
        name = _unique(name, names)
        if key is not None:
            runs[key] = name
        out.results.append(LoadedResult(path, name, result))

    for arg in paths:
        root = Path(arg)
        if root.is_dir():
            found = 0
            # shallow first: a run's own --json before the copies in its artifact directory
            for path in sorted(root.rglob("*"), key=lambda p: (len(p.parts), p)):
                if path.resolve() in seen or not path.is_file():
                    continue
                rel = path.relative_to(root).as_posix()
                if path.suffix.lower() == ".png":
                    if path.stat().st_size > MAX_PNG_BYTES:
                        out.skipped.append(Skipped(path, "PNG larger than 8 MiB: not embedded"))
                    else:
                        out.pngs.append((path, _unique(rel, names)))
                    continue
                if path.suffix.lower() != ".json":
                    continue
                seen.add(path.resolve())
                loaded = _load_in_directory(path)
                if isinstance(loaded, str):
                    out.skipped.append(Skipped(path, loaded))
                    continue
                found += 1
                add(path, rel, loaded)
            if not found:
                raise ResultError(
                    f"{root}: no kvferry result in this directory (looked for *.json that a "
                    "kvferry bench wrote, recursively)"
                )
        elif root.resolve() not in seen:
            seen.add(root.resolve())
            add(root, root.name, _load_file(root))
    return out
