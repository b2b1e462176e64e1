"""Options of the endpoint bench (``kvferry bench serve``): what a run is asked to do.

Owns :class:`ServeBenchOptions` (one field per flag, :meth:`~ServeBenchOptions.validate`), the
levels of a sweep (:class:`Level`: a closed-loop concurrency, an open-loop request rate, or a
trace's own schedule) and the bench's error (:class:`EndpointBenchError`). It sends nothing and
reads no file: :mod:`kvferry.bench.endpoint.harness` runs the options.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from kvferry.errors import ConfigError, KvferryError

__all__ = [
    "ARRIVALS",
    "ENDPOINTS",
    "MAX_WORKERS",
    "EndpointBenchError",
    "Level",
    "ServeBenchOptions",
    "check_url",
]

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def check_url(url: str) -> None:
    """Raises ConfigError unless ``url`` is ``http(s)://HOST[:PORT][/...]`` (``--url``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url must be http://HOST:PORT[/...], got {url!r}")


ARRIVALS = ("poisson", "constant")
MAX_WORKERS = 64


class EndpointBenchError(KvferryError):
    """The endpoint bench cannot run: the server is unreachable or refuses the requests, or a
    worker process failed."""


# --- options and levels ------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One run of a sweep: closed-loop ``concurrency``, open-loop ``request_rate`` (requests/s,
    with ``max_concurrency`` in flight at most, 0 = no cap), or a trace's ``fixed_schedule``
    (``value`` = its speedup)."""

    kind: str
    value: float
    max_concurrency: int = 0

    @property
    def name(self) -> str:
        """Its artifact sub-directory: concurrency_4, request_rate_10 or fixed_schedule."""
        if self.kind == "fixed_schedule":
            return "fixed_schedule"
        return f"{self.kind}_{self.value:g}"

    @property
    def label(self) -> str:
        if self.kind == "fixed_schedule":
            return f"trace schedule x{self.value:g}"
        return f"{self.kind.replace('_', ' ')} {self.value:g}"


@dataclass(frozen=True, kw_only=True)
class ServeBenchOptions:
    """Everything ``kvferry bench serve`` takes (its flags, one field each)."""

    url: str = "http://127.0.0.1:8000"
    """Base URL of the server (``/v1/...`` is appended), or the full endpoint URL."""
    endpoint: str = "completions"
    """``completions`` (/v1/completions) or ``chat`` (/v1/chat/completions)."""
    model: str = ""
    """Model name sent; empty = the first model of the server's /v1/models."""
    tokenizer: str = ""
    """Local Hugging Face tokenizer (directory or tokenizer.json); empty = word tokenizer."""
    auth_token: str | None = field(default=None, repr=False, metadata={"json": False})
    """Sent as ``Authorization: Bearer <token>``; never written into a result."""
    use_server_token_count: bool = False
    """ISL/OSL from the server's usage instead of the client's counts."""
    concurrency: tuple[int, ...] = ()
    """Closed-loop levels; with ``request_rate``: one value, the cap of requests in flight."""
    request_rate: tuple[float, ...] = ()
    """Open-loop levels, requests per second."""
    arrival: str = "poisson"
    """Open-loop arrivals: ``poisson`` or ``constant``."""
    seed: int = 0
    request_count: int | None = None
    """Requests measured per level (default: max(100, 10 x level); a trace: all its rows)."""
    duration_s: float | None = None
    """Seconds of sending per level (requests in flight then finish)."""
    warmup_requests: int = 0
    """Requests sent before each level and never counted."""
    isl: int = 550
    isl_stddev: float = 0.0
    osl: int = 128
    osl_stddev: float = 0.0
    workload: str = ""
    """A generated workload ``NAME[:K=V,...]`` (kvferry.bench.workloads), replayed as a trace."""
    trace: str = ""
    """A Mooncake-format trace file (or a bundled trace's name)."""
    input_file: str = ""
    """Fixed prompts, aiperf ``single_turn`` JSONL (:class:`PromptFileSource`)."""
    speedup: float = 1.0
    """Trace timestamps are divided by this."""
    trace_block_size: int = 512
    """Tokens per hash_id of the trace (and of a workload)."""
    goodput: Mapping[str, float] = field(default_factory=dict)
    """SLOs by metric tag (:func:`kvferry.bench.endpoint.metrics.parse_goodput`)."""
    ignore_eos: bool = True
    """Send ``ignore_eos`` and ``min_tokens`` = OSL, so outputs are exactly OSL long."""
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    """Merged into every request body."""
    workers: int = 1
    """Load-generating processes."""
    request_timeout_s: float = 600.0

    def validate(self) -> None:
        """Check every option.

        Raises:
            ConfigError: naming the flag, the value and what would be valid.
        """
        check_url(self.url)
        if self.endpoint not in ENDPOINTS:
            raise ConfigError(
                f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}"
            )
        for c in self.concurrency:
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ConfigError(f"--concurrency values must be whole numbers >= 1, got {c!r}")
        for r in self.request_rate:
            if not (isinstance(r, int | float) and math.isfinite(r) and r > 0):
                raise ConfigError(f"--request-rate values must be numbers > 0, got {r!r}")
        if self.request_rate and len(self.concurrency) > 1:
            raise ConfigError(
                "--concurrency with --request-rate is the cap of requests in flight: give one "
                f"value, got {','.join(map(str, self.concurrency))}"
            )
        if self.arrival not in ARRIVALS:
            raise ConfigError(f"--arrival must be poisson or constant, got {self.arrival!r}")
        given = [f for f, v in (("--trace", self.trace), ("--workload", self.workload),
                                 ("--input-file", self.input_file)) if v]  # fmt: skip
        if len(given) > 1:
            raise ConfigError(f"{' and '.join(given)} are exclusive: give one source of requests")
        checks: list[tuple[str, object, bool, str]] = [
            ("--seed", self.seed, isinstance(self.seed, int) and self.seed >= 0, ">= 0"),
            ("--warmup-requests", self.warmup_requests, self.warmup_requests >= 0, ">= 0"),
            ("--isl", self.isl, self.isl >= 1, ">= 1"),
            ("--osl", self.osl, self.osl >= 1, ">= 1"),
            ("--isl-stddev", self.isl_stddev, self.isl_stddev >= 0, ">= 0"),
            ("--osl-stddev", self.osl_stddev, self.osl_stddev >= 0, ">= 0"),
            ("--speedup", self.speedup, math.isfinite(self.speedup) and self.speedup > 0, "> 0"),
            ("--trace-block-size", self.trace_block_size, self.trace_block_size >= 1, ">= 1"),
            ("--workers", self.workers, 1 <= self.workers <= MAX_WORKERS, f"1..{MAX_WORKERS}"),
            ("--request-timeout", self.request_timeout_s, self.request_timeout_s > 0, "> 0 s"),
        ]
        if self.request_count is not None:
            checks.append(("--request-count", self.request_count, self.request_count >= 1, ">= 1"))
        if self.duration_s is not None:
            ok = math.isfinite(self.duration_s) and self.duration_s > 0
            checks.append(("--duration", self.duration_s, ok, "> 0 s"))
        for flag, value, ok, valid in checks:
            if not ok:
                raise ConfigError(f"{flag} must be {valid}, got {value!r}")

    @property
    def from_trace(self) -> bool:
        return bool(self.trace or self.workload)

    def levels(self, scheduled: bool | None = None) -> list[Level]:
        """The sweep: one level per request rate, else per concurrency, else the trace's
        schedule (a trace or workload without either, or ``scheduled``: an input file whose
        lines have timestamps), else concurrency 1."""
        if self.request_rate:
            cap = self.concurrency[0] if self.concurrency else 0
            return [Level("request_rate", r, cap) for r in self.request_rate]
        if self.concurrency:
            return [Level("concurrency", c) for c in self.concurrency]
        if self.from_trace or scheduled:
            return [Level("fixed_schedule", self.speedup)]
        return [Level("concurrency", 1)]

    def endpoint_url(self) -> str:
        """The full URL requests go to."""
        base = self.url.rstrip("/")
        if base.endswith(tuple(ENDPOINTS.values())):
            return base
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        return base + ENDPOINTS[self.endpoint]

    def base_url(self) -> str:
        """The server's root URL (``/v1/models`` lives under it)."""
        url = self.endpoint_url()
        for path in ENDPOINTS.values():
            if url.endswith(path):
                return url[: -len(path)]
        return url
