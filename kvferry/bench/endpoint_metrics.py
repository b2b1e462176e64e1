"""Per-request metrics and run aggregates of the endpoint bench (``kvferry bench serve``), pure.

Owns what a request record holds (:class:`RequestRecord`), the per-request metrics computed from
it (:func:`record_metrics`), goodput SLOs (:func:`parse_goodput`, :func:`is_good`) and the
aggregates of a run (:func:`aggregate`). No sockets, no clock, no files: the client
(:mod:`kvferry.bench.endpoint`) fills records, the exporters write them.

Definitions are aiperf's (0.13, ``aiperf/metrics/types``), tag for tag, so a number here means
what the same tag means in an aiperf export. A *content response* is a streamed chunk that adds
text (completions ``text``, chat ``delta.content`` or ``delta.reasoning_content``); the role
chunk, the usage chunk and ``[DONE]`` are not content responses.

- ``time_to_first_token`` = first content response - request start.
- ``time_to_second_token`` = second content response - first content response.
- ``request_latency`` = LAST CONTENT response - request start (not the ``[DONE]`` line).
- ``inter_chunk_latency`` = the gaps between consecutive content responses (a list per request;
  its aggregate is over every gap of every request).
- ``inter_token_latency`` = (request_latency - TTFT) / (OSL - 1), for OSL >= 2.
- ``output_token_throughput_per_user`` = 1 / ITL in seconds (tokens/sec/user), ITL > 0.
- ``e2e_output_token_throughput`` = OSL / request_latency in seconds.
- ``input_sequence_length`` / ``output_sequence_length``: the client's token counts of the
  prompt and of the whole output text, or with ``server_counts`` the server's
  ``usage.prompt_tokens`` / ``usage.completion_tokens``.
- ``usage_prompt_tokens``, ``usage_completion_tokens``, ``usage_prompt_cache_read_tokens``
  (``usage.prompt_tokens_details.cached_tokens``): as the server reported them, when it did.

Run metrics (over valid requests, i.e. without error; errors are only counted):
``benchmark_duration`` = last content response - first request start (seconds);
``request_throughput`` = request_count / duration; ``output_token_throughput`` = total OSL /
duration; ``goodput`` = good_request_count / duration, where a request is good when every
metric named in the SLOs meets its threshold: at most the threshold for latencies, at least it
for metrics where larger is better (tokens/sec/user), as aiperf's ``GoodRequestCountMetric``.

Aggregates: avg, min, max, population std, sum, count and p1, p5, p10, p25, p50, p75, p90, p95,
p99 by linear interpolation (:mod:`kvferry.bench.stats`: the lab's one statistics module, whose
definition is also aiperf's). Times are reported in milliseconds, as aiperf exports them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from kvferry.bench.stats import Summary, percentile
from kvferry.errors import ConfigError

__all__ = [
    "GOODPUT_ALIASES",
    "PERCENTILES",
    "RECORD_METRICS",
    "RUN_METRICS",
    "ErrorInfo",
    "MetricInfo",
    "MetricResult",
    "RequestRecord",
    "RunMetrics",
    "aggregate",
    "is_good",
    "parse_goodput",
    "record_metrics",
]

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
"""The percentiles every record metric is reported at (aiperf's band)."""


@dataclass(frozen=True)
class MetricInfo:
    """One metric: its aiperf tag, the header aiperf prints, its unit, and its direction."""

    tag: str
    header: str
    unit: str
    larger_is_better: bool = False


def _infos(*infos: MetricInfo) -> dict[str, MetricInfo]:
    return {i.tag: i for i in infos}


RECORD_METRICS: dict[str, MetricInfo] = _infos(
    MetricInfo("time_to_first_token", "Time to First Token", "ms"),
    MetricInfo("time_to_second_token", "Time to Second Token", "ms"),
    MetricInfo("inter_token_latency", "Inter Token Latency", "ms"),
    MetricInfo("inter_chunk_latency", "Inter Chunk Latency", "ms"),
    MetricInfo("request_latency", "Request Latency", "ms"),
    MetricInfo("input_sequence_length", "Input Sequence Length", "tokens", True),
    MetricInfo("output_sequence_length", "Output Sequence Length", "tokens", True),
    MetricInfo(
        "output_token_throughput_per_user",
        "Output Token Throughput Per User",
        "tokens/sec/user",
        True,
    ),
    MetricInfo(
        "e2e_output_token_throughput", "E2E Output Token Throughput", "tokens/sec/user", True
    ),
    MetricInfo("usage_prompt_tokens", "Usage Prompt Tokens", "tokens"),
    MetricInfo("usage_completion_tokens", "Usage Completion Tokens", "tokens"),
    MetricInfo("usage_prompt_cache_read_tokens", "Usage Prompt Cache Read Tokens", "tokens", True),
)
"""Metrics of one request, in the order reports list them."""

RUN_METRICS: dict[str, MetricInfo] = _infos(
    MetricInfo("request_throughput", "Request Throughput", "requests/sec", True),
    MetricInfo("output_token_throughput", "Output Token Throughput", "tokens/sec", True),
    MetricInfo("request_count", "Request Count", "requests", True),
    MetricInfo("error_request_count", "Error Request Count", "requests"),
    MetricInfo("benchmark_duration", "Benchmark Duration", "sec"),
    MetricInfo("total_isl", "Total Input Sequence Length", "tokens", True),
    MetricInfo("total_osl", "Total Output Sequence Length", "tokens", True),
    MetricInfo("goodput", "Goodput", "requests/sec", True),
    MetricInfo("good_request_count", "Good Request Count", "requests", True),
)
"""Metrics of a whole run: one value each."""

GOODPUT_ALIASES: dict[str, str] = {
    "ttft": "time_to_first_token",
    "ttst": "time_to_second_token",
    "itl": "inter_token_latency",
    "tpot": "inter_token_latency",
    "e2e": "request_latency",
    "latency": "request_latency",
    "e2el": "request_latency",
    "tps_user": "output_token_throughput_per_user",
    "tps": "output_token_throughput_per_user",
}
"""Short names ``--goodput`` accepts besides the full tags."""


@dataclass(frozen=True)
class ErrorInfo:
    """Why a request failed: HTTP status (None when there was no response), type, message."""

    code: int | None
    type: str
    message: str

    def to_json(self) -> dict[str, object]:
        """aiperf's ``ErrorDetails`` shape."""
        return {"code": self.code, "type": self.type, "message": self.message}


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request. Times are ``time.monotonic_ns()`` values (one clock
    shared by every process of the machine), except ``start_wall_ns`` (``time.time_ns()``)."""

    index: int
    """The request's index in its level (its prompt's seed)."""
    start_ns: int
    """Just before the request was written."""
    end_ns: int = 0
    """When the response ended (or the error happened)."""
    start_wall_ns: int = 0
    ack_ns: int | None = None
    """When the response status and headers arrived."""
    scheduled_ns: int | None = None
    """Open loop: when the schedule wanted it sent."""
    chunk_ns: list[int] = field(default_factory=list)
    """Arrival of each content response, in order."""
    input_tokens: int | None = None
    """Client-side token count of the prompt."""
    output_tokens: int | None = None
    """Client-side token count of the output text."""
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    usage_cached_tokens: int | None = None
    error: ErrorInfo | None = None
    worker: int = 0
    conversation: str | None = None
    """Where the prompt came from (a trace line), when it came from a trace."""
    output_text: str = ""
    """The output, kept only until the worker has counted its tokens."""

    @property
    def valid(self) -> bool:
        """No error and at least one content response (aiperf's validity)."""
        return self.error is None and bool(self.chunk_ns)


MetricValue = float | list[float]


def record_metrics(record: RequestRecord, *, server_counts: bool = False) -> dict[str, MetricValue]:
    """The metrics of one request in display units (ms, tokens, tokens/sec/user).

    Args:
        record: a request record; an invalid one (error or no content) has no metrics.
        server_counts: take ISL/OSL from the server's usage instead of the client's counts.

    Returns:
        ``{tag: value}`` with only the metrics the record supports (e.g. no ITL when OSL < 2);
        ``inter_chunk_latency`` is a list.
    """
    if not record.valid:
        return {}
    out: dict[str, MetricValue] = {}
    chunks = record.chunk_ns
    ttft = chunks[0] - record.start_ns
    latency = chunks[-1] - record.start_ns
    out["time_to_first_token"] = ttft / NS_PER_MS
    if len(chunks) >= 2:
        out["time_to_second_token"] = (chunks[1] - chunks[0]) / NS_PER_MS
    if server_counts:
        isl, osl = record.usage_prompt_tokens, record.usage_completion_tokens
    else:
        isl, osl = record.input_tokens, record.output_tokens
    if osl is not None and osl >= 2:
        itl_ns = (latency - ttft) / (osl - 1)
        out["inter_token_latency"] = itl_ns / NS_PER_MS
        if itl_ns > 0:
            out["output_token_throughput_per_user"] = NS_PER_S / itl_ns
    if len(chunks) >= 2:
        out["inter_chunk_latency"] = [(b - a) / NS_PER_MS for a, b in pairwise(chunks)]
    out["request_latency"] = latency / NS_PER_MS
    if isl is not None:
        out["input_sequence_length"] = float(isl)
    if osl is not None:
        out["output_sequence_length"] = float(osl)
        if latency > 0:
            out["e2e_output_token_throughput"] = osl / (latency / NS_PER_S)
    if record.usage_prompt_tokens is not None:
        out["usage_prompt_tokens"] = float(record.usage_prompt_tokens)
    if record.usage_completion_tokens is not None:
        out["usage_completion_tokens"] = float(record.usage_completion_tokens)
    if record.usage_cached_tokens is not None:
        out["usage_prompt_cache_read_tokens"] = float(record.usage_cached_tokens)
    return out


# --- goodput -----------------------------------------------------------------------------------


def parse_goodput(text: str) -> dict[str, float]:
    """SLOs from ``"ttft:500 itl:50"`` (or ``"time_to_first_token:500,inter_token_latency:50"``).

    Names are record metric tags or :data:`GOODPUT_ALIASES`; values are in the metric's display
    unit (ms for times, tokens/sec/user for throughput per user), finite and >= 0.

    Raises:
        ConfigError: an empty spec, an item that is not NAME:VALUE, an unknown name, a metric
            without one value per request (``inter_chunk_latency``), or a bad value.
    """
    items = [s for s in re.split(r"[\s,]+", text.strip()) if s]
    if not items:
        raise ConfigError(
            "--goodput is empty; give NAME:VALUE pairs, e.g. --goodput 'ttft:500 itl:50' (ms)"
        )
    valid = sorted(GOODPUT_ALIASES) + [t for t in RECORD_METRICS if t != "inter_chunk_latency"]
    slos: dict[str, float] = {}
    for item in items:
        name, sep, raw = item.replace("=", ":").partition(":")
        tag = GOODPUT_ALIASES.get(name.lower(), name.lower())
        if not sep or not raw:
            raise ConfigError(
                f"--goodput item {item!r} is not NAME:VALUE (e.g. ttft:500; values in ms for "
                "times, tokens/sec/user for throughput per user)"
            )
        if tag not in RECORD_METRICS or tag == "inter_chunk_latency":
            raise ConfigError(f"--goodput: unknown metric {name!r}; valid: {', '.join(valid)}")
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise ConfigError(
                f"--goodput {name}: the threshold must be a finite number >= 0, got {raw!r}"
            )
        slos[tag] = value
    return slos


def is_good(metrics: Mapping[str, MetricValue], slos: Mapping[str, float]) -> bool:
    """Whether a request's metrics meet every SLO (a metric it lacks fails its SLO)."""
    for tag, threshold in slos.items():
        value = metrics.get(tag)
        if value is None or isinstance(value, list):
            return False
        if RECORD_METRICS[tag].larger_is_better:
            if value < threshold:
                return False
        elif value > threshold:
            return False
    return True


# --- aggregation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricResult:
    """A metric's statistics over a run, or (run metrics) its one value in ``avg``."""

    tag: str
    header: str
    unit: str
    avg: float
    min: float | None = None
    max: float | None = None
    std: float | None = None
    count: int | None = None
    sum: float | None = None
    percentiles: tuple[float, ...] = ()
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
    def scalar(cls, info: MetricInfo, value: float) -> MetricResult:
        return cls(tag=info.tag, header=info.header, unit=info.unit, avg=float(value))

    def p(self, q: int) -> float | None:
        """The ``q``-th percentile (one of :data:`PERCENTILES`), None for a run metric."""
        if not self.percentiles:
            return None
        return self.percentiles[PERCENTILES.index(q)]

    def to_json(self) -> dict[str, object]:
        """aiperf's ``JsonMetricResult``: unit, avg, p1..p99, min, max, std, count, sum (the
        statistics a run metric does not have are left out, as aiperf leaves them out)."""
        out: dict[str, object] = {"unit": self.unit, "avg": self.avg}
        for q, value in zip(PERCENTILES, self.percentiles):
            out[f"p{q}"] = value
        for key in ("min", "max", "std", "count", "sum"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass
class RunMetrics:
    """The aggregates of one run (one level of a sweep)."""

    metrics: dict[str, MetricResult]
    """By tag: record metrics (statistics) first, then run metrics (one value)."""
    errors: list[tuple[ErrorInfo, int]]
    """Distinct errors and how often each happened, most frequent first."""
    request_count: int
    error_count: int
    duration_s: float

    def value(self, tag: str, stat: str = "avg") -> float | None:
        """One statistic (``avg``, ``min``, ``max``, ``std`` or ``p50`` ...) of a metric, None
        when the run has no such metric."""
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


def aggregate(
    records: Iterable[RequestRecord],
    *,
    server_counts: bool = False,
    goodput: Mapping[str, float] | None = None,
) -> RunMetrics:
    """Aggregate a run's records (warm-up requests must already be left out).

    Args:
        records: every request of the run, failed ones included (they are counted).
        server_counts: ISL/OSL from the server's usage (see :func:`record_metrics`).
        goodput: SLOs from :func:`parse_goodput`; None or empty = no goodput metrics.

    Returns:
        Record metrics that at least one request has, then the run metrics. Throughputs and
        goodput need a positive duration, i.e. at least one valid request.
    """
    values: dict[str, list[float]] = {tag: [] for tag in RECORD_METRICS}
    errors: Counter[ErrorInfo] = Counter()
    valid = 0
    good = 0
    first_start: int | None = None
    last_response: int | None = None
    total_isl = 0
    total_osl = 0
    for record in records:
        if not record.valid:
            errors[
                record.error or ErrorInfo(None, "EmptyResponse", "the response had no content")
            ] += 1
            continue
        valid += 1
        metrics = record_metrics(record, server_counts=server_counts)
        for tag, value in metrics.items():
            if isinstance(value, list):
                values[tag].extend(value)
            else:
                values[tag].append(value)
        start, end = record.start_ns, record.chunk_ns[-1]
        first_start = start if first_start is None else min(first_start, start)
        last_response = end if last_response is None else max(last_response, end)
        isl = metrics.get("input_sequence_length")
        osl = metrics.get("output_sequence_length")
        total_isl += int(isl) if isinstance(isl, float) else 0
        total_osl += int(osl) if isinstance(osl, float) else 0
        if goodput and is_good(metrics, goodput):
            good += 1

    out: dict[str, MetricResult] = {}
    for tag, vals in values.items():
        if vals:
            out[tag] = MetricResult.of(RECORD_METRICS[tag], vals)
    duration_s = 0.0
    if first_start is not None and last_response is not None:
        duration_s = (last_response - first_start) / NS_PER_S
    run = RUN_METRICS
    error_count = sum(errors.values())
    if duration_s > 0:
        out["request_throughput"] = MetricResult.scalar(
            run["request_throughput"], valid / duration_s
        )
        if "output_sequence_length" in out:
            out["output_token_throughput"] = MetricResult.scalar(
                run["output_token_throughput"], total_osl / duration_s
            )
    out["request_count"] = MetricResult.scalar(run["request_count"], valid)
    out["error_request_count"] = MetricResult.scalar(run["error_request_count"], error_count)
    if duration_s > 0:
        out["benchmark_duration"] = MetricResult.scalar(run["benchmark_duration"], duration_s)
    if "input_sequence_length" in out:
        out["total_isl"] = MetricResult.scalar(run["total_isl"], total_isl)
    if "output_sequence_length" in out:
        out["total_osl"] = MetricResult.scalar(run["total_osl"], total_osl)
    if goodput:
        out["good_request_count"] = MetricResult.scalar(run["good_request_count"], good)
        if duration_s > 0:
            out["goodput"] = MetricResult.scalar(run["goodput"], good / duration_s)
    ranked = sorted(errors.items(), key=lambda kv: (-kv[1], kv[0].type, kv[0].message))
    return RunMetrics(
        metrics=out,
        errors=ranked,
        request_count=valid,
        error_count=error_count,
        duration_s=duration_s,
    )
