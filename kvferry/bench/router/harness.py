"""The router bench (``kvferry bench router``): KV-aware routing against round-robin and random
on the same load, Dynamo's router benchmark, on the lab's result model.

``RouterBenchOptions`` -> :func:`run` -> :class:`RouterBenchReport` (tool ``router``). One run
per (load, policy): a fresh ``kvferry serve router --router-mode POLICY`` in front of the
workers, and ``kvferry bench serve`` (:func:`kvferry.bench.endpoint.harness.run`) through it.

Workers:

- **mock** (no ``worker_urls``): a fresh fleet of ``workers`` ``kvferry serve mock`` engines per
  run (``num_blocks`` KV blocks of ``block_size`` tokens each, the timing model sped up by
  ``speedup_ratio``), so no run finds another's prefixes cached; every run sends the same
  prompts (one ``seed``).
- **real** (``worker_urls``: running vLLM servers or mocks): started by the caller and shared by
  every run, so each run sends other prompt texts (seed + run number) and finds nothing of an
  earlier run cached. vLLM workers need ``tokenizer`` (the model's) and ``block_size`` (theirs);
  the router finds their KV events through ``/kv_event_sources`` or ``router_args``
  (``--vllm-events URL=PUB[,REPLAY]``).

Load: for each of ``prefix_ratios``, the ``prefix-ratio`` workload (``groups`` prefix groups,
``isl`` tokens of which that ratio is the group's prefix, Poisson arrivals at ``rate``); or,
with ``trace``, its first ``trace_rows`` requests at their timestamps / ``speedup``, each
hash block cut from ``trace_block_size`` to ``trace_block_size / trace_scale`` tokens (the
prefix sharing is the trace's, the prompts fit a small fleet).

Per run (:class:`RouterRun`): TTFT p50/p99, ITL p50, request and output-token throughput (the
endpoint bench's aggregates, kept whole in ``metrics``), the hit rate the workers really had
(their own counters, before and after: blocks for a mock, tokens for vLLM), the router's
predicted hit rate (``/router/stats``), preemptions (the workers' counters: a preempted request
is looked up again when it resumes, hits the router never predicts) and requests per worker.
Ratios: each policy's TTFT p50 and hit rate over round-robin's, per load.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from kvferry.bench.endpoint.aggregate import RunMetrics
from kvferry.bench.endpoint.harness import ProgressUpdate, ServeBenchOptions
from kvferry.bench.endpoint.harness import run as run_serve
from kvferry.bench.endpoint.inputs import TraceSource
from kvferry.bench.result import BenchResult, Environment, Ratio, ResultError
from kvferry.bench.router.fleet import (
    RouterBenchError,
    ServeProcess,
    WorkerCounters,
    router_stats,
    worker_counters,
)
from kvferry.bench.traces import Trace, ingest, read_trace
from kvferry.errors import ConfigError

__all__ = [
    "POLICIES",
    "RouterBenchError",
    "RouterBenchOptions",
    "RouterBenchReport",
    "RouterProgress",
    "RouterRun",
    "run",
]

POLICIES = ("kv", "round-robin", "random")
"""The router's modes (``router.mode``), in the order a run compares them."""
REFERENCE_POLICY = "round-robin"
SYNC_TIMEOUT_S = 10.0
"""How long a run waits for the router to read every worker's KV events before sending."""


