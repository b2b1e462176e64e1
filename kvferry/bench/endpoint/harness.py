"""The endpoint bench (``kvferry bench serve``): load generation against any OpenAI-compatible
server, planned over worker processes, level by level.

The bench as a library: ``ServeBenchOptions`` -> :func:`run` -> :class:`ServeBenchReport`
(the lab's result model, tool ``serve``); this module re-exports the options and report types
so ``kvferry.bench.endpoint.harness`` is the one import a caller needs. It owns planning each
worker's share of a level, the worker processes, the preflight check of the server and the
run. The options and levels are :mod:`kvferry.bench.endpoint.options`; the report
:mod:`kvferry.bench.endpoint.report`; the client and what runs in a worker
:mod:`kvferry.bench.endpoint.client`; metrics :mod:`kvferry.bench.endpoint.metrics` and
:mod:`kvferry.bench.endpoint.aggregate` (pure); prompts :mod:`kvferry.bench.endpoint.inputs`;
files and plots :mod:`kvferry.bench.endpoint.export`. Nothing here prints.

How a level runs. The load runs in ``workers`` spawned processes (started once per run), never
in the caller's (whose live view would share the GIL and delay timestamps). Each worker takes
its share: closed loop, ``A = min(W, C)`` active workers split the ``C`` slots and worker ``w``
sends request indices ``w, w+A, w+2A, ...``; open loop, arrival ``k`` of the schedule goes to
worker ``k % A`` (``A`` = W, or min(W, cap) under a cap of requests in flight). A worker first
sends its share of the warm-up requests (closed loop, fresh prompts; aggregated apart, as
aiperf's warm-up phase), then waits; once all are ready the parent starts them at one
``time.monotonic_ns()`` instant 100 ms ahead, and collects progress every 0.25 s and the
records at the end. A phase's window, over which its rates and load curves are taken, runs
from its start to its last request's end.

Before the first level, :func:`run` asks ``/v1/models`` (the model name, unless
``--model`` is given) and sends one small streamed request, so an unreachable server, a wrong
token or model, or a server that does not stream is a clear error, not a level of failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from kvferry.bench.endpoint.aggregate import RunMetrics, aggregate
from kvferry.bench.endpoint.client import (
    PROGRESS_INTERVAL_S,
    Client,
    WorkerPlan,
    WorkerSetup,
    error_message,
    parse_stream,
    worker_main,
)
from kvferry.bench.endpoint.inputs import (
    PromptFileSource,
    RequestSource,
    RequestSpec,
    SyntheticSource,
    TraceSource,
    load_counter,
    mix64,
    workload_trace,
)
from kvferry.bench.endpoint.metrics import RequestRecord
from kvferry.bench.endpoint.options import (
    ENDPOINTS,
    EndpointBenchError,
    Level,
    ServeBenchOptions,
)
from kvferry.bench.endpoint.report import LevelResult, ServeBenchReport
from kvferry.bench.stats import percentile
from kvferry.bench.traces import read_trace

__all__ = [
    "ENDPOINTS",
    "EndpointBenchError",
    "Level",
    "LevelResult",
    "Phase",
    "ProgressFn",
    "ProgressUpdate",
    "ServeBenchOptions",
    "ServeBenchReport",
    "load_source",
    "parse_stream",
    "run",
]

LIVE_SAMPLES = 2048
"""The live view's running p50s are over this many latest requests."""
START_DELAY_NS = 100_000_000
"""From the barrier to the common start: every worker must have received "go" by then."""
PREFLIGHT_SALT = 2_000_000


# --- the parent: planning, worker processes, the run -------------------------------------------


@dataclass(frozen=True)
class ProgressUpdate:
    """What the live view shows of the running level."""

    level: Level
    phase: str
    """``warmup`` or ``profiling``."""
    done: int
    errors: int
    total: int | None
    """Requests planned, None when the level runs for ``duration_s``."""
    elapsed_s: float
    duration_s: float | None
    ttft_p50_ms: float | None
    """Over the latest :data:`LIVE_SAMPLES` requests."""
    itl_p50_ms: float | None
    """Over the latest requests, chunk-based (the mean gap between a request's content chunks;
    the report's ITL divides by OSL - 1 instead)."""


ProgressFn = Callable[[ProgressUpdate], None]


@dataclass(frozen=True)
class Phase:
    """The records of one phase of a level (its warm-up, or the measured requests) and its
    window: from the phase's start to its last request's end (``time.monotonic_ns()``)."""

    records: list[RequestRecord]
    start_ns: int
    end_ns: int

    @classmethod
    def of(cls, records: list[RequestRecord], start_ns: int) -> Phase:
        end = max((r.end_ns for r in records), default=start_ns)
        return cls(records, start_ns, max(end, start_ns))


