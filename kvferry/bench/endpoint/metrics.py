"""Per-request records and metrics of the endpoint bench (``kvferry bench serve``), pure.

Owns what a request record holds (:class:`RequestRecord`, with its :class:`HttpTrace`), the
per-request metrics computed from it (:func:`record_metrics`), the server's usage fields
(:func:`usage_values`) and goodput SLOs (:func:`parse_goodput`, :func:`is_good`). No sockets,
no clock, no files: the client (:mod:`kvferry.bench.endpoint.client`) fills records, the run
aggregates live in :mod:`kvferry.bench.endpoint.aggregate`.

Definitions are aiperf's (0.13, ``aiperf/metrics/types``), tag for tag, so a number here means
what the same tag means in an aiperf export. A *content response* is a streamed chunk that adds
text (completions ``text``, chat ``delta.content`` or ``delta.reasoning_content``); the role
chunk, the usage chunk and ``[DONE]`` are not content responses. An *output* response adds
non-reasoning text.

- ``time_to_first_token`` = first content response - request start.
- ``time_to_second_token`` = second content response - first content response.
- ``time_to_first_output_token`` = first output response - request start.
- ``request_latency`` = LAST CONTENT response - request start (not the ``[DONE]`` line).
- ``decode_duration`` = request_latency - TTFT.
- ``inter_chunk_latency`` = the gaps between consecutive content responses (a list per request;
  its aggregate is over every gap of every request).
- ``inter_token_latency`` = (request_latency - TTFT) / (OSL - 1), for OSL >= 2.
- ``output_token_throughput_per_user`` = 1 / ITL in seconds (tokens/sec/user), ITL > 0.
- ``e2e_output_token_throughput`` = OSL / request_latency in seconds.
- ``prefill_throughput_per_user`` = ISL / TTFT in seconds.
- ``input_sequence_length``: the client's token count of the prompt; ``output_token_count`` /
  ``reasoning_token_count``: of the output text / of the reasoning text (each counted on its
  own, absent when there is none); ``output_sequence_length`` = their sum. With
  ``server_counts`` they come from the usage instead (prompt tokens; completion tokens minus
  reasoning tokens; reasoning tokens).
- ``osl_mismatch_diff_pct`` = 100 (OSL - max_tokens) / max_tokens.
- ``usage_*``: the server's last non-empty ``usage`` object, read through aiperf's synonym
  table (:data:`USAGE_FIELDS`); ``usage_{prompt,completion,reasoning}_tokens_diff_pct`` =
  100 |usage - client count| / client count.
- ``http_req_*`` (k6's names): from the request's :class:`HttpTrace`: blocked (waiting for a
  pooled connection), dns_lookup, connecting (0 on a reused connection), sending (request
  start to its last body chunk written), waiting (that to the first response body chunk),
  receiving (first to last body chunk; 0 for one chunk), duration (request start to the last
  body chunk), total and connection_overhead (sums of the phases), data_sent / data_received
  (body bytes, in KB = 1024 B), chunks_sent / chunks_received, connection_reused (0 or 1).

A failed request (error, or no content) has only ``error_isl`` (its prompt's token count).
Times are reported in milliseconds, as aiperf exports them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from kvferry.errors import ConfigError

__all__ = [
    "ERROR_METRICS",
    "GOODPUT_ALIASES",
    "NS_PER_MS",
    "NS_PER_S",
    "PERCENTILES",
    "RECORD_METRICS",
    "USAGE_FIELDS",
    "ErrorInfo",
    "HttpTrace",
    "MetricInfo",
    "MetricValue",
    "RequestRecord",
    "error_metrics",
    "is_context_overflow",
    "is_good",
    "parse_goodput",
    "record_metrics",
    "usage_values",
]

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000
BYTES_PER_KB = 1024

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


def _m(tag: str, header: str, unit: str, larger: bool = False) -> MetricInfo:
    return MetricInfo(tag, header, unit, larger)


RECORD_METRICS: dict[str, MetricInfo] = _infos(
    _m("time_to_first_token", "Time to First Token", "ms"),
    _m("time_to_second_token", "Time to Second Token", "ms"),
    _m("time_to_first_output_token", "Time to First Output Token", "ms"),
    _m("inter_token_latency", "Inter Token Latency", "ms"),
    _m("inter_chunk_latency", "Inter Chunk Latency", "ms"),
    _m("request_latency", "Request Latency", "ms"),
    _m("decode_duration", "Decode Duration", "ms"),
    _m("input_sequence_length", "Input Sequence Length", "tokens", True),
    _m("output_sequence_length", "Output Sequence Length", "tokens", True),
    _m("output_token_count", "Output Token Count", "tokens", True),
    _m("reasoning_token_count", "Reasoning Token Count", "tokens", True),
    _m("output_token_throughput_per_user", "Output Token Throughput Per User",
       "tokens/sec/user", True),
    _m("e2e_output_token_throughput", "E2E Output Token Throughput", "tokens/sec/user", True),
    _m("prefill_throughput_per_user", "Prefill Throughput Per User", "tokens/sec/user", True),
    _m("osl_mismatch_diff_pct", "OSL Mismatch Diff %", "%"),
    _m("usage_prompt_tokens", "Usage Prompt Tokens", "tokens", True),
    _m("usage_completion_tokens", "Usage Completion Tokens", "tokens", True),
    _m("usage_total_tokens", "Usage Total Tokens", "tokens", True),
    _m("usage_reasoning_tokens", "Usage Reasoning Tokens", "tokens", True),
    _m("usage_prompt_cache_read_tokens", "Usage Prompt Cache Read Tokens", "tokens", True),
    _m("usage_prompt_cache_write_tokens", "Usage Prompt Cache Write Tokens", "tokens"),
    _m("usage_prompt_cache_miss_tokens", "Usage Prompt Cache Miss Tokens", "tokens"),
    _m("usage_prompt_audio_tokens", "Usage Prompt Audio Tokens", "tokens", True),
    _m("usage_completion_audio_tokens", "Usage Completion Audio Tokens", "tokens", True),
    _m("usage_accepted_prediction_tokens", "Usage Accepted Prediction Tokens", "tokens", True),
    _m("usage_rejected_prediction_tokens", "Usage Rejected Prediction Tokens", "tokens"),
    _m("usage_tool_use_prompt_tokens", "Usage Tool Use Prompt Tokens", "tokens"),
    _m("usage_prompt_audio_seconds", "Usage Prompt Audio Seconds", "sec", True),
    _m("usage_prompt_tokens_diff_pct", "Usage Prompt Diff %", "%"),
    _m("usage_completion_tokens_diff_pct", "Usage Completion Diff %", "%"),
    _m("usage_reasoning_tokens_diff_pct", "Usage Reasoning Diff %", "%"),
    _m("http_req_blocked", "HTTP Blocked", "ms"),
    _m("http_req_dns_lookup", "HTTP DNS Lookup", "ms"),
    _m("http_req_connecting", "HTTP Connecting", "ms"),
    _m("http_req_sending", "HTTP Sending", "ms"),
    _m("http_req_waiting", "HTTP Waiting (TTFB)", "ms"),
    _m("http_req_receiving", "HTTP Receiving", "ms"),
    _m("http_req_duration", "HTTP Duration (excl. conn)", "ms"),
    _m("http_req_connection_overhead", "HTTP Connection Overhead", "ms"),
    _m("http_req_total", "HTTP Total Time", "ms"),
    _m("http_req_data_sent", "HTTP Data Sent", "KB"),
    _m("http_req_data_received", "HTTP Data Received", "KB"),
    _m("http_req_chunks_sent", "HTTP Chunks Sent", "count"),
    _m("http_req_chunks_received", "HTTP Chunks Received", "count"),
    _m("http_req_connection_reused", "HTTP Connection Reused", "ratio"),
)  # fmt: skip
"""Metrics of one valid request, in the order reports list them."""

ERROR_METRICS: dict[str, MetricInfo] = _infos(
    _m("error_isl", "Error Input Sequence Length", "tokens", True),
)
"""Metrics of one failed request."""

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

CONTEXT_OVERFLOW_SUBSTRINGS = (
    "context length",
    "maximum context",
    "context_length_exceeded",
    "prompt is too long",
)
"""aiperf's allowlist: an error whose message holds one of these (any case) overflowed the
model's context."""


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
class HttpTrace:
    """One request's HTTP lifecycle, from aiohttp's trace hooks and the body reads
    (``time.monotonic_ns()`` values; None: the event did not happen)."""

    send_start_ns: int | None = None
    """aiohttp began the request (``on_request_start``)."""
    send_end_ns: int | None = None
    """The last request body chunk was written."""
    request_chunks: int = 0
    request_bytes: int = 0
    """Body bytes written (headers not included, as aiperf counts)."""
    pool_wait_start_ns: int | None = None
    """The request queued for a free pooled connection."""
    pool_wait_end_ns: int | None = None
    connect_start_ns: int | None = None
    """A new connection was being made (TCP, and TLS for https)."""
    connect_end_ns: int | None = None
    reused: bool = False
    """A pooled keep-alive connection carried the request."""
    dns_start_ns: int | None = None
    dns_end_ns: int | None = None
    dns_cache_hit: bool = False
    receive_start_ns: int | None = None
    """The first response body chunk arrived."""
    receive_end_ns: int | None = None
    """The last response body chunk arrived."""
    response_chunks: int = 0
    """Body reads that returned data."""
    response_bytes: int = 0


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
    credit_ns: int | None = None
    """When the request was issued (aiperf's ``credit_issued_ns``): open loop, its scheduled
    send time; closed loop, when its slot became free to send it."""
    scheduled_ns: int | None = None
    """Trace replay: when the trace's schedule wanted it sent (instead of ``credit_ns``)."""
    chunk_ns: list[int] = field(default_factory=list)
    """Arrival of each content response, in order."""
    first_output_ns: int | None = None
    """Arrival of the first content response with non-reasoning text."""
    last_response_ns: int | None = None
    """Arrival of the last streamed message of any kind (``[DONE]`` included): aiperf's
    ``request_end_ns``."""
    input_tokens: int | None = None
    """Client-side token count of the prompt."""
    output_tokens: int | None = None
    """Client-side token count of the output text (reasoning left out); None: no output text."""
    reasoning_tokens: int | None = None
    """Client-side token count of the reasoning text; None: no reasoning text."""
    requested_osl: int | None = None
    """``max_tokens`` sent."""
    usage: dict[str, Any] | None = None
    """The last non-empty ``usage`` object of the response."""
    error: ErrorInfo | None = None
    worker: int = 0
    conversation: str | None = None
    """Where the prompt came from (a trace line), when it came from a trace."""
    output_text: str = ""
    """The output (and below the reasoning), kept only until the worker has counted its
    tokens."""
    reasoning_text: str = ""
    http: HttpTrace | None = None

    @property
    def valid(self) -> bool:
        """No error and at least one content response (aiperf's validity)."""
        return self.error is None and bool(self.chunk_ns)

    @property
    def response_end_ns(self) -> int:
        """aiperf's request end: the last streamed message, else when the response ended."""
        return self.last_response_ns if self.last_response_ns is not None else self.end_ns


