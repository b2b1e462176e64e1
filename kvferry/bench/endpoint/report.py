"""What the endpoint bench returns: :class:`ServeBenchReport`, one :class:`LevelResult` per
load level, on the lab's result model (:class:`~kvferry.bench.result.BenchResult`, tool
``serve``).

A level's case holds its aggregates (:class:`~kvferry.bench.endpoint.aggregate.RunMetrics`,
built on :mod:`kvferry.bench.stats`) and, in memory only, its per-request records (they go to
``profile_export.jsonl``, :mod:`kvferry.bench.endpoint.export`; a report read back from JSON has
none). :meth:`ServeBenchReport.to_json` writes the model's fields and, beside them, the keys of
the summary ``kvferry bench serve --json`` wrote before the model (``generator``, ``endpoint``,
``tokenizer``, ``levels`` with aiperf-shaped metrics ...), so readers of either find theirs.

Files without the model's ``schema`` field are read by :meth:`ServeBenchReport.from_legacy`:
the old ``--json`` / ``sweep_summary.json`` summary, and the output of
``benchmarks/serve_vs_aiperf.py`` (kvferry against aiperf on one server: its rounds become
cases, aiperf's medians references, and kvferry / aiperf per metric ratios with their
per-round values).
"""

from __future__ import annotations

import statistics
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvferry.bench.endpoint.aggregate import MetricResult, RunMetrics
from kvferry.bench.endpoint.metrics import PERCENTILES, ErrorInfo, RequestRecord
from kvferry.bench.endpoint.options import Level, ServeBenchOptions
from kvferry.bench.result import BenchResult, Environment, Ratio, Reference, ResultError
from kvferry.version import __version__

__all__ = ["SUMMARY_SCHEMA_VERSION", "LevelResult", "ServeBenchReport", "is_legacy_serve"]

SUMMARY_SCHEMA_VERSION = 1
"""Of the summary keys (``levels`` ...) written beside the model's."""

_NOT_JSON: dict[str, Any] = {"json": False}


@dataclass(kw_only=True)
class LevelResult:
    """One level: its aggregates, and the same of its warm-up; its records while in memory."""

    level: Level
    metrics: RunMetrics
    planned: int | None = None
    """Requests planned, None when the level ran for a duration."""
    warmup_metrics: RunMetrics | None = None
    """None when the level had no warm-up."""
    window_ns: tuple[int, int] = (0, 0)
    """The measured phase: from its start to its last request's end (monotonic ns)."""
    wall_offset_ns: int = 0
    """``time.time_ns() - time.monotonic_ns()`` when the level ran."""
    records: list[RequestRecord] = field(default_factory=list, metadata=_NOT_JSON)
    """The measured requests (not in JSON: ``profile_export.jsonl`` holds them)."""
    warmup_records: list[RequestRecord] = field(default_factory=list, metadata=_NOT_JSON)

    @property
    def warmup_errors(self) -> int:
        return 0 if self.warmup_metrics is None else self.warmup_metrics.error_count

    @property
    def start_time(self) -> float:
        """``time.time()`` of the measured phase's start."""
        return (self.window_ns[0] + self.wall_offset_ns) / 1e9

    @property
    def end_time(self) -> float:
        return (self.window_ns[1] + self.wall_offset_ns) / 1e9

    def summary(self, artifact_dir: str | None = None) -> dict[str, Any]:
        """The level's entry of the summary's ``levels`` (aiperf-shaped metrics)."""
        m = self.metrics
        entry: dict[str, Any] = {
            "name": self.level.name,
            "kind": self.level.kind,
            "value": self.level.value,
        }
        if self.level.max_concurrency:
            entry["max_concurrency"] = self.level.max_concurrency
        if artifact_dir is not None:
            entry["artifact_dir"] = artifact_dir
        entry.update(
            {
                "planned_requests": self.planned,
                "request_count": m.request_count,
                "error_request_count": m.error_count,
                "warmup_error_count": self.warmup_errors,
                "benchmark_duration_s": m.duration_s,
                "metrics": {tag: metric.to_json() for tag, metric in m.metrics.items()},
                "error_summary": m.error_summary(),
            }
        )
        return entry