def _split(total: int, parts: int, k: int) -> int:
    """Part ``k`` of ``total`` split as evenly as possible into ``parts``."""
    return total // parts + (1 if k < total % parts else 0)


def _arrival_offsets(
    options: ServeBenchOptions, level: Level, salt: int, count: int | None, source: RequestSource
) -> list[int]:
    """Open loop: send times (ns after the start) of the level's requests, in index order."""
    limit = None if source.cycles else source.size
    if count is not None:
        limit = count if limit is None else min(limit, count)
    horizon = None if options.duration_s is None else options.duration_s * 1e9
    stamps = source.timestamps_ms() if level.kind == "fixed_schedule" else None
    if stamps is not None:
        times = [ms * 1e6 / options.speedup for ms in stamps]
        return [round(t) for t in times[:limit] if horizon is None or t < horizon]
    rate = level.value
    rng = random.Random(mix64(options.seed, 0xA77, salt))
    offsets: list[int] = []
    t = 0.0
    while (limit is None or len(offsets) < limit) and (horizon is None or t < horizon):
        offsets.append(round(t))
        gap = 1.0 / rate if options.arrival == "constant" else rng.expovariate(rate)
        t += gap * 1e9
    return offsets


def _plan_level(
    options: ServeBenchOptions, level: Level, salt: int, source: RequestSource, workers: int
) -> tuple[list[WorkerPlan], int | None]:
    """Each worker's share of a level, and the requests planned (None: until the duration)."""
    count = options.request_count
    if count is None and options.duration_s is None:
        count = source.size if source.size is not None else max(100, math.ceil(10 * level.value))
    duration_ns = None if options.duration_s is None else round(options.duration_s * 1e9)
    warmup = options.warmup_requests
    plans: list[WorkerPlan] = []
    if level.kind == "concurrency":
        concurrency = int(level.value)
        active = min(workers, concurrency)
        limit = count if count is not None else (1 << 62)
        if source.size is not None and not source.cycles:
            limit = min(limit, source.size)
        for w in range(workers):
            if w >= active:
                plans.append(WorkerPlan(salt, 0))
                continue
            slots = _split(concurrency, active, w)
            plans.append(
                WorkerPlan(
                    salt,
                    slots,
                    indices=range(w, limit, active),
                    duration_ns=duration_ns,
                    warmup=_split(warmup, active, w),
                    warmup_slots=slots,
                )
            )
        planned = None if count is None and (source.size is None or source.cycles) else limit
        return plans, planned
    offsets = _arrival_offsets(options, level, salt, count, source)
    cap = level.max_concurrency
    active = min(workers, cap) if cap else workers
    for w in range(workers):
        if w >= active:
            plans.append(WorkerPlan(salt, 0, schedule=[]))
            continue
        share = _split(cap, active, w) if cap else 0
        schedule = [(k, offsets[k]) for k in range(w, len(offsets), active)]
        plans.append(
            WorkerPlan(
                salt,
                share,
                schedule=schedule,
                warmup=_split(warmup, active, w),
                warmup_slots=max(1, share or 4),
                replay=level.kind == "fixed_schedule",
            )
        )
    return plans, len(offsets)


