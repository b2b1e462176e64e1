"""The client side of the endpoint bench: the streaming HTTP client, one worker process's
share of a level, and the SSE parser.

Owns what runs in a load-generating process (:func:`worker_main`): one aiohttp session
(HTTP/1.1 keep-alive, no connection limit) on one event loop (uvloop when installed), the
closed loop (slots that each send their next request when the last one ended) and the open
loop (requests sent at their scheduled times whatever is in flight, under an optional cap), and
the message protocol with the parent (:mod:`kvferry.bench.endpoint.harness`, which plans levels and
owns the processes). Pure pieces (:func:`parse_stream`) are public for tests.

Timing: a request's start is taken just before it is handed to aiohttp; each body read is
stamped as it is returned (``iter_any``: whatever arrived since the last read), and every SSE
event completed by that read gets that stamp, as aiperf does. aiohttp's trace hooks stamp the
request side of the :class:`~kvferry.bench.endpoint.metrics.HttpTrace` (pool wait, connect,
DNS, body written); the reads give its response side. A request's credit is stamped when its
slot frees (closed loop) or is its send time (open loop). Bodies are parsed after the stream
ends, so parsing never delays a stamp; output and reasoning tokens are counted after the
level, so counting never does either. Times are ``time.monotonic_ns()`` (CLOCK_MONOTONIC: one
clock for every process of the machine, so the parent can start all workers at one instant).

Messages, parent -> worker: ``("level", WorkerPlan)``, then ``("go", start_ns)``; ``("exit",)``.
Worker -> parent: ``("ready", worker, warm-up records)`` after its warm-up,
``("progress", worker, done, errors, ttfts_ms, itls_ms)`` every 0.25 s, ``("done", worker,
records)``, or ``("error", worker, message)`` before it exits on a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from kvferry.bench.endpoint.inputs import RequestSource, RequestSpec, SyntheticSource
from kvferry.bench.endpoint.metrics import ErrorInfo, HttpTrace, RequestRecord

__all__ = [
    "PROGRESS_INTERVAL_S",
    "WARMUP_SALT",
    "Client",
    "StreamResult",
    "WorkerPlan",
    "WorkerSetup",
    "error_message",
    "parse_stream",
    "worker_main",
]

PROGRESS_INTERVAL_S = 0.25
WARMUP_SALT = 1_000_000


# --- the stream --------------------------------------------------------------------------------


@dataclass
class StreamResult:
    """What one response's body said: content response times and texts, usage, errors."""

    chunk_ns: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    """Each content response's output text (reasoning left out)."""
    reasoning: list[str] = field(default_factory=list)
    """Each content response's reasoning text."""
    first_output_ns: int | None = None
    """The first content response with output (non-reasoning) text."""
    last_ns: int | None = None
    """The last message of any kind (``[DONE]`` included)."""
    usage: dict[str, Any] | None = None
    error: str | None = None
    done: bool = False