@dataclass(frozen=True, kw_only=True)
class RouterBenchOptions:
    """Everything ``kvferry bench router`` takes (its flags, one field each)."""

    worker_urls: tuple[str, ...] = ()
    """Running workers (vLLM or ``kvferry serve mock``); empty = a fresh mock fleet per run."""
    workers: int = 4
    """Mock engines per run (mock fleet only)."""
    num_blocks: int = 1024
    """KV blocks per mock engine."""
    speedup_ratio: float = 10.0
    """Mock engines' timing model speed-up."""
    block_size: int = 16
    """Tokens per KV block, the router's and the workers' (vLLM: its cache block size)."""
    tokenizer: str = ""
    """The router's and the client's tokenizer (vLLM workers: the model's); empty = words."""
    router_args: tuple[str, ...] = ()
    """More ``kvferry serve router`` flags (e.g. ``--vllm-events``, ``--set router.K=V``)."""
    policies: tuple[str, ...] = POLICIES
    """Router modes compared: kv, round-robin, random."""
    prefix_ratios: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    """Shared-prefix share of each prompt, one load per value (no ``trace``)."""
    groups: int = 16
    """Prefix groups of the prefix-ratio workload."""
    isl: int = 2048
    osl: int = 64
    requests: int = 400
    """Requests per run (prefix-ratio workload)."""
    rate: float = 40.0
    """Requests per second, Poisson arrivals (prefix-ratio workload)."""
    seed: int = 0
    trace: str = ""
    """A Mooncake-format trace (file or bundled name) instead of the prefix-ratio sweep."""
    trace_rows: int = 1000
    """Its first rows replayed."""
    trace_block_size: int = 512
    """Tokens per hash_id of the trace as written."""
    trace_scale: int = 32
    """Each hash block is cut to ``trace_block_size / trace_scale`` tokens."""
    speedup: float = 1.0
    """Trace timestamps are divided by this."""
    request_timeout_s: float = 600.0
    startup_timeout_s: float = 60.0
    """Seconds a worker or the router may take to start."""

    def validate(self) -> None:
        """Check every option.

        Raises:
            ConfigError: naming the flag, the value and what would be valid.
        """
        for url in self.worker_urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"--worker must be http://HOST:PORT, got {url!r}")
        if not self.policies:
            raise ConfigError("--policies is empty: give one or more of " + ", ".join(POLICIES))
        for policy in self.policies:
            if policy not in POLICIES:
                raise ConfigError(
                    f"--policies: unknown policy {policy!r}; valid: {', '.join(POLICIES)}"
                )
        if len(set(self.policies)) != len(self.policies):
            raise ConfigError(f"--policies names a policy twice: {','.join(self.policies)}")
        if not self.trace and not self.prefix_ratios:
            raise ConfigError("--ratios is empty: give prefix ratios in [0, 1], e.g. 0.1,0.5,0.9")
        for ratio in self.prefix_ratios:
            if not (isinstance(ratio, int | float) and 0 <= ratio <= 1):
                raise ConfigError(f"--ratios values must be in [0, 1], got {ratio!r}")
        checks: list[tuple[str, object, bool, str]] = [
            ("--workers", self.workers, self.workers >= 1, ">= 1"),
            ("--num-blocks", self.num_blocks, self.num_blocks >= 1, ">= 1"),
            ("--speedup-ratio", self.speedup_ratio, self.speedup_ratio > 0, "> 0"),
            ("--block-size", self.block_size, self.block_size >= 1, ">= 1"),
            ("--groups", self.groups, self.groups >= 1, ">= 1"),
            ("--isl", self.isl, self.isl >= 1, ">= 1"),
            ("--osl", self.osl, self.osl >= 1, ">= 1"),
            ("--requests", self.requests, self.requests >= 1, ">= 1"),
            ("--rate", self.rate, math.isfinite(self.rate) and self.rate > 0, "> 0"),
            ("--seed", self.seed, self.seed >= 0, ">= 0"),
            ("--trace-rows", self.trace_rows, self.trace_rows >= 1, ">= 1"),
            ("--speedup", self.speedup, math.isfinite(self.speedup) and self.speedup > 0, "> 0"),
            ("--request-timeout", self.request_timeout_s, self.request_timeout_s > 0, "> 0 s"),
        ]
        scale_ok = self.trace_scale >= 1 and self.trace_block_size % self.trace_scale == 0
        checks.append(
            ("--trace-scale", self.trace_scale, scale_ok,
             f"a divisor of --trace-block-size {self.trace_block_size}")
        )  # fmt: skip
        for flag, value, ok, valid in checks:
            if not ok:
                raise ConfigError(f"{flag} must be {valid}, got {value!r}")

    @property
    def engine(self) -> str:
        """``mock`` (a fresh fleet per run) or ``urls`` (the given workers)."""
        return "urls" if self.worker_urls else "mock"

    def loads(self) -> list[tuple[str, float | None]]:
        """``(label, prefix ratio or None)`` of each load, in the order they run."""
        if self.trace:
            return [(f"trace {self.trace}, {self.trace_rows} rows", None)]
        return [(f"{r:g}", float(r)) for r in self.prefix_ratios]