MetricValue = float | int | list[float]


# --- usage -------------------------------------------------------------------------------------

_PROMPT_DETAILS = ("prompt_tokens_details", "input_tokens_details")
_COMPLETION_DETAILS = ("completion_tokens_details", "output_tokens_details")
USAGE_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "usage_prompt_tokens": (
        (),
        ("prompt_tokens", "input_tokens", "promptTokenCount", "inputTokens", "input_token_count"),
    ),
    "usage_completion_tokens": (
        (),
        ("completion_tokens", "output_tokens", "candidatesTokenCount", "outputTokens",
         "generated_token_count"),
    ),
    "usage_total_tokens": ((), ("total_tokens", "totalTokenCount", "totalTokens")),
    "usage_reasoning_tokens": ((*_COMPLETION_DETAILS, "reasoning_tokens"), ("thoughtsTokenCount",)),
    "usage_prompt_cache_read_tokens": (
        (*_PROMPT_DETAILS, "cached_tokens"),
        ("cache_read_input_tokens", "prompt_cache_hit_tokens", "cachedContentTokenCount",
         "cacheReadInputTokens", "cached_tokens"),
    ),
    "usage_prompt_cache_write_tokens": ((), ("cache_creation_input_tokens",
                                             "cacheWriteInputTokens")),
    "usage_prompt_cache_miss_tokens": ((), ("prompt_cache_miss_tokens",)),
    "usage_prompt_audio_tokens": ((*_PROMPT_DETAILS, "audio_tokens"), ()),
    "usage_completion_audio_tokens": ((*_COMPLETION_DETAILS, "audio_tokens"), ()),
    "usage_accepted_prediction_tokens": ((*_COMPLETION_DETAILS, "accepted_prediction_tokens"), ()),
    "usage_rejected_prediction_tokens": ((*_COMPLETION_DETAILS, "rejected_prediction_tokens"), ()),
    "usage_tool_use_prompt_tokens": ((), ("toolUsePromptTokenCount",)),
    "usage_prompt_audio_seconds": ((), ("prompt_audio_seconds",)),
}  # fmt: skip
"""Where each ``usage_*`` metric is read (aiperf's ``Usage`` synonyms): ``(nested, top)``,
``nested`` = details objects to look in, then the inner key; ``top`` = top-level keys. The
first one present wins."""