def _choice_texts(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(output text, reasoning text) of the first choice."""
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "", ""
    choice = choices[0]
    text = choice.get("text")
    if isinstance(text, str):
        return text, ""
    part = choice.get("delta")
    if not isinstance(part, dict):
        part = choice.get("message")
    if not isinstance(part, dict):
        return "", ""
    reasoning = ""
    for key in ("reasoning_content", "reasoning"):
        value = part.get(key)
        if isinstance(value, str):
            reasoning += value
    content = part.get("content")
    return (content if isinstance(content, str) else ""), reasoning


def _apply(result: StreamResult, ts: int, payload: bytes) -> None:
    result.last_ns = ts
    if payload == b"[DONE]":
        result.done = True
        return
    try:
        obj = json.loads(payload)
    except ValueError:
        result.error = f"a data line is not JSON: {payload[:200]!r}"
        return
    if not isinstance(obj, dict):
        return
    if "error" in obj:
        err = obj["error"]
        message = err.get("message") if isinstance(err, dict) else err
        result.error = str(message)
    usage = obj.get("usage")
    if isinstance(usage, dict) and usage:
        result.usage = usage
    text, reasoning = _choice_texts(obj)
    if text or reasoning:
        result.chunk_ns.append(ts)
        result.texts.append(text)
        result.reasoning.append(reasoning)
        if text and result.first_output_ns is None:
            result.first_output_ns = ts


def parse_stream(reads: Sequence[tuple[int, bytes]]) -> StreamResult:
    """Parse a response body read as ``(arrival ns, bytes)`` pieces.

    An SSE event (``data: ...`` lines ended by a blank line) gets the time of the read that
    completed it. A body with no ``data:`` line that is one JSON object (a server that does
    not stream) is one content response at the last read's time. Content responses are the
    events whose first choice adds text (module docstring of endpoint_metrics).
    """
    result = StreamResult()
    buf = b""
    seen_data = False
    for ts, data in reads:
        buf += data.replace(b"\r", b"") if b"\r" in data else data
        while (end := buf.find(b"\n\n")) >= 0:
            event, buf = buf[:end], buf[end + 2 :]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    seen_data = True
                    _apply(result, ts, line[5:].strip())
    if buf.strip() and reads:
        ts = reads[-1][0]
        if seen_data or buf.lstrip().startswith(b"data:"):
            for line in buf.split(b"\n"):
                if line.startswith(b"data:"):
                    _apply(result, ts, line[5:].strip())
        else:
            _apply(result, ts, buf.strip())
    return result


def error_message(raw: bytes) -> str:
    """The message of an error body (OpenAI's ``{"error": {"message"}}`` or plain text)."""
    text = raw.decode(errors="replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return text[:500] or "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj.get("message")))
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if err is not None:
            return str(err)
    return text[:500]


# --- the client --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs for every level (sent once, at spawn)."""

    url: str
    endpoint: str
    model: str
    headers: dict[str, str]
    ignore_eos: bool
    extra_body: dict[str, Any]
    timeout_s: float
    tokenizer: str
    source: RequestSource
    warmup_source: SyntheticSource


class Client:
    """One aiohttp session (HTTP/1.1 keep-alive, no connection limit) and the requests it
    sends; use it as an async context manager (the session lives inside it)."""

    def __init__(self, setup: WorkerSetup, worker: int = 0) -> None:
        self.setup = setup
        self.worker = worker
        self.chat = setup.endpoint == "chat"
        base: dict[str, Any] = {"model": setup.model, "stream": True}
        base["stream_options"] = {"include_usage": True}
        self._base = base
        self._session: Any = None
        self._errors: tuple[type[BaseException], ...] = (OSError,)  # + aiohttp's, on enter

    async def __aenter__(self) -> Client:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.setup.timeout_s),
            headers={"User-Agent": "kvferry-bench", **self.setup.headers},
            trace_configs=[_trace_config()],
        )
        self._errors = (aiohttp.ClientError, OSError)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def body(self, spec: RequestSpec) -> bytes:
        body = dict(self._base)
        if self.chat:
            body["messages"] = [{"role": "user", "content": spec.prompt}]
            body["max_completion_tokens"] = spec.osl
        else:
            body["prompt"] = spec.prompt
            body["max_tokens"] = spec.osl
        if self.setup.ignore_eos:
            body["min_tokens"] = spec.osl
            body["ignore_eos"] = True
        body.update(self.setup.extra_body)
        return json.dumps(body, separators=(",", ":")).encode()

    async def send(
        self, spec: RequestSpec, credit_ns: int | None = None, scheduled_ns: int | None = None
    ) -> RequestRecord:
        """Send one request and read its stream; failures become the record's error.

        Args:
            spec: the request.
            credit_ns: when it was issued (its slot freed, or its open-loop send time).
            scheduled_ns: trace replay: when the trace's schedule wanted it sent.
        """
        data = self.body(spec)
        trace = HttpTrace()
        record = RequestRecord(
            index=spec.index,
            start_ns=0,
            input_tokens=spec.isl,
            requested_osl=spec.osl,
            credit_ns=credit_ns,
            scheduled_ns=scheduled_ns,
            worker=self.worker,
            conversation=spec.conversation,
            http=trace,
        )
        reads: list[tuple[int, bytes]] = []
        clock = time.monotonic_ns
        record.start_ns = clock()
        try:
            async with self._session.post(
                self.setup.url, data=data, trace_request_ctx=trace
            ) as resp:
                record.ack_ns = clock()
                if resp.status != 200:
                    raw = await resp.read()
                    record.end_ns = clock()
                    reason = resp.reason or "HTTP error"
                    record.error = ErrorInfo(resp.status, reason, error_message(raw))
                    return record
                async for chunk in resp.content.iter_any():
                    reads.append((clock(), chunk))
        except TimeoutError:
            record.end_ns = clock()
            record.error = ErrorInfo(
                None,
                "TimeoutError",
                f"no complete response within {self.setup.timeout_s:g} s (--request-timeout)",
            )
            return record
        except self._errors as e:
            record.end_ns = clock()
            record.error = ErrorInfo(None, type(e).__name__, str(e) or type(e).__name__)
            return record
        record.end_ns = clock()
        if reads:
            # iter_any() bypasses aiohttp's response-chunk hook: count the reads here.
            trace.receive_start_ns, trace.receive_end_ns = reads[0][0], reads[-1][0]
            trace.response_chunks = len(reads)
            trace.response_bytes = sum(len(chunk) for _, chunk in reads)
        result = parse_stream(reads)
        record.chunk_ns = result.chunk_ns
        record.first_output_ns = result.first_output_ns
        record.last_response_ns = result.last_ns
        record.output_text = "".join(result.texts)
        record.reasoning_text = "".join(result.reasoning)
        record.usage = result.usage
        if result.error is not None:
            record.error = ErrorInfo(200, "StreamError", result.error)
        elif not result.chunk_ns:
            record.error = ErrorInfo(200, "EmptyResponse", "the response streamed no content")
        return record