class _Pool:
    """The worker processes of a run (spawned once, reused by every level)."""

    def __init__(self, setup: WorkerSetup, workers: int) -> None:
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        for w in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main,
                args=(child, w, setup),
                name=f"kvferry-bench-serve-{w}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def _messages(self, timeout: float) -> list[tuple[Any, ...]]:
        """Messages that arrive within ``timeout``; a worker that died without a word raises."""
        sentinels = {p.sentinel: w for w, p in enumerate(self.procs)}
        ready = wait([*self.conns, *sentinels], timeout)
        out: list[tuple[Any, ...]] = []
        dead: list[int] = []
        for obj in ready:
            if isinstance(obj, int):
                dead.append(sentinels[obj])
                continue
            conn = cast(Connection, obj)
            try:
                while conn.poll():
                    out.append(conn.recv())
            except EOFError:
                dead.append(self.conns.index(conn))
        for message in out:
            if message[0] == "error":
                raise EndpointBenchError(f"worker {message[1]} failed: {message[2]}")
        if dead and not out:
            w = dead[0]
            self.procs[w].join(timeout=1)
            raise EndpointBenchError(
                f"worker {w} exited (status {self.procs[w].exitcode}) in the middle of a level"
            )
        return out

    def run_level(
        self,
        level: Level,
        plans: list[WorkerPlan],
        planned: int | None,
        duration_s: float | None,
        on_progress: ProgressFn | None,
    ) -> tuple[Phase, Phase]:
        """Run one level on every worker; returns its warm-up and its measured phase."""
        t0 = time.monotonic()

        def report(
            phase: str, done: int, errors: int, ttft: float | None, itl: float | None
        ) -> None:
            if on_progress is not None:
                elapsed = time.monotonic() - t0
                on_progress(
                    ProgressUpdate(
                        level, phase, done, errors, planned, elapsed, duration_s, ttft, itl
                    )
                )

        report("warmup", 0, 0, None, None)
        warm_start = time.monotonic_ns()
        for conn, plan in zip(self.conns, plans):
            conn.send(("level", plan))
        warm: list[RequestRecord] = []
        ready = 0
        while ready < len(plans):
            for message in self._messages(0.25):
                if message[0] == "ready":
                    ready += 1
                    warm.extend(message[2])
        start = time.monotonic_ns() + START_DELAY_NS
        for conn in self.conns:
            conn.send(("go", start))
        t0 = time.monotonic() + START_DELAY_NS / 1e9
        records: list[RequestRecord] = []
        finished = done = errors = 0
        # The live p50s are over the latest LIVE_SAMPLES requests: recent, and cheap to sort.
        ttfts: deque[float] = deque(maxlen=LIVE_SAMPLES)
        itls: deque[float] = deque(maxlen=LIVE_SAMPLES)
        last = 0.0
        while finished < len(plans):
            for message in self._messages(0.1):
                if message[0] == "progress":
                    done += message[2]
                    errors += message[3]
                    ttfts.extend(message[4])
                    itls.extend(message[5])
                elif message[0] == "done":
                    finished += 1
                    records.extend(message[2])
            if time.monotonic() - last >= PROGRESS_INTERVAL_S or finished == len(plans):
                last = time.monotonic()
                report("profiling", done, errors, _median(ttfts), _median(itls))
        records.sort(key=lambda r: r.start_ns)
        warm.sort(key=lambda r: r.start_ns)
        return Phase.of(warm, warm_start), Phase.of(records, start)

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("exit",))
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()


def _median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    return percentile(sorted(values), 50)


def load_source(options: ServeBenchOptions) -> tuple[RequestSource, str, Any]:
    """The requests of a run: ``(source, description, trace or None)``.

    Raises:
        TraceError: the trace cannot be read or has no valid request.
        ConfigError: a bad workload spec.
    """
    if options.trace or options.workload:
        if options.trace:
            trace = read_trace(options.trace, block_tokens=options.trace_block_size)
            what = f"trace {trace.path}"
        else:
            trace = workload_trace(options.workload, options.trace_block_size)
            what = f"workload {options.workload}"
        trace.require_requests()
        source: RequestSource = TraceSource(trace, seed=options.seed, tokenizer=options.tokenizer)
        return source, what, trace
    if options.input_file:
        prompts = PromptFileSource(options.input_file, osl=options.osl, tokenizer=options.tokenizer)
        return prompts, f"input file {options.input_file} ({prompts.size} prompts)", None
    synthetic = SyntheticSource(
        isl=options.isl,
        osl=options.osl,
        isl_stddev=options.isl_stddev,
        osl_stddev=options.osl_stddev,
        seed=options.seed,
        tokenizer=options.tokenizer,
    )
    what = f"synthetic isl {options.isl}"
    what += f"±{options.isl_stddev:g}" if options.isl_stddev else ""
    what += f", osl {options.osl}" + (f"±{options.osl_stddev:g}" if options.osl_stddev else "")
    return synthetic, what, None


async def _preflight(options: ServeBenchOptions, setup: WorkerSetup) -> str:
    """Check the server answers and learn the model: GET /v1/models, then one small streamed
    request. Returns the model name to send.

    Raises:
        EndpointBenchError: unreachable, refused, or the test request failed.
    """
    import aiohttp

    base = options.base_url()
    model = options.model
    timeout = aiohttp.ClientTimeout(total=min(options.request_timeout_s, 60.0))
    async with aiohttp.ClientSession(timeout=timeout, headers=setup.headers) as session:
        try:
            async with session.get(base + "/v1/models") as resp:
                status, raw = resp.status, await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise EndpointBenchError(
                f"cannot reach {base}: {str(e) or type(e).__name__}; is the server running "
                "there? (check --url)"
            ) from e
    if status in (401, 403):
        raise EndpointBenchError(
            f"{base} refused the request ({status}): {error_message(raw)}; check --auth-token"
        )
    if not model:
        ids: list[str] = []
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            ids = [str(m["id"]) for m in json.loads(raw)["data"]]
        if status != 200 or not ids:
            raise EndpointBenchError(
                f"{base}/v1/models answered {status} without a model; name it with --model"
            )
        model = ids[0]
    probe = replace(setup, model=model)
    text, isl = setup.warmup_source.maker.synthetic(
        random.Random(mix64(options.seed, PREFLIGHT_SALT)), 8
    )
    async with Client(probe) as client:
        record = await client.send(RequestSpec(0, text, isl, 2))
    failure = record.error
    if failure is not None:
        http = f"HTTP {failure.code} " if failure.code is not None else ""
        raise EndpointBenchError(
            f"the test request to {setup.url} (model {model!r}) failed: {http}"
            f"{failure.type}: {failure.message}"
        )
    return model