@dataclass(kw_only=True)
class ServeBenchReport(BenchResult):
    """A whole run: the options, the server's model and URL, one case per level."""

    tool = "serve"

    options: ServeBenchOptions
    model: str = ""
    url: str = ""
    """The endpoint URL the requests went to."""
    source: str = ""
    """``synthetic ...``, ``trace FILE``, ``workload SPEC`` or ``input file ...``."""
    cases: list[LevelResult] = field(default_factory=list)
    """One per level, in the order they ran."""
    benchmark_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    """Names the run in its exports (aiperf's ``benchmark_id``)."""

    def summary(self, dirs: Sequence[str] = ()) -> dict[str, Any]:
        """The keys of the pre-model summary: the run and every level's aggregates
        (``dirs``: each level's artifact directory, for ``sweep_summary.json``)."""
        o = self.options
        levels = [
            case.summary(dirs[i] if i < len(dirs) else None) for i, case in enumerate(self.cases)
        ]
        return {
            "generator": f"kvferry bench serve {__version__}",
            "url": self.url,
            "endpoint": o.endpoint,
            "model": self.model,
            "source": self.source,
            "tokenizer": o.tokenizer or "words",
            "use_server_token_count": o.use_server_token_count,
            "goodput": dict(o.goodput),
            "levels": levels,
        }

    def to_json(self, dirs: Sequence[str] = ()) -> dict[str, Any]:
        """The model's JSON, with the summary's keys beside it (module docstring)."""
        out = super().to_json()
        for key, value in self.summary(dirs).items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_legacy(cls, data: Mapping[str, Any]) -> ServeBenchReport:
        """A file written before the result model (module docstring).

        Raises:
            ResultError: neither shape.
        """
        try:
            if _is_summary(data):
                return _from_summary(data)
            if _is_vs_aiperf(data):
                return _from_vs_aiperf(data)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ResultError(f"malformed pre-model serve result: {e}") from e
        raise ResultError(
            "not a kvferry bench serve result: no schema, and neither the old --json summary "
            'nor serve_vs_aiperf.py output ("generator": "kvferry bench serve ...", "levels")'
        )


# --- files written before the result model ----------------------------------------------------


def _is_summary(data: Mapping[str, Any]) -> bool:
    generator = data.get("generator")
    return (
        isinstance(generator, str)
        and generator.startswith("kvferry bench serve")
        and isinstance(data.get("levels"), list)
    )


def _is_vs_aiperf(data: Mapping[str, Any]) -> bool:
    runs = data.get("runs")
    return isinstance(runs, Mapping) and "kvferry" in runs and "aiperf" in runs


def is_legacy_serve(data: Mapping[str, Any]) -> bool:
    """Whether ``data`` is a pre-model file of this bench (:meth:`ServeBenchReport.from_legacy`
    reads it)."""
    return _is_summary(data) or _is_vs_aiperf(data)


def _legacy_environment() -> Environment:
    """An old file says nothing of its machine: an empty snapshot, not this machine's."""
    return Environment()


def _metric(tag: str, data: Mapping[str, Any]) -> MetricResult:
    """A metric from its aiperf-shaped JSON (``MetricResult.to_json``)."""
    return MetricResult(
        tag=tag,
        header=tag,
        unit=str(data.get("unit", "")),
        avg=data.get("avg"),
        min=data.get("min"),
        max=data.get("max"),
        std=data.get("std"),
        count=data.get("count"),
        sum=data.get("sum"),
        percentiles=tuple(data.get(f"p{q}") for q in PERCENTILES)
        if any(f"p{q}" in data for q in PERCENTILES)
        else (),
    )


