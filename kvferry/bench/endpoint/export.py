"""Files of the endpoint bench: aiperf-compatible exports, the sweep summary and the plots.

Owns writing a :class:`~kvferry.bench.endpoint.report.ServeBenchReport` to disk; computes nothing
(aggregates come from :mod:`kvferry.bench.endpoint.metrics`).

Per level (aiperf's file names, field names and nesting where the concept is the same):

- ``profile_export.jsonl``: one line per request, warm-up first (``benchmark_phase``
  ``warmup``, then ``profiling``), aiperf's ``MetricRecordInfo``: ``{"metadata": {...
  credit_issued_ns, request_start_ns, request_ack_ns, request_end_ns (wall clock ns),
  worker_id, benchmark_phase...}, "metrics": {tag: {"value", "unit"}}, "error": {"code",
  "type", "message"}}`` (``error`` only on failed requests, whose only metric is
  ``error_isl``).
- ``profile_export_aiperf.json``: aiperf's ``JsonExportData``: one object per metric tag
  (``{"unit", "avg", "p1".."p99", "min", "max", "std", "count", "sum"}``, the statistics a
  metric does not have left out), plus ``benchmark_id``, ``input_config``, ``run_info``,
  ``was_cancelled``, ``is_complete``, ``error_summary``, ``start_time``, ``end_time`` (the
  measured phase) and ``warmup_metrics`` (the warm-up's metrics, when there was one).
- ``profile_export_aiperf.csv``: aiperf's CSV: ``Metric,avg,min,max,sum,p1,...,p99,std`` rows
  for metrics with percentiles, a blank line, then ``Metric,Value`` rows for the others, each
  section sorted by tag, numbers as aiperf prints them (2 decimals; CRLF line ends).

A sweep (more than one level) writes each level's files into ``<artifact dir>/<level name>/``
and ``sweep_summary.json`` / ``sweep_summary.csv`` (one entry/row per level) into the artifact
dir; a single level writes its files into the artifact dir itself. Plots (``--plot``, needs
matplotlib: the ``plot`` extra): ``ttft_itl_vs_<x>.png``, ``throughput_vs_<x>.png`` and
``pareto.png`` (output tokens/s/user against output tokens/s, the Pareto front marked), where
``<x>`` is concurrency or request rate.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from kvferry.bench.endpoint.aggregate import MetricResult, RunMetrics
from kvferry.bench.endpoint.metrics import (
    ERROR_METRICS,
    RECORD_METRICS,
    RequestRecord,
    error_metrics,
    is_good,
    record_metrics,
)
from kvferry.bench.endpoint.options import EndpointBenchError
from kvferry.bench.endpoint.report import LevelResult, ServeBenchReport
from kvferry.bench.plots import serve_identity, stamp
from kvferry.errors import MissingDependency

__all__ = [
    "aiperf_csv",
    "aiperf_json",
    "plot_sweep",
    "record_json",
    "require_matplotlib",
    "summary_json",
    "write_artifacts",
]

AIPERF_SCHEMA_VERSION = "1.4"
"""The aiperf ``profile_export_aiperf.json`` schema whose shape the level files follow."""

CSV_STATS = (
    "avg",
    "min",
    "max",
    "sum",
    "p1",
    "p5",
    "p10",
    "p25",
    "p50",
    "p75",
    "p90",
    "p95",
    "p99",
    "std",
)
SWEEP_METRICS = (
    ("time_to_first_token", "ttft_ms"),
    ("time_to_second_token", "ttst_ms"),
    ("inter_token_latency", "itl_ms"),
    ("request_latency", "request_latency_ms"),
    ("output_token_throughput_per_user", "output_tokens_per_s_per_user"),
)
SWEEP_STATS = ("avg", "p50", "p90", "p99")


def _mkdir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EndpointBenchError(
            f"cannot create the artifact directory {str(path)!r}: {e.strerror or e}"
        ) from e
    return path


def _write(path: Path, text: str) -> Path:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise EndpointBenchError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    return path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvferry")
    except PackageNotFoundError:
        return "unknown"


# --- per request -------------------------------------------------------------------------------


def record_json(
    record: RequestRecord,
    *,
    server_counts: bool = False,
    phase: str = "profiling",
    goodput: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """One ``profile_export.jsonl`` line (aiperf's ``MetricRecordInfo``) of a request of the
    ``phase`` (``warmup`` or ``profiling``); with SLOs, a valid request's
    ``good_request_count`` is 1 when it met them, else 0."""

    def wall(ns: int | None) -> int | None:
        return None if ns is None else record.start_wall_ns + (ns - record.start_ns)

    metadata: dict[str, Any] = {"session_num": record.index}
    if record.conversation is not None:
        metadata["conversation_id"] = record.conversation
    metadata["turn_index"] = 0
    if record.credit_ns is not None:
        metadata["credit_issued_ns"] = wall(record.credit_ns)
    metadata["request_start_ns"] = record.start_wall_ns
    if record.ack_ns is not None:
        metadata["request_ack_ns"] = wall(record.ack_ns)
    metadata["request_end_ns"] = wall(record.response_end_ns)
    metadata["worker_id"] = f"worker_{record.worker}"
    metadata["record_processor_id"] = "kvferry"
    metadata["benchmark_phase"] = phase
    metadata["phase_name"] = phase
    metadata["phase_kind"] = phase
    metadata["was_cancelled"] = False
    infos = RECORD_METRICS | ERROR_METRICS
    values = record_metrics(record, server_counts=server_counts) or error_metrics(record)
    metrics = {tag: {"value": value, "unit": infos[tag].unit} for tag, value in values.items()}
    if goodput and record.valid:
        metrics["good_request_count"] = {"value": int(is_good(values, goodput)), "unit": "requests"}
    out: dict[str, Any] = {"metadata": metadata, "metrics": metrics}
    if record.error is not None:
        out["error"] = record.error.to_json()
    elif not record.chunk_ns:
        out["error"] = {"code": 200, "type": "EmptyResponse", "message": "no content"}
    return out


# --- per level ---------------------------------------------------------------------------------


def input_config(report: ServeBenchReport, result: LevelResult) -> dict[str, Any]:
    """The run's settings, in aiperf's ``input_config`` sections where they exist."""
    o = report.options
    level = result.level
    load: dict[str, Any] = {"type": level.kind, "value": level.value}
    if level.max_concurrency:
        load["max_concurrency"] = level.max_concurrency
    if level.kind == "request_rate":
        load["arrival"] = o.arrival
    if o.request_count is not None:
        load["request_count"] = o.request_count
    if o.duration_s is not None:
        load["duration_s"] = o.duration_s
    load["warmup_requests"] = o.warmup_requests
    load["workers"] = o.workers
    return {
        "models": {"items": [{"name": report.model}]},
        "endpoint": {
            "urls": [report.url],
            "type": o.endpoint,
            "streaming": True,
            "use_server_token_count": o.use_server_token_count,
            "extra": {"ignore_eos": True} if o.ignore_eos else {},
        },
        "input": {
            "source": report.source,
            "isl": o.isl,
            "isl_stddev": o.isl_stddev,
            "osl": o.osl,
            "osl_stddev": o.osl_stddev,
            "trace_block_size": o.trace_block_size,
            "speedup": o.speedup,
            "seed": o.seed,
        },
        "tokenizer": {"name": o.tokenizer or "words"},
        "load": load,
        "goodput": dict(o.goodput),
    }


def _metrics_json(metrics: RunMetrics) -> dict[str, Any]:
    return {tag: metric.to_json() for tag, metric in metrics.metrics.items()}


def aiperf_json(report: ServeBenchReport, result: LevelResult) -> dict[str, Any]:
    """``profile_export_aiperf.json`` of one level."""
    out: dict[str, Any] = {
        "schema_version": AIPERF_SCHEMA_VERSION,
        "generator": f"kvferry bench serve {_version()}",
        "benchmark_id": report.benchmark_id,
    }
    out.update(_metrics_json(result.metrics))
    out["input_config"] = input_config(report, result)
    out["run_info"] = {
        "benchmark_id": report.benchmark_id,
        "random_seed": report.options.seed,
        "trial": 0,
        "cli_command": report.command,
    }
    out["was_cancelled"] = False
    out["is_complete"] = True
    out["error_summary"] = result.metrics.error_summary()
    out["start_time"] = datetime.fromtimestamp(result.start_time).isoformat()
    out["end_time"] = datetime.fromtimestamp(result.end_time).isoformat()
    if result.warmup_metrics is not None:
        out["warmup_metrics"] = _metrics_json(result.warmup_metrics)
    out["warmup_error_count"] = result.warmup_errors
    return out


def _number(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}"


def _name(metric: MetricResult) -> str:
    if metric.unit.lower() in ("count", "requests"):
        return metric.header
    return f"{metric.header} ({metric.unit})"


def aiperf_csv(result: LevelResult) -> str:
    """``profile_export_aiperf.csv`` of one level (aiperf's layout, sorted by tag)."""
    buf = io.StringIO()
    writer = csv.writer(buf)  # \r\n line ends, as aiperf's csv.writer writes them
    metrics = result.metrics.metrics
    records = {t: m for t, m in metrics.items() if m.has_percentiles}
    scalars = {t: m for t, m in metrics.items() if not m.has_percentiles}
    if records:
        writer.writerow(["Metric", *CSV_STATS])
        for _, m in sorted(records.items()):
            stats = {"avg": m.avg, "min": m.min, "max": m.max, "sum": m.sum, "std": m.std}
            row = [_name(m)]
            for stat in CSV_STATS:
                row.append(_number(stats[stat] if stat in stats else m.p(int(stat[1:]))))
            writer.writerow(row)
        if scalars:
            writer.writerow([])
    if scalars:
        writer.writerow(["Metric", "Value"])
        for _, m in sorted(scalars.items()):
            writer.writerow([_name(m), _number(m.avg)])
    return buf.getvalue()


def _write_level(directory: Path, report: ServeBenchReport, result: LevelResult) -> list[Path]:
    _mkdir(directory)
    server = report.options.use_server_token_count
    phases = [("warmup", r) for r in result.warmup_records]
    phases += [("profiling", r) for r in result.records]
    lines = (
        json.dumps(
            record_json(r, server_counts=server, phase=p, goodput=report.options.goodput),
            separators=(",", ":"),
        )
        for p, r in phases
    )
    jsonl = _write(directory / "profile_export.jsonl", "".join(line + "\n" for line in lines))
    summary = _write(
        directory / "profile_export_aiperf.json",
        json.dumps(aiperf_json(report, result), indent=2) + "\n",
    )
    table = _write(directory / "profile_export_aiperf.csv", aiperf_csv(result))
    return [jsonl, summary, table]


# --- the run -----------------------------------------------------------------------------------


def summary_json(report: ServeBenchReport, dirs: Sequence[str] = ()) -> dict[str, Any]:
    """``sweep_summary.json`` and ``--json``: the report on the lab's result model
    (:meth:`~kvferry.bench.endpoint.report.ServeBenchReport.to_json`, which
    :func:`kvferry.bench.result.load_result` reads back), with the summary's keys beside it
    (``levels`` ..., each level's ``artifact_dir`` from ``dirs``)."""
    return report.to_json(dirs)


def sweep_csv(report: ServeBenchReport) -> str:
    """``sweep_summary.csv``: one row per level, the headline figures."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = [
        "level",
        "kind",
        "value",
        "request_count",
        "error_request_count",
        "benchmark_duration_s",
        "request_throughput",
        "output_token_throughput",
        "goodput",
        "isl_avg",
        "osl_avg",
    ]
    for _, name in SWEEP_METRICS:
        header += [f"{name}_{stat}" for stat in SWEEP_STATS]
    writer.writerow(header)
    for result in report.cases:
        m = result.metrics
        row: list[object] = [
            result.level.name,
            result.level.kind,
            f"{result.level.value:g}",
            m.request_count,
            m.error_count,
            f"{m.duration_s:.6f}",
        ]
        for tag in ("request_throughput", "output_token_throughput", "goodput"):
            value = m.value(tag)
            row.append("" if value is None else f"{value:.6f}")
        for tag in ("input_sequence_length", "output_sequence_length"):
            value = m.value(tag)
            row.append("" if value is None else f"{value:.3f}")
        for tag, _ in SWEEP_METRICS:
            for stat in SWEEP_STATS:
                value = m.value(tag, stat)
                row.append("" if value is None else f"{value:.6f}")
        writer.writerow(row)
    return buf.getvalue()


def write_artifacts(report: ServeBenchReport, directory: str | os.PathLike[str]) -> list[Path]:
    """Write every level's files, and for a sweep the summary; returns the paths written.

    Raises:
        EndpointBenchError: a directory or file cannot be written.
    """
    root = _mkdir(Path(directory))
    written: list[Path] = []
    if len(report.cases) == 1:
        return _write_level(root, report, report.cases[0])
    dirs: list[str] = []
    for result in report.cases:
        written += _write_level(root / result.level.name, report, result)
        dirs.append(str(root / result.level.name))
    text = json.dumps(summary_json(report, dirs), indent=2) + "\n"
    written.append(_write(root / "sweep_summary.json", text))
    written.append(_write(root / "sweep_summary.csv", sweep_csv(report)))
    return written


# --- plots -------------------------------------------------------------------------------------


def require_matplotlib() -> None:
    """Raise MissingDependency (the ``plot`` extra) when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise MissingDependency("matplotlib", "plot") from e


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (larger is better),
    ordered by the first coordinate."""
    front = []
    for i, (x, y) in enumerate(points):
        beaten = any(
            (ox >= x and oy >= y) and (ox > x or oy > y)
            for j, (ox, oy) in enumerate(points)
            if j != i
        )
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_sweep(report: ServeBenchReport, directory: str | os.PathLike[str]) -> list[Path]:
    """The sweep's plots (module docstring) as PNG files in ``directory``.

    Raises:
        MissingDependency: matplotlib is not installed (``pip install 'kvferry[plot]'``).
        EndpointBenchError: a file cannot be written.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = _mkdir(Path(directory))
    levels = report.cases
    kind = levels[0].level.kind if levels else "concurrency"
    axis = {"concurrency": "concurrency", "request_rate": "request rate (requests/s)"}.get(
        kind, "level"
    )
    stem = {"concurrency": "concurrency", "request_rate": "request_rate"}.get(kind, "level")
    xs = [r.level.value for r in levels]
    written: list[Path] = []
    identity = serve_identity(report, root.name)

    def save(fig: Any, name: str) -> None:
        path = root / name
        stamp(fig, identity)  # which run drew it: run name, target, load, date, host
        try:
            fig.savefig(path, dpi=120)
        except OSError as e:
            raise EndpointBenchError(f"cannot write the plot {str(path)!r}: {e.strerror}") from e
        finally:
            plt.close(fig)
        written.append(path)

    def ticks(ax: Any) -> None:
        """Concurrency doubles from level to level: a log2 axis, ticks at the levels."""
        if kind == "concurrency" and len(xs) > 1 and min(xs) > 0:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])

    def series(tag: str, stat: str) -> list[float]:
        return [float(r.metrics.value(tag, stat) or float("nan")) for r in levels]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, tag, title in (
        (axes[0], "time_to_first_token", "TTFT"),
        (axes[1], "inter_token_latency", "ITL"),
    ):
        for stat in ("p50", "p90", "p99"):
            ax.plot(xs, series(tag, stat), marker="o", label=stat)
        ax.set_xlabel(axis)
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(f"{title} vs {axis}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        ticks(ax)
    fig.tight_layout()
    save(fig, f"ttft_itl_vs_{stem}.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, tag, label in (
        (axes[0], "output_token_throughput", "output tokens/s"),
        (axes[1], "request_throughput", "requests/s"),
    ):
        ax.plot(xs, series(tag, "avg"), marker="o")
        ax.set_xlabel(axis)
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs {axis}")
        ax.grid(True, alpha=0.3)
        ticks(ax)
    fig.tight_layout()
    save(fig, f"throughput_vs_{stem}.png")

    points = [
        (
            r.metrics.value("output_token_throughput_per_user") or 0.0,
            r.metrics.value("output_token_throughput") or 0.0,
        )
        for r in levels
    ]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", label="levels")
    ax.plot(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        color="tab:red",
        marker="o",
        label="Pareto front",
    )
    for result, (x, y) in zip(levels, points):
        ax.annotate(
            f"{result.level.value:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.set_xlabel("output tokens/s/user (avg)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"throughput vs interactivity ({report.model})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save(fig, "pareto.png")
    return written