@dataclass(kw_only=True)
class RouterRun:
    """One (load, policy) run: the router bench's figures, and the endpoint bench's aggregates."""

    label: str
    """The load: the prefix ratio (``0.5``) or the trace."""
    prefix_ratio: float | None = None
    policy: str
    seed: int = 0
    requests: int = 0
    errors: int = 0
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    request_throughput: float | None = None
    """Requests per second."""
    output_token_throughput: float | None = None
    """Output tokens per second."""
    hit_rate: float = 0.0
    """What the workers found cached: hits / lookups over the run (their own counters)."""
    hit_rate_basis: str = "blocks"
    """``blocks`` (kvferry mocks) or ``tokens`` (vLLM)."""
    predicted_hit_rate: float = 0.0
    """The router's predicted block-weighted hit rate (``/router/stats``)."""
    preemptions: float = 0.0
    requests_per_worker: list[int] = field(default_factory=list)
    metrics: RunMetrics | None = None
    """The endpoint bench's aggregates of the run (None in a file from before the model)."""


@dataclass(frozen=True)
class RouterProgress:
    """Where a router bench is: run ``index`` (0-based) of ``total``, its load and policy, and
    the running endpoint bench's live figures once requests flow."""

    index: int
    total: int
    label: str
    policy: str
    phase: str
    """``starting`` (the fleet and router), ``running`` or ``done``."""
    serve: ProgressUpdate | None = None


RouterProgressFn = Callable[[RouterProgress], None]


@dataclass(kw_only=True)
class RouterBenchReport(BenchResult):
    """A whole router bench: the options, the workers, one case per (load, policy)."""

    tool = "router"

    options: RouterBenchOptions
    cases: list[RouterRun] = field(default_factory=list)

    def case(self, label: str, policy: str) -> RouterRun | None:
        return next((c for c in self.cases if c.label == label and c.policy == policy), None)

    @classmethod
    def from_legacy(cls, data: Mapping[str, Any]) -> RouterBenchReport:
        """``benchmarks/router_bench.py``'s output before the model: ``{"args", "rows"}``.

        Raises:
            ResultError: not that shape.
        """
        try:
            return _from_script(data)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ResultError(f"malformed pre-model router result: {e}") from e


def _from_script(data: Mapping[str, Any]) -> RouterBenchReport:
    args = data["args"]
    rows = data["rows"]
    ratios = [r["ratio"] for r in rows if isinstance(r["ratio"], int | float)]
    options = RouterBenchOptions(
        workers=int(args["workers"]),
        num_blocks=int(args["num_blocks"]),
        speedup_ratio=float(args["speedup_ratio"]),
        policies=tuple(dict.fromkeys(str(r["mode"]) for r in rows)),
        prefix_ratios=tuple(dict.fromkeys(float(r) for r in ratios)),
        groups=int(args["groups"]),
        isl=int(args["isl"]),
        osl=int(args["osl"]),
        requests=int(args["requests"]),
        rate=float(args["rate"]),
        seed=int(args["seed"]),
        trace=str(args.get("trace") or ""),
        trace_rows=int(args.get("trace_rows", 1000)),
        trace_scale=int(args.get("trace_scale", 32)),
        speedup=float(args.get("speedup", 1.0)),
    )
    vllm = args.get("engine") == "vllm"
    cases = [
        RouterRun(
            label=f"{r['ratio']:g}" if isinstance(r["ratio"], int | float) else str(r["ratio"]),
            prefix_ratio=float(r["ratio"]) if isinstance(r["ratio"], int | float) else None,
            policy=str(r["mode"]),
            requests=int(r["requests"]),
            errors=int(r["errors"]),
            ttft_p50_ms=r.get("ttft_p50_ms"),
            ttft_p99_ms=r.get("ttft_p99_ms"),
            itl_p50_ms=r.get("itl_p50_ms"),
            request_throughput=r.get("request_throughput"),
            hit_rate=float(r["hit_rate"]),
            hit_rate_basis="tokens" if vllm else "blocks",
            predicted_hit_rate=float(r["predicted_hit_rate"]),
            preemptions=float(r.get("preemptions", 0.0)),
            requests_per_worker=[int(n) for n in r.get("requests_per_worker", [])],
        )
        for r in rows
    ]
    report = RouterBenchReport(
        environment=Environment(),  # an old file says nothing of its machine
        options=options,
        cases=cases,
        notes=[f"read from benchmarks/router_bench.py output (engine {args.get('engine')})"],
    )
    report.ratios = _ratios(report)
    return report


