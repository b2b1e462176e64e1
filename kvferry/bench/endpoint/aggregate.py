"""Aggregates of one run of the endpoint bench (one level of a sweep, or its warm-up), pure.

Owns :class:`MetricResult` (a metric's statistics, aiperf's ``JsonMetricResult``),
:class:`RunMetrics` and :func:`aggregate`, which turns a run's records into every metric aiperf
0.13 reports for it. Per-request definitions are :mod:`kvferry.bench.endpoint.metrics`; the
time-weighted load curves :mod:`kvferry.bench.endpoint.sweeps`. No sockets, no clock, no files.

Record metrics (over valid requests) get avg, min, max, population std, sum, count and p1, p5,
p10, p25, p50, p75, p90, p95, p99 by linear interpolation (:mod:`kvferry.bench.stats`, whose
definition is also aiperf's). Run metrics (one value each, in ``avg``):

- ``request_count`` (valid requests), ``error_request_count`` (failed; only when some failed),
  ``completed_request_count`` (both), ``request_error_rate`` = 100 failed / completed.
- ``benchmark_duration`` = last content response - first request start, over valid requests
  (seconds); ``request_throughput`` = request_count / duration; ``output_token_throughput`` =
  total OSL / duration; ``input_token_throughput`` = total ISL / duration;
  ``total_token_throughput`` = (total ISL + total OSL) / duration.
- ``total_isl``, ``total_osl``, ``total_output_tokens``, ``total_reasoning_tokens``,
  ``total_usage_*``, ``total_error_isl``: sums of the per-request metric.
- ``overall_usage_prompt_cache_read_pct`` = 100 total cache-read tokens / total usage prompt
  tokens.
- ``osl_mismatch_count``: requests whose OSL is off ``max_tokens`` by more than min(5 %, 50
  tokens); ``usage_discrepancy_count``: requests whose usage prompt, completion or reasoning
  count is off the client's by more than 10 %; ``context_overflow_count`` (when some failed):
  failures whose message says the context overflowed.
- goodput (with SLOs): ``good_request_count``, ``goodput`` = good / duration,
  ``good_request_fraction`` = good / completed; a request is good when every metric named in
  the SLOs meets its threshold (at most it for latencies, at least it where larger is better).
- ``adj_<tag>`` (when some failed) for TTFT, ITL, request latency and decode duration: the
  values with each failure counted as an infinitely slow request (nearest-rank percentiles;
  the infinite statistics are left out), aiperf's error-adjusted band.
- ``credit_to_start_latency`` = start - credit issue and ``effective_latency`` = end - credit
  issue (coordinated-omission aware), per request, failed ones included (not for a trace
  replay, whose requests have a schedule instead of credits).
- ``replay_sched_lag_p50/p90/p99`` (trace replay): each request's send lateness against its
  schedule, less the least late one's; ``replay_sched_degraded`` = p99 > 500 ms.
- the sweep metrics (:mod:`kvferry.bench.endpoint.sweeps`) over the run's window.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kvferry.bench.endpoint.metrics import (
    ERROR_METRICS,
    NS_PER_MS,
    NS_PER_S,
    PERCENTILES,
    RECORD_METRICS,
    ErrorInfo,
    MetricInfo,
    RequestRecord,
    error_metrics,
    is_context_overflow,
    is_good,
    record_metrics,
)
from kvferry.bench.endpoint.sweeps import SWEEP_METRICS, SweepInputs, SweepStats, sweep_stats
from kvferry.bench.stats import Summary, percentile

__all__ = ["ADJUSTED", "RUN_METRICS", "MetricResult", "RunMetrics", "aggregate"]

USAGE_DIFF_THRESHOLD_PCT = 10.0
OSL_MISMATCH_PCT = 5.0
OSL_MISMATCH_MAX_TOKENS = 50
REPLAY_DEGRADED_MS = 500.0

ADJUSTED = ("time_to_first_token", "request_latency", "inter_token_latency", "decode_duration")
"""Metrics that get an error-adjusted ``adj_`` band when requests failed."""


def _m(tag: str, header: str, unit: str, larger: bool = False) -> MetricInfo:
    return MetricInfo(tag, header, unit, larger)


RUN_METRICS: dict[str, MetricInfo] = {
    i.tag: i
    for i in (
        _m("request_throughput", "Request Throughput", "requests/sec", True),
        _m("request_count", "Request Count", "requests", True),
        _m("error_request_count", "Error Request Count", "requests"),
        _m("completed_request_count", "Completed Requests (Success + Error)", "requests"),
        _m("request_error_rate", "Request Error Rate", "%"),
        _m("benchmark_duration", "Benchmark Duration", "sec"),
        _m("output_token_throughput", "Output Token Throughput", "tokens/sec", True),
        _m("input_token_throughput", "Input Token Throughput", "tokens/sec", True),
        _m("total_token_throughput", "Total Token Throughput", "tokens/sec", True),
        _m("total_isl", "Total Input Sequence Length", "tokens", True),
        _m("total_osl", "Total Output Sequence Length", "tokens", True),
        _m("total_output_tokens", "Total Output Tokens", "tokens", True),
        _m("total_reasoning_tokens", "Total Reasoning Tokens", "tokens", True),
        _m("total_error_isl", "Total Error Input Sequence Length", "tokens", True),
        _m("osl_mismatch_count", "OSL Mismatch Count", "requests"),
        _m("usage_discrepancy_count", "Usage Discrepancy Count", "requests"),
        _m("context_overflow_count", "Context Overflow Count", "requests"),
        _m("overall_usage_prompt_cache_read_pct", "Overall Usage Prompt Cache Read %", "%", True),
        _m("good_request_count", "Good Request Count", "requests", True),
        _m("goodput", "Goodput", "requests/sec", True),
        _m("good_request_fraction", "GoodRequestFraction", "ratio", True),
        _m("replay_sched_lag_p50", "Replay Schedule Lag p50", "ms"),
        _m("replay_sched_lag_p90", "Replay Schedule Lag p90", "ms"),
        _m("replay_sched_lag_p99", "Replay Schedule Lag p99", "ms"),
        _m("replay_sched_degraded", "Replay Schedule Degraded", "count"),
    )
}
"""Metrics of a whole run: one value each (``total_usage_*`` are added per usage metric)."""


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class MetricResult:
    """A metric's statistics over a run, or (run metrics) its one value in ``avg``. A statistic
    the metric does not have is None (a non-finite one too: aiperf leaves those out)."""

    tag: str
    header: str
    unit: str
    avg: float | None
    min: float | None = None
    max: float | None = None
    std: float | None = None
    count: int | None = None
    sum: float | None = None
    percentiles: tuple[float | None, ...] = ()
    """At :data:`PERCENTILES`; empty for run metrics."""

    @classmethod
    def of(cls, info: MetricInfo, values: Sequence[float]) -> MetricResult:
        """Statistics of ``values`` (at least one).

        Raises:
            ValueError: no values, or a NaN among them.
        """
        summary = Summary.of(values)
        ordered = np.sort(np.asarray(values, dtype=np.float64))
        return cls(
            tag=info.tag,
            header=info.header,
            unit=info.unit,
            avg=summary.avg,
            min=summary.min,
            max=summary.max,
            std=summary.std,
            count=summary.count,
            sum=float(ordered.sum()),
            percentiles=tuple(percentile(ordered, p) for p in PERCENTILES),
        )

    @classmethod
    def scalar(cls, info: MetricInfo, value: float, count: int | None = None) -> MetricResult:
        return cls(tag=info.tag, header=info.header, unit=info.unit, avg=float(value), count=count)

    @classmethod
    def sweep(cls, tag: str, stats: SweepStats) -> MetricResult:
        """A time-weighted curve's statistics: no count, sum or p1..p25, p75."""
        header, unit = SWEEP_METRICS[tag]
        band = {50: stats.p50, 90: stats.p90, 95: stats.p95, 99: stats.p99}
        return cls(
            tag=tag,
            header=header,
            unit=unit,
            avg=_finite(stats.avg),
            min=_finite(stats.min),
            max=_finite(stats.max),
            std=_finite(stats.std),
            percentiles=tuple(_finite(band.get(q)) for q in PERCENTILES),
        )

    @classmethod
    def adjusted(cls, info: MetricInfo, values: Sequence[float], failed: int) -> MetricResult:
        """``adj_<tag>``: ``values`` plus ``failed`` infinite ones, nearest-rank percentiles."""
        inflated = np.concatenate([np.sort(np.asarray(values, dtype=np.float64)),
                                   np.full(failed, np.inf)])  # fmt: skip
        band = np.percentile(inflated, PERCENTILES, method="nearest")
        return cls(
            tag=f"adj_{info.tag}",
            header=f"{info.header} (error-adjusted)",
            unit=info.unit,
            avg=_finite(float(np.mean(inflated))),
            min=_finite(float(inflated[0])),
            max=_finite(float(inflated[-1])),
            count=int(inflated.size),
            sum=_finite(float(np.sum(inflated))),
            percentiles=tuple(_finite(float(v)) for v in band),
        )

    @classmethod
    def distribution(cls, tag: str, header: str, values_ms: Sequence[float]) -> MetricResult:
        """Statistics of per-request ms values (numpy's percentiles, as aiperf's derived
        latency metrics compute them)."""
        arr = np.asarray(values_ms, dtype=np.float64)
        return cls(
            tag=tag,
            header=header,
            unit="ms",
            avg=float(arr.mean()),
            min=float(arr.min()),
            max=float(arr.max()),
            std=float(arr.std()),
            count=int(arr.size),
            sum=float(arr.sum()),
            percentiles=tuple(float(v) for v in np.percentile(arr, PERCENTILES)),
        )

    @property
    def has_percentiles(self) -> bool:
        return any(v is not None for v in self.percentiles)

    def p(self, q: int) -> float | None:
        """The ``q``-th percentile (one of :data:`PERCENTILES`), None if it has none."""
        if not self.percentiles:
            return None
        return self.percentiles[PERCENTILES.index(q)]

    def to_json(self) -> dict[str, object]:
        """aiperf's ``JsonMetricResult``: unit, avg, p1..p99, min, max, std, count, sum (the
        statistics the metric does not have are left out, as aiperf leaves them out)."""
        out: dict[str, object] = {"unit": self.unit}
        if self.avg is not None:
            out["avg"] = self.avg
        for q, value in zip(PERCENTILES, self.percentiles, strict=False):
            if value is not None:
                out[f"p{q}"] = value
        for key in ("min", "max", "std", "count", "sum"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass
class RunMetrics:
    """The aggregates of one run (one level of a sweep, or its warm-up)."""

    metrics: dict[str, MetricResult]
    """By tag: record metrics (statistics) first, then run metrics, then derived ones."""
    errors: list[tuple[ErrorInfo, int]]
    """Distinct errors and how often each happened, most frequent first."""
    request_count: int
    error_count: int
    duration_s: float

    def value(self, tag: str, stat: str = "avg") -> float | None:
        """One statistic (``avg``, ``min``, ``max``, ``std`` or ``p50`` ...) of a metric, None
        when the run has no such metric or statistic."""
        result = self.metrics.get(tag)
        if result is None:
            return None
        if stat.startswith("p") and stat[1:].isdigit():
            return result.p(int(stat[1:]))
        value = getattr(result, stat)
        return None if value is None else float(value)

    def error_summary(self) -> list[dict[str, object]]:
        """aiperf's ``error_summary``: ``[{"error_details": {...}, "count": n}, ...]``."""
        return [{"error_details": e.to_json(), "count": n} for e, n in self.errors]


def _nan(value: object) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _sweeps(
    records: Sequence[RequestRecord],
    per_request: Sequence[Mapping[str, object]],
    window: tuple[int, int] | None,
) -> dict[str, MetricResult]:
    start = np.array([r.start_ns for r in records], dtype=np.float64)
    end = np.array([r.response_end_ns for r in records], dtype=np.float64)
    gen = np.array([r.chunk_ns[0] if r.valid else math.nan for r in records], dtype=np.float64)
    icl = [
        # gaps from the integer stamps: float64 epoch-ns stamps would round each gap to 256 ns
        np.diff(np.asarray(r.chunk_ns, dtype=np.int64)).astype(np.float64)
        if r.valid
        else np.zeros(0)
        for r in records
    ]
    inputs = SweepInputs(
        start=start,
        gen=gen,
        end=end,
        isl=np.array([_nan(m.get("input_sequence_length")) for m in per_request]),
        osl=np.array([_nan(m.get("output_sequence_length")) for m in per_request]),
        icl=icl,
    )
    lohi = None if window is None else (float(window[0]), float(window[1]))
    return {tag: MetricResult.sweep(tag, s) for tag, s in sweep_stats(inputs, lohi).items()}


def _credit_latencies(records: Sequence[RequestRecord]) -> dict[str, MetricResult]:
    to_start: list[float] = []
    effective: list[float] = []
    for r in records:
        if r.credit_ns is not None:  # clamped at 0, as aiperf clamps clock jitter
            to_start.append(max(r.start_ns - r.credit_ns, 0) / NS_PER_MS)
            effective.append(max(r.response_end_ns - r.credit_ns, 0) / NS_PER_MS)
    if not to_start:
        return {}
    return {
        "credit_to_start_latency": MetricResult.distribution(
            "credit_to_start_latency", "Credit-to-Start Latency", to_start
        ),
        "effective_latency": MetricResult.distribution(
            "effective_latency", "Effective Latency (CO-aware)", effective
        ),
    }


def _replay_lag(records: Sequence[RequestRecord]) -> dict[str, MetricResult]:
    offsets = np.array(
        [r.start_ns - r.scheduled_ns for r in records if r.scheduled_ns is not None],
        dtype=np.float64,
    )
    if offsets.size == 0:
        return {}
    lag_ms = (offsets - offsets.min()) / NS_PER_MS
    out = {}
    for q in (50, 90, 99):
        tag = f"replay_sched_lag_p{q}"
        out[tag] = MetricResult.scalar(RUN_METRICS[tag], float(np.percentile(lag_ms, q)), 1)
    degraded = out["replay_sched_lag_p99"].avg or 0.0
    out["replay_sched_degraded"] = MetricResult.scalar(
        RUN_METRICS["replay_sched_degraded"], float(degraded > REPLAY_DEGRADED_MS), 1
    )
    return out


def _usage_discrepancy(metrics: Mapping[str, object]) -> int | None:
    prompt = metrics.get("usage_prompt_tokens_diff_pct")
    completion = metrics.get("usage_completion_tokens_diff_pct")
    if not isinstance(prompt, float) or not isinstance(completion, float):
        return None
    reasoning = metrics.get("usage_reasoning_tokens_diff_pct")
    diffs = [prompt, completion] + ([reasoning] if isinstance(reasoning, float) else [])
    return int(any(d > USAGE_DIFF_THRESHOLD_PCT for d in diffs))


def _osl_mismatch(record: RequestRecord, metrics: Mapping[str, object]) -> int | None:
    osl = metrics.get("output_sequence_length")
    asked = record.requested_osl
    if not isinstance(osl, int) or not asked:
        return None
    threshold = min(asked * OSL_MISMATCH_PCT / 100, OSL_MISMATCH_MAX_TOKENS)
    return int(abs(osl - asked) > threshold)


def aggregate(
    records: Iterable[RequestRecord],
    *,
    server_counts: bool = False,
    goodput: Mapping[str, float] | None = None,
    window_ns: tuple[int, int] | None = None,
) -> RunMetrics:
    """Aggregate one run's records (one phase: the measured requests, or the warm-up).

    Args:
        records: every request of the run, failed ones included.
        server_counts: ISL/OSL from the server's usage (see
            :func:`~kvferry.bench.endpoint.metrics.record_metrics`).
        goodput: SLOs from :func:`~kvferry.bench.endpoint.metrics.parse_goodput`; None or
            empty = no goodput metrics.
        window_ns: ``(start, end)`` of the run in the records' clock, over which the sweep
            metrics are time-weighted; None: from the first request start to the last end.

    Returns:
        The metrics the run supports (module docstring). Throughputs and goodput need a
        positive duration, i.e. at least one valid request.
    """
    records = list(records)
    values: dict[str, list[float]] = {tag: [] for tag in (*RECORD_METRICS, *ERROR_METRICS)}
    errors: Counter[ErrorInfo] = Counter()
    per_request: list[dict[str, object]] = []
    counters: Counter[str] = Counter()
    valid = good = 0
    first_start: int | None = None
    last_response: int | None = None
    for record in records:
        if not record.valid:
            error = record.error or ErrorInfo(None, "EmptyResponse", "the response had no content")
            errors[error] += 1
            counters["context_overflow_count"] += is_context_overflow(error)
            for tag, value in error_metrics(record).items():
                values[tag].append(float(value))  # type: ignore[arg-type]
            per_request.append({})
            continue
        valid += 1
        metrics = record_metrics(record, server_counts=server_counts)
        per_request.append(dict(metrics))
        for tag, value in metrics.items():
            if isinstance(value, list):
                values[tag].extend(value)
            else:
                values[tag].append(float(value))
        start, end = record.start_ns, record.chunk_ns[-1]
        first_start = start if first_start is None else min(first_start, start)
        last_response = end if last_response is None else max(last_response, end)
        for tag, flag in (
            ("osl_mismatch_count", _osl_mismatch(record, metrics)),
            ("usage_discrepancy_count", _usage_discrepancy(metrics)),
        ):
            if flag is not None:
                counters[tag] += flag
        if goodput and is_good(metrics, goodput):
            good += 1

    infos = RECORD_METRICS | ERROR_METRICS
    out: dict[str, MetricResult] = {
        tag: MetricResult.of(infos[tag], vals) for tag, vals in values.items() if vals
    }
    run = RUN_METRICS
    failed = sum(errors.values())
    duration_s = 0.0
    if first_start is not None and last_response is not None:
        duration_s = (last_response - first_start) / NS_PER_S

    def put(tag: str, value: float, info: MetricInfo | None = None) -> None:
        out[tag] = MetricResult.scalar(info or run[tag], value)

    def total(tag: str) -> float:
        return float(sum(values[tag]))

    if valid:
        put("request_count", valid)
    if failed:
        put("error_request_count", failed)
    if valid + failed:
        put("completed_request_count", valid + failed)
        put("request_error_rate", 100.0 * failed / (valid + failed))
    # Rates are over the observation window when there is one (aiperf's phase, from its
    # start to the last request's end), else over the benchmark duration.
    observed_s = duration_s
    if window_ns is not None and window_ns[1] > window_ns[0]:
        observed_s = (window_ns[1] - window_ns[0]) / NS_PER_S
    if duration_s > 0:
        put("benchmark_duration", duration_s)
    if valid and observed_s > 0:
        put("request_throughput", valid / observed_s)
    sums = {
        "total_isl": "input_sequence_length",
        "total_osl": "output_sequence_length",
        "total_output_tokens": "output_token_count",
        "total_reasoning_tokens": "reasoning_token_count",
        "total_error_isl": "error_isl",
    }
    for tag, source in sums.items():
        if values[source]:
            put(tag, total(source))
    if valid and observed_s > 0:
        if values["output_sequence_length"]:
            put("output_token_throughput", total("output_sequence_length") / observed_s)
        if values["input_sequence_length"]:
            put("input_token_throughput", total("input_sequence_length") / observed_s)
        if values["input_sequence_length"] and values["output_sequence_length"]:
            tokens = total("input_sequence_length") + total("output_sequence_length")
            put("total_token_throughput", tokens / observed_s)
    for tag in RECORD_METRICS:
        if tag.startswith("usage_") and not tag.endswith("_pct") and values[tag]:
            info = RECORD_METRICS[tag]
            put(f"total_{tag}", total(tag), _m(f"total_{tag}", f"Total {info.header}",
                                               info.unit, info.larger_is_better))  # fmt: skip
    prompt, cached = values["usage_prompt_tokens"], values["usage_prompt_cache_read_tokens"]
    if prompt and cached and sum(prompt) > 0:
        put("overall_usage_prompt_cache_read_pct", 100.0 * sum(cached) / sum(prompt))
    for tag in ("osl_mismatch_count", "usage_discrepancy_count"):
        if tag in counters:
            put(tag, counters[tag])
    if failed:
        put("context_overflow_count", counters["context_overflow_count"])
    if goodput:
        put("good_request_count", good)
        if valid and observed_s > 0:
            put("goodput", good / observed_s)
        put("good_request_fraction", good / (valid + failed) if valid + failed else 0.0)
    if failed:
        for tag in ADJUSTED:
            if values[tag]:
                adj = MetricResult.adjusted(RECORD_METRICS[tag], values[tag], failed)
                out[adj.tag] = adj
    if records:
        out.update(_sweeps(records, per_request, window_ns))
        out.update(_credit_latencies(records))
        out.update(_replay_lag(records))
    ranked = sorted(errors.items(), key=lambda kv: (-kv[1], kv[0].type, kv[0].message))
    return RunMetrics(
        metrics=out,
        errors=ranked,
        request_count=valid,
        error_count=failed,
        duration_s=duration_s,
    )