def _from_summary(data: Mapping[str, Any]) -> ServeBenchReport:
    kinds = {lv["kind"] for lv in data["levels"]}
    values = [lv["value"] for lv in data["levels"]]
    options = ServeBenchOptions(
        url=str(data.get("url") or "http://127.0.0.1:8000"),
        endpoint=str(data.get("endpoint", "completions")),
        tokenizer="" if data.get("tokenizer") in (None, "words") else str(data["tokenizer"]),
        use_server_token_count=bool(data.get("use_server_token_count", False)),
        goodput=dict(data.get("goodput") or {}),
        concurrency=tuple(int(v) for v in values) if kinds == {"concurrency"} else (),
        request_rate=tuple(float(v) for v in values) if kinds == {"request_rate"} else (),
    )
    cases = []
    for lv in data["levels"]:
        errors = [
            (ErrorInfo(e["error_details"].get("code"), e["error_details"]["type"],
                       e["error_details"]["message"]), int(e["count"]))
            for e in lv.get("error_summary", [])
        ]  # fmt: skip
        metrics = RunMetrics(
            metrics={tag: _metric(tag, m) for tag, m in lv.get("metrics", {}).items()},
            errors=errors,
            request_count=int(lv["request_count"]),
            error_count=int(lv.get("error_request_count", 0)),
            duration_s=float(lv.get("benchmark_duration_s", 0.0)),
        )
        warm = int(lv.get("warmup_error_count", 0))
        cases.append(
            LevelResult(
                level=Level(lv["kind"], float(lv["value"]), int(lv.get("max_concurrency", 0))),
                metrics=metrics,
                planned=lv.get("planned_requests"),
                warmup_metrics=RunMetrics({}, [], 0, warm, 0.0) if warm else None,
            )
        )
    return ServeBenchReport(
        environment=_legacy_environment(),
        options=options,
        model=str(data.get("model", "")),
        url=str(data.get("url", "")),
        source=str(data.get("source", "")),
        cases=cases,
        notes=[f"read from a pre-model summary ({data.get('generator')})"],
    )


def _figures(figures: Mapping[str, Any]) -> dict[str, MetricResult]:
    """``{"time_to_first_token p50": v, "request_throughput avg": w}`` -> metrics holding
    only those statistics."""
    stats: dict[str, dict[str, float]] = {}
    for name, value in figures.items():
        tag, _, stat = name.partition(" ")
        stats.setdefault(tag, {})[stat or "avg"] = float(value)
    out = {}
    for tag, known in stats.items():
        band = tuple(known.get(f"p{q}") for q in PERCENTILES)
        out[tag] = MetricResult(
            tag=tag,
            header=tag,
            unit="",
            avg=known.get("avg"),
            percentiles=band if any(v is not None for v in band) else (),
        )
    return out


def _from_vs_aiperf(data: Mapping[str, Any]) -> ServeBenchReport:
    args = data.get("args", {})
    rate = float(args.get("request_rate") or 0.0)
    concurrency = int(args.get("concurrency") or 1)
    options = ServeBenchOptions(
        concurrency=(concurrency,),
        request_rate=(rate,) if rate else (),
        arrival="constant",
        seed=int(args.get("seed", 0)),
        request_count=args.get("requests"),
        warmup_requests=int(args.get("warmup", 0)),
        isl=int(args.get("isl", 550)),
        osl=int(args.get("osl", 128)),
        input_file="(fixed prompts)",
    )
    level = options.levels()[0]
    cases = [
        LevelResult(level=level, metrics=RunMetrics(_figures(run["figures"]), [], 0, 0, 0.0))
        for run in data["runs"]["kvferry"]
    ]
    references = []
    ratios = []
    for row in data.get("rows", []):
        theirs = [float(v) for v in row["aiperf"]]
        ours = [float(v) for v in row["kvferry"]]
        references.append(Reference(f"aiperf {row['metric']}", statistics.median(theirs), ""))
        rounds = [a / b for a, b in zip(ours, theirs, strict=False) if b]
        ratios.append(
            Ratio(
                metric=row["metric"],
                subject="kvferry bench serve",
                reference="aiperf",
                value=statistics.median(ours) / statistics.median(theirs),
                rounds=rounds,
                case=level.name,
            )
        )
    return ServeBenchReport(
        environment=_legacy_environment(),
        options=options,
        model="kvferry-mock",
        source=f"input file: fixed prompts, isl {options.isl}, osl {options.osl}",
        cases=cases,
        references=references,
        ratios=ratios,
        notes=[
            "read from benchmarks/serve_vs_aiperf.py output: one case per kvferry round "
            "(its compared figures only), aiperf's medians as references"
        ],
    )