# --- the run -----------------------------------------------------------------------------------


def _scaled_trace(options: RouterBenchOptions) -> Trace:
    """The first ``trace_rows`` rows, each hash block cut ``trace_scale`` times (module
    docstring); hash_ids unchanged, so the prefix sharing is the trace's."""
    trace = read_trace(options.trace, block_tokens=options.trace_block_size)
    trace.require_requests()
    scale = options.trace_scale
    rows = (
        (r.line, {"timestamp": r.timestamp_ms,
                  "input_length": max(1, math.ceil(r.input_length / scale)),
                  "output_length": r.output_length, "hash_ids": list(r.hash_ids)}, "")
        for r in trace.requests[: options.trace_rows]
    )  # fmt: skip
    return ingest(
        rows,
        source=f"{trace.path} (first {options.trace_rows} rows, blocks / {scale})",
        block_tokens=options.trace_block_size // scale,
        strict=True,
    )


def _serve_options(
    options: RouterBenchOptions, ratio: float | None, seed: int, url: str
) -> ServeBenchOptions:
    """The endpoint bench's options of one run through the router at ``url``."""
    common: dict[str, Any] = {
        "url": url,
        "seed": seed,
        "tokenizer": options.tokenizer,
        "request_timeout_s": options.request_timeout_s,
        "osl": options.osl,
    }
    if ratio is None:
        block = options.trace_block_size // options.trace_scale
        return ServeBenchOptions(speedup=options.speedup, trace_block_size=block, **common)
    spec = (
        f"prefix-ratio:requests={options.requests},isl={options.isl},osl={options.osl},"
        f"num_groups={options.groups},prefix_ratio={ratio},request_rate={options.rate},"
        f"seed={options.seed}"
    )
    return ServeBenchOptions(workload=spec, trace_block_size=options.block_size, **common)


def _mock_fleet(options: RouterBenchOptions, stack: ExitStack) -> list[str]:
    flags = [
        "--num-blocks", str(options.num_blocks),
        "--block-size", str(options.block_size),
        "--max-model-len", str(options.num_blocks * options.block_size),
        "--speedup-ratio", f"{options.speedup_ratio:g}",
    ]  # fmt: skip
    if options.tokenizer:
        flags += ["--tokenizer", options.tokenizer]

    def start(_: int) -> ServeProcess:
        return ServeProcess("mock", flags, timeout_s=options.startup_timeout_s)

    with ThreadPoolExecutor(options.workers) as pool:
        futures = [pool.submit(start, i) for i in range(options.workers)]
    procs = []
    failure: BaseException | None = None
    for future in futures:
        try:
            procs.append(stack.enter_context(future.result()))
        except BaseException as e:  # every started worker is stopped by the stack
            failure = failure or e
    if failure is not None:
        raise failure
    return [p.url for p in procs]


def _wait_synced(url: str) -> None:
    """Until the router reads every worker's KV events, or knows it will not (at most
    :data:`SYNC_TIMEOUT_S`: a run may start with the router on its own predictions)."""
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while time.monotonic() < deadline:
        workers = router_stats(url)["workers"]
        if all(w["kv_source"] != "connecting" for w in workers):
            return
        time.sleep(0.05)