def _trace_config() -> Any:
    """An aiohttp TraceConfig that fills the :class:`HttpTrace` each request passes as its
    ``trace_request_ctx`` (the request side; the client counts the body reads itself)."""
    import aiohttp

    clock = time.monotonic_ns

    def hook(apply: Callable[[HttpTrace, Any], None]) -> Callable[..., Awaitable[None]]:
        async def on_event(session: Any, ctx: Any, params: Any) -> None:
            trace = ctx.trace_request_ctx
            if isinstance(trace, HttpTrace):
                apply(trace, params)

        return on_event

    def sent(t: HttpTrace, params: Any) -> None:
        t.send_end_ns = clock()
        t.request_chunks += 1
        t.request_bytes += len(params.chunk)

    def reused(t: HttpTrace, params: Any) -> None:
        t.reused = True

    def cache_hit(t: HttpTrace, params: Any) -> None:
        t.dns_cache_hit = True

    def stamp(name: str) -> Callable[[HttpTrace, Any], None]:
        return lambda t, params: setattr(t, name, clock())

    config = aiohttp.TraceConfig()
    config.on_request_start.append(hook(stamp("send_start_ns")))
    config.on_request_chunk_sent.append(hook(sent))
    config.on_connection_queued_start.append(hook(stamp("pool_wait_start_ns")))
    config.on_connection_queued_end.append(hook(stamp("pool_wait_end_ns")))
    config.on_connection_create_start.append(hook(stamp("connect_start_ns")))
    config.on_connection_create_end.append(hook(stamp("connect_end_ns")))
    config.on_connection_reuseconn.append(hook(reused))
    config.on_dns_resolvehost_start.append(hook(stamp("dns_start_ns")))
    config.on_dns_resolvehost_end.append(hook(stamp("dns_end_ns")))
    config.on_dns_cache_hit.append(hook(cache_hit))
    return config


# --- one worker's share of a level -------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPlan:
    """One worker's share of one level."""

    salt: int
    slots: int
    """Closed loop: concurrent slots; open loop: most requests in flight (0 = no cap)."""
    indices: range | None = None
    """Closed loop: the request indices, in order."""
    schedule: list[tuple[int, int]] | None = None
    """Open loop: ``(request index, ns after the start)``."""
    duration_ns: int | None = None
    warmup: int = 0
    warmup_slots: int = 1
    replay: bool = False
    """Open loop: the schedule is a trace's (its requests get ``scheduled_ns``, not credits)."""


async def _closed(
    client: Client,
    source: RequestSource,
    salt: int,
    indices: Iterable[int],
    slots: int,
    deadline_ns: int | None,
    records: list[RequestRecord],
) -> None:
    it = iter(indices)  # shared by the slots: next() never awaits, so each index goes once

    async def slot() -> None:
        for index in it:
            issued = time.monotonic_ns()  # the slot is free: its next request's credit
            if deadline_ns is not None and issued >= deadline_ns:
                return
            records.append(await client.send(source.spec(salt, index), credit_ns=issued))

    await asyncio.gather(*(slot() for _ in range(slots)))


async def _open(
    client: Client,
    source: RequestSource,
    plan: WorkerPlan,
    start_ns: int,
    records: list[RequestRecord],
) -> None:
    cap = asyncio.Semaphore(plan.slots) if plan.slots > 0 else None
    pending: set[asyncio.Task[None]] = set()

    def send(spec: RequestSpec, due: int) -> Awaitable[RequestRecord]:
        if plan.replay:
            return client.send(spec, scheduled_ns=due)
        return client.send(spec, credit_ns=due)

    async def one(spec: RequestSpec, due: int) -> None:
        if cap is None:
            records.append(await send(spec, due))
            return
        async with cap:
            records.append(await send(spec, due))

    for index, offset in plan.schedule or ():
        due = start_ns + offset
        spec = source.spec(plan.salt, index)  # built while waiting for its time
        delay = due - time.monotonic_ns()
        if delay > 0:
            await asyncio.sleep(delay / 1e9)
        task = asyncio.create_task(one(spec, due))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*list(pending))