_DISJOINT_INPUT = ("input_tokens", "inputTokens")
_DISJOINT_CACHE = ("cache_read_input_tokens", "cache_creation_input_tokens",
                   "cacheReadInputTokens", "cacheWriteInputTokens")  # fmt: skip


def _number(value: object) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None  # a vendor's non-numeric placeholder (e.g. {}) means "not reported"
    return value


def usage_values(usage: Mapping[str, Any] | None) -> dict[str, int | float]:
    """The ``usage_*`` metrics a usage object reports, by tag.

    Vendors that count cached prompt tokens apart from ``input_tokens`` (Anthropic, Bedrock)
    have them added back, so ``usage_prompt_tokens`` is every prompt token the server
    processed, as aiperf reads it.
    """
    if not usage:
        return {}
    out: dict[str, int | float] = {}
    for tag, (nested, top) in USAGE_FIELDS.items():
        found: object = None
        if nested:
            *details, inner = nested
            for key in details:
                obj = usage.get(key)
                if isinstance(obj, dict) and inner in obj:
                    found = obj[inner]
                    break
        if found is None:
            found = next((usage[k] for k in top if k in usage), None)
            if tag == "usage_prompt_tokens" and isinstance(found, int):
                key = next(k for k in top if k in usage)
                if key in _DISJOINT_INPUT and any(k in usage for k in _DISJOINT_CACHE):
                    found += sum(v for k in _DISJOINT_CACHE if isinstance(v := usage.get(k), int))
        value = _number(found)
        if value is not None:
            out[tag] = value
    return out