def run(
    options: ServeBenchOptions,
    progress: ProgressFn | None = None,
    *,
    source: tuple[RequestSource, str] | None = None,
    on_level: Callable[[LevelResult], None] | None = None,
) -> ServeBenchReport:
    """Run every level of ``options`` against the server and return the report.

    Args:
        options: the run; validated here.
        progress: called in this thread with the live figures of the running level.
        source: ``(requests, description)`` from :func:`load_source` (loaded here if None).
        on_level: called with each level's result as it completes.

    Raises:
        ConfigError: a bad option or tokenizer.
        TraceError: the trace cannot be read.
        EndpointBenchError: the server cannot be reached or refuses the test request, or a
            worker process failed. Failed requests during a level are not errors of the run:
            they are counted in its results.
        MissingDependency: ``options.tokenizer`` needs a library that is not installed.
    """
    options.validate()
    started = time.time()
    requests, what = source or load_source(options)[:2]
    warmup = SyntheticSource(
        isl=options.isl,
        osl=options.osl,
        isl_stddev=options.isl_stddev,
        osl_stddev=options.osl_stddev,
        seed=options.seed,
        tokenizer=options.tokenizer,
    )
    load_counter(options.tokenizer)  # a bad tokenizer fails here, before any process starts
    headers = {"Content-Type": "application/json"}
    if options.auth_token:
        headers["Authorization"] = f"Bearer {options.auth_token}"
    setup = WorkerSetup(
        url=options.endpoint_url(),
        endpoint=options.endpoint,
        model=options.model,
        headers=headers,
        ignore_eos=options.ignore_eos,
        extra_body=dict(options.extra_body),
        timeout_s=options.request_timeout_s,
        tokenizer=options.tokenizer,
        source=requests,
        warmup_source=warmup,
    )
    model = asyncio.run(_preflight(options, setup))
    setup = replace(setup, model=model)
    report = ServeBenchReport(
        options=options, model=model, url=setup.url, source=what, started_at=started
    )
    pool = _Pool(setup, options.workers)
    try:
        scheduled = requests.timestamps_ms() is not None
        for salt, level in enumerate(options.levels(scheduled), start=1):
            plans, planned = _plan_level(options, level, salt, requests, options.workers)
            warm, measured = pool.run_level(level, plans, planned, options.duration_s, progress)

            def run_metrics(phase: Phase) -> RunMetrics:
                return aggregate(
                    phase.records,
                    server_counts=options.use_server_token_count,
                    goodput=options.goodput,
                    window_ns=(phase.start_ns, phase.end_ns),
                )

            result = LevelResult(
                level=level,
                records=measured.records,
                metrics=run_metrics(measured),
                planned=planned,
                warmup_records=warm.records,
                warmup_metrics=run_metrics(warm) if warm.records else None,
                window_ns=(measured.start_ns, measured.end_ns),
                wall_offset_ns=time.time_ns() - time.monotonic_ns(),
            )
            report.cases.append(result)
            report.notes += _notes(result)
            if on_level is not None:
                on_level(result)
    finally:
        pool.close()
    report.ended_at = time.time()
    return report


def _notes(result: LevelResult) -> list[str]:
    """What a reader of the level's figures must know: requests that failed."""
    notes = []
    m = result.metrics
    if m.error_count:
        error, count = m.errors[0]
        code = f"HTTP {error.code} " if error.code is not None else ""
        notes.append(
            f"{result.level.label}: {m.error_count} of {m.error_count + m.request_count} "
            f"requests failed (most often, {count}x: {code}{error.type}: {error.message})"
        )
    if result.warmup_errors:
        notes.append(f"{result.level.label}: {result.warmup_errors} warm-up request(s) failed")
    return notes