def _live_sample(record: RequestRecord) -> tuple[float | None, float | None]:
    """TTFT and a chunk-based ITL estimate (ms) for the live view (the report uses OSL)."""
    if not record.valid:
        return None, None
    chunks = record.chunk_ns
    ttft = (chunks[0] - record.start_ns) / 1e6
    itl = (chunks[-1] - chunks[0]) / (len(chunks) - 1) / 1e6 if len(chunks) > 1 else None
    return ttft, itl


class _Reporter:
    """Sends the records finished since the last report (counts and live samples)."""

    def __init__(self, conn: Connection, worker: int, records: list[RequestRecord]) -> None:
        self.conn, self.worker, self.records = conn, worker, records
        self.sent = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            self.send()

    def send(self) -> None:
        new = self.records[self.sent :]
        self.sent += len(new)
        ttfts: list[float] = []
        itls: list[float] = []
        errors = 0
        for record in new:
            ttft, itl = _live_sample(record)
            if ttft is None:
                errors += 1
                continue
            ttfts.append(ttft)
            if itl is not None:
                itls.append(itl)
        self.conn.send(("progress", self.worker, len(new), errors, ttfts, itls))


def _wall_offset_ns() -> int:
    """``time.time_ns() - time.monotonic_ns()``, read between two monotonic reads, keeping the
    tightest of a few tries (a preemption between the reads would skew the stamps)."""
    samples = []
    for _ in range(5):
        before = time.monotonic_ns()
        wall = time.time_ns()
        after = time.monotonic_ns()
        samples.append((after - before, wall - (before + after) // 2))
    return min(samples)[1]


def _finish(records: list[RequestRecord], source: RequestSource) -> None:
    """Count output and reasoning tokens (each text on its own, as aiperf counts them) and
    stamp wall-clock starts, after the level (off the hot path)."""
    counter = source.maker.counter
    offset = _wall_offset_ns()
    for record in records:
        record.start_wall_ns = record.start_ns + offset
        if record.output_text:
            record.output_tokens = counter.count(record.output_text)
        if record.reasoning_text:
            record.reasoning_tokens = counter.count(record.reasoning_text)
        record.output_text = record.reasoning_text = ""


async def _worker_loop(conn: Connection, worker: int, setup: WorkerSetup) -> None:
    async with Client(setup, worker) as client:
        setup.source.prepare()  # build prompt material now, not during the first level
        setup.warmup_source.prepare()
        while True:
            message = conn.recv()  # blocking: nothing else runs between levels
            if message[0] != "level":
                return
            plan: WorkerPlan = message[1]
            warm: list[RequestRecord] = []
            if plan.warmup:
                salt = WARMUP_SALT + plan.salt
                await _closed(
                    client,
                    setup.warmup_source,
                    salt,
                    range(plan.warmup),
                    plan.warmup_slots,
                    None,
                    warm,
                )
            _finish(warm, setup.warmup_source)
            conn.send(("ready", worker, warm))
            go = conn.recv()
            if go[0] != "go":
                return
            start_ns: int = go[1]
            records: list[RequestRecord] = []
            reporter = _Reporter(conn, worker, records)
            reporting = asyncio.create_task(reporter.run())
            delay = start_ns - time.monotonic_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            deadline = None if plan.duration_ns is None else start_ns + plan.duration_ns
            try:
                if plan.schedule is not None:
                    await _open(client, setup.source, plan, start_ns, records)
                elif plan.indices is not None and plan.slots > 0:
                    await _closed(
                        client, setup.source, plan.salt, plan.indices, plan.slots, deadline, records
                    )
            finally:
                reporting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporting
            reporter.send()
            _finish(records, setup.source)
            conn.send(("done", worker, records))


def worker_main(conn: Connection, worker: int, setup: WorkerSetup) -> None:
    """Entry point of a worker process: one event loop (uvloop when installed) for its life."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):  # optional: a faster loop when it is installed
        factory = importlib.import_module("uvloop").new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_worker_loop(conn, worker, setup))
    except BaseException as e:  # isolation boundary: report the failure, then exit
        with contextlib.suppress(Exception):
            conn.send(("error", worker, f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from None
    finally:
        conn.close()