def is_context_overflow(error: ErrorInfo) -> bool:
    """Whether an error says the prompt overflowed the model's context (aiperf's classifier)."""
    text = error.message.lower()
    return any(s in text for s in CONTEXT_OVERFLOW_SUBSTRINGS)


# --- per request -------------------------------------------------------------------------------


def _token_counts(
    record: RequestRecord, usage: Mapping[str, int | float], server_counts: bool
) -> tuple[int | None, int | None, int | None]:
    """(ISL, output tokens, reasoning tokens) by the client's count or the server's."""
    if not server_counts:
        return record.input_tokens, record.output_tokens, record.reasoning_tokens
    isl = usage.get("usage_prompt_tokens")
    completion = usage.get("usage_completion_tokens")
    reasoning = usage.get("usage_reasoning_tokens")
    output = None if completion is None else max(0, int(completion) - int(reasoning or 0))
    return (
        None if isl is None else int(isl),
        output,
        None if reasoning is None else int(reasoning),
    )


def _http_metrics(trace: HttpTrace) -> dict[str, MetricValue]:
    """The ``http_req_*`` metrics (aiperf's ``http_trace_metrics``): ms, KB, counts."""
    ns: dict[str, int] = {}
    if trace.pool_wait_start_ns is None:
        ns["http_req_blocked"] = 0
    elif trace.pool_wait_end_ns is not None:
        ns["http_req_blocked"] = trace.pool_wait_end_ns - trace.pool_wait_start_ns
    if trace.dns_cache_hit or trace.reused or trace.dns_start_ns is None:
        ns["http_req_dns_lookup"] = 0
    elif trace.dns_end_ns is not None:
        ns["http_req_dns_lookup"] = trace.dns_end_ns - trace.dns_start_ns
    if trace.reused:
        ns["http_req_connecting"] = 0
    elif trace.connect_start_ns is not None and trace.connect_end_ns is not None:
        ns["http_req_connecting"] = trace.connect_end_ns - trace.connect_start_ns
    if trace.send_start_ns is not None and trace.send_end_ns is not None:
        ns["http_req_sending"] = trace.send_end_ns - trace.send_start_ns
    if trace.send_end_ns is not None and trace.receive_start_ns is not None:
        ns["http_req_waiting"] = trace.receive_start_ns - trace.send_end_ns
    if trace.response_chunks == 1:
        ns["http_req_receiving"] = 0
    elif trace.response_chunks > 1 and trace.receive_start_ns and trace.receive_end_ns:
        ns["http_req_receiving"] = trace.receive_end_ns - trace.receive_start_ns
    if trace.send_start_ns is not None and trace.receive_end_ns is not None:
        ns["http_req_duration"] = trace.receive_end_ns - trace.send_start_ns
    overhead = ("http_req_blocked", "http_req_dns_lookup", "http_req_connecting")
    phases = (*overhead, "http_req_sending", "http_req_waiting", "http_req_receiving")
    ns["http_req_connection_overhead"] = sum(ns.get(t, 0) for t in overhead)
    ns["http_req_total"] = sum(ns.get(t, 0) for t in phases)
    out: dict[str, MetricValue] = {tag: value / NS_PER_MS for tag, value in ns.items()}
    out["http_req_data_sent"] = trace.request_bytes / BYTES_PER_KB
    out["http_req_data_received"] = trace.response_bytes / BYTES_PER_KB
    out["http_req_chunks_sent"] = trace.request_chunks
    out["http_req_chunks_received"] = trace.response_chunks
    out["http_req_connection_reused"] = 1 if trace.reused else 0
    return out