def _one(
    options: RouterBenchOptions,
    label: str,
    ratio: float | None,
    policy: str,
    seed: int,
    trace: Trace | None,
    progress: Callable[[ProgressUpdate], None] | None,
) -> RouterRun:
    with ExitStack() as stack:
        urls = list(options.worker_urls) if options.worker_urls else _mock_fleet(options, stack)
        before = [worker_counters(u) for u in urls]
        flags = ["--router-mode", policy, "--block-size", str(options.block_size)]
        for url in urls:
            flags += ["--worker", url]
        if options.tokenizer:
            flags += ["--tokenizer", options.tokenizer]
        router = stack.enter_context(
            ServeProcess(
                "router", [*flags, *options.router_args], timeout_s=options.startup_timeout_s
            )
        )
        _wait_synced(router.url)
        serve = _serve_options(options, ratio, seed, router.url)
        source = None
        if trace is not None:
            requests = TraceSource(trace, seed=seed, tokenizer=options.tokenizer)
            source = (requests, f"trace {trace.path}")
        level = run_serve(serve, progress, source=source).cases[0]
        counted = [worker_counters(u) - b for u, b in zip(urls, before, strict=True)]
        predicted = router_stats(router.url)
    m = level.metrics
    hits = sum(c.hits for c in counted)
    lookups = sum(c.lookups for c in counted)
    return RouterRun(
        label=label,
        prefix_ratio=ratio,
        policy=policy,
        seed=seed,
        requests=m.request_count,
        errors=m.error_count,
        ttft_p50_ms=m.value("time_to_first_token", "p50"),
        ttft_p99_ms=m.value("time_to_first_token", "p99"),
        itl_p50_ms=m.value("inter_token_latency", "p50"),
        request_throughput=m.value("request_throughput"),
        output_token_throughput=m.value("output_token_throughput"),
        hit_rate=hits / lookups if lookups else 0.0,
        hit_rate_basis=_basis(counted),
        predicted_hit_rate=float(predicted["hit_rate"]),
        preemptions=sum(c.preemptions for c in counted),
        requests_per_worker=[int(w["requests"]) for w in predicted["workers"]],
        metrics=m,
    )


def _basis(counted: Sequence[WorkerCounters]) -> str:
    bases = {c.basis for c in counted}
    return bases.pop() if len(bases) == 1 else "mixed"


def _ratios(report: RouterBenchReport) -> list[Ratio]:
    """Each policy's TTFT p50 and hit rate over round-robin's, per load."""
    out = []
    for case in report.cases:
        if case.policy == REFERENCE_POLICY:
            continue
        ref = report.case(case.label, REFERENCE_POLICY)
        if ref is None:
            continue
        pairs = (
            ("time_to_first_token p50", case.ttft_p50_ms, ref.ttft_p50_ms),
            ("hit rate", case.hit_rate, ref.hit_rate),
        )
        for metric, ours, theirs in pairs:
            if ours is not None and theirs:
                value = ours / theirs
                out.append(Ratio(metric, case.policy, REFERENCE_POLICY, value, [value], case.label))
    return out


def _teller(progress: RouterProgressFn | None, where: RouterProgress) -> Callable[..., None]:
    """``tell(phase, serve_update=None)``: ``progress`` of the run at ``where``, if any."""

    def tell(phase: str, update: ProgressUpdate | None = None) -> None:
        if progress is not None:
            progress(replace(where, phase=phase, serve=update))

    return tell


def run(options: RouterBenchOptions, progress: RouterProgressFn | None = None) -> RouterBenchReport:
    """Every (load, policy) run of ``options``, in order.

    Args:
        options: the bench; validated here.
        progress: called in this thread as runs start and end, and with the live figures of
            the running endpoint bench.

    Raises:
        ConfigError: a bad option, trace or workload.
        TraceError: the trace cannot be read.
        RouterBenchError: a worker or the router did not start, or a worker's counters cannot
            be read.
        EndpointBenchError: the router refused the endpoint bench's test request.
    """
    options.validate()
    report = RouterBenchReport(options=options, started_at=time.time())
    trace = _scaled_trace(options) if options.trace else None
    plan = [
        (label, ratio, policy) for label, ratio in options.loads() for policy in options.policies
    ]
    for index, (label, ratio, policy) in enumerate(plan):
        # Shared workers keep their caches: another seed per run (other prompt texts), so no
        # run finds an earlier one's prefixes. A fresh mock fleet per run needs none.
        seed = options.seed + (index + 1 if options.worker_urls else 0)

        tell = _teller(progress, RouterProgress(index, len(plan), label, policy, "starting"))
        tell("starting")
        case = _one(options, label, ratio, policy, seed, trace, partial(tell, "running"))
        report.cases.append(case)
        tell("done")
    report.ratios = _ratios(report)
    for case in report.cases:
        if case.errors:
            report.notes.append(f"{case.label}, {case.policy}: {case.errors} requests failed")
    report.ended_at = time.time()
    return report