def record_metrics(record: RequestRecord, *, server_counts: bool = False) -> dict[str, MetricValue]:
    """The metrics of one valid request in display units (ms, tokens, tokens/sec/user, KB).

    Args:
        record: a request record; an invalid one (error or no content) has none (see
            :func:`error_metrics`).
        server_counts: take ISL/OSL from the server's usage instead of the client's counts.

    Returns:
        ``{tag: value}`` with only the metrics the record supports (e.g. no ITL when OSL < 2),
        in :data:`RECORD_METRICS` order; token counts are ints, ``inter_chunk_latency`` a list.
    """
    if not record.valid:
        return {}
    out: dict[str, MetricValue] = {}
    chunks = record.chunk_ns
    ttft = chunks[0] - record.start_ns
    latency = chunks[-1] - record.start_ns
    usage = usage_values(record.usage)
    isl, output, reasoning = _token_counts(record, usage, server_counts)
    osl = None if output is None and reasoning is None else (output or 0) + (reasoning or 0)
    out["time_to_first_token"] = ttft / NS_PER_MS
    if len(chunks) >= 2:
        out["time_to_second_token"] = (chunks[1] - chunks[0]) / NS_PER_MS
    if record.first_output_ns is not None:
        out["time_to_first_output_token"] = (record.first_output_ns - record.start_ns) / NS_PER_MS
    itl_ns = None
    if osl is not None and osl >= 2:
        itl_ns = (latency - ttft) / (osl - 1)
        out["inter_token_latency"] = itl_ns / NS_PER_MS
    if len(chunks) >= 2:
        out["inter_chunk_latency"] = [(b - a) / NS_PER_MS for a, b in pairwise(chunks)]
    out["request_latency"] = latency / NS_PER_MS
    out["decode_duration"] = (latency - ttft) / NS_PER_MS
    if isl is not None:
        out["input_sequence_length"] = isl
    if osl is not None:
        out["output_sequence_length"] = osl
    if output:
        out["output_token_count"] = output
    if reasoning is not None:
        out["reasoning_token_count"] = reasoning
    if itl_ns is not None and itl_ns > 0:
        out["output_token_throughput_per_user"] = NS_PER_S / itl_ns
    if osl is not None and latency > 0:
        out["e2e_output_token_throughput"] = osl / (latency / NS_PER_S)
    if isl is not None and ttft > 0:
        out["prefill_throughput_per_user"] = isl / (ttft / NS_PER_S)
    if osl is not None and record.requested_osl:
        out["osl_mismatch_diff_pct"] = (osl - record.requested_osl) / record.requested_osl * 100
    out.update(usage)
    for tag, usage_tag, client in (
        ("usage_prompt_tokens_diff_pct", "usage_prompt_tokens", isl),
        ("usage_completion_tokens_diff_pct", "usage_completion_tokens", osl),
        ("usage_reasoning_tokens_diff_pct", "usage_reasoning_tokens", reasoning),
    ):
        server = usage.get(usage_tag)
        if server is not None and client:
            out[tag] = abs(server - client) / client * 100
    if record.http is not None:
        out.update(_http_metrics(record.http))
    return out


def error_metrics(record: RequestRecord) -> dict[str, MetricValue]:
    """The metrics of one failed request: ``error_isl`` when its prompt was counted."""
    if record.valid or record.input_tokens is None:
        return {}
    return {"error_isl": record.input_tokens}


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
