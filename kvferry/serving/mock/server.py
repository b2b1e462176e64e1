"""``kvferry serve mock``: a simulated OpenAI-compatible LLM engine over HTTP (aiohttp).

Like NVIDIA Dynamo's mocker, it behaves like a vLLM server without a model: continuous batching,
a paged KV cache with prefix caching and LRU eviction, and step times from a timing model
(:mod:`kvferry.serving.mock.scheduler`, :mod:`~kvferry.serving.mock.blocks`,
:mod:`~kvferry.serving.mock.timing`), so a KV-aware router or an endpoint benchmark can be run with
many workers at high load on one laptop. This module owns the HTTP surface: routes, auth, the
error boundary, metrics, start-up and shutdown. Request validation and the OpenAI objects are
:mod:`kvferry.serving.mock.openai_api`; the KV event fan-out is
:mod:`kvferry.serving.mock.kv_events`; it does no scheduling itself.

Endpoints (all but ``/health`` require ``Authorization: Bearer <token>`` when
``mock.auth_token`` is set):

- ``POST /v1/completions``: ``prompt`` (a string, or a list of token ids), ``max_tokens``
  (default 16), ``min_tokens``, ``ignore_eos``, ``stream``, ``stream_options.include_usage``,
  ``cache_salt`` (tenant; blocks of different salts never match), ``return_token_ids``;
  other sampling fields are accepted and ignored.
- ``POST /v1/chat/completions``: ``messages`` (rendered by the model's chat template when the
  Hugging Face tokenizer has one, as vLLM does, else by the fixed template of
  :func:`~kvferry.serving.mock.tokenizer.render_chat`), ``max_tokens`` or
  ``max_completion_tokens`` (default: the rest of ``max_model_len``), the same options.
- Streaming answers are SSE ``data: {chunk}`` lines in OpenAI's chunk format (chat: a first
  chunk with ``delta.role``; ``finish_reason`` on the last token's chunk), a final usage chunk
  with empty ``choices`` when ``stream_options.include_usage`` is true, then ``data: [DONE]``.
  Usage carries ``prompt_tokens_details.cached_tokens`` (prompt tokens found in the KV cache).
  P/D, simulated as vLLM's pull-style connectors do it: a request whose ``kv_transfer_params``
  has ``do_remote_decode`` answers with ``kv_transfer_params`` (``transfer_mode``
  ``kvferry-mock``, ``remote_num_tokens``); a request carrying those parameters on another mock
  counts that many prompt tokens as handed off (loaded, not computed; the last one is).
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text, below).
- ``GET /kv/stats``: JSON ``{"model", "block_size", "num_blocks", "used_blocks",
  "cached_blocks", "free_blocks", "usage", "lookup_blocks", "hit_blocks", "hit_rate",
  "request_hit_rate_mean", "evicted_blocks", "admissions", "last_event_id", "tokenizer",
  "vocab_size"}``; ``hit_rate`` is block-weighted (hit blocks / looked-up full prompt blocks),
  ``request_hit_rate_mean`` is the per-request mean (aiperf's definition); ``tokenizer`` is
  "words" (with its ``vocab_size``) or "hf" (``mock.tokenizer``; ``vocab_size`` null), so a
  router can check it tokenizes as the mock does.
- ``POST /kv/clear``: unpublish every cached block (a ``cleared`` event); answers
  ``{"cleared_blocks": N}``.
- ``GET /kv/events[?since=ID]``: the KV event stream (below).

A bad request gets an OpenAI-style error ``{"error": {"message", "type", "param", "code"}}``
with status 400 (bad JSON or JSON nested too deeply, a missing or empty prompt, text that is not
valid Unicode, a prompt over ``mock.max_prompt_chars`` characters, a token id outside the
vocabulary, ``max_tokens`` < 1, a prompt plus ``max_tokens`` longer than ``max_model_len``, ...),
401 (auth), 404 (unknown path or model), 408 (a body slower than ``mock.body_timeout``), 413 (a
body over ``mock.max_body_size``) or 503 (shutting down); a handler failure is a 500 with the
same shape, logged and counted. Every response is counted in
``kvferry_mock_http_responses_total`` (path "malformed": requests that were not HTTP). Slow
clients are cut off by the rules of :mod:`kvferry.serving.http_front` (``mock.header_timeout``,
``mock.idle_timeout``, ``mock.max_pending_connections``, ``mock.max_pending_per_address``); a
request whose client hangs up is aborted. Large prompts are tokenized off the event loop.

KV events
---------
``GET /kv/events`` is a ``text/event-stream``. Each message is ``id: <N>`` and
``data: <one JSON object>``; N increases by one per event of this server's life (1, 2, ...), so
a router can tell whether it missed any. Block hashes are the 32-hex-digit kvferry chained block
hashes of a sequence's token ids (its prompt, then its output tokens as they fill blocks):
``BlockHasher(block_size, model_name=<model>, cache_salt=<cache_salt or "">).hashes(token_ids)``,
so a router computes the same keys from the same token ids. The objects::

    {"id": 7, "type": "stored", "block_hashes": ["<hex>", ...], "parent_hash": "<hex>" | null,
     "token_count": 32, "block_size": 16}
    {"id": 8, "type": "removed", "block_hashes": ["<hex>", ...]}
    {"id": 9, "type": "cleared"}
    {"id": 9, "type": "snapshot", "block_size": 16,
     "blocks": [{"hash": "<hex>", "parent_hash": "<hex>" | null}, ...]}

``stored`` lists consecutive blocks of one sequence, first to last, with the parent of the
first (null at the start of a sequence); ``removed`` lists evicted or unpublished hashes;
``cleared`` drops them all. A subscriber first gets either a ``snapshot`` (every hash cached as
of event ``id``; the stream goes on from ``id + 1``) or, with ``?since=ID`` still in the replay
history (``mock.event_history`` events), the events after ``ID``. A subscriber more than 10000
events behind gets ``{"type": "error", "message": ...}`` and is disconnected (reconnect with
``since``). A comment line (``: keepalive``) is sent every 15 s of silence.

Metrics (``GET /metrics``): gauges ``kvferry_mock_requests_{running,waiting}``,
``kvferry_mock_kv_{used,cached,free,total}_blocks``, ``kvferry_mock_kv_usage`` (used / total),
``kvferry_mock_kv_hit_rate``; counters ``kvferry_mock_{prompt_blocks,hit_blocks,evicted_blocks,
prompt_tokens,cached_prompt_tokens,handoff_tokens,prefill_tokens,generated_tokens,
preemptions,steps,kv_events}_total``, ``kvferry_mock_requests_total{finish_reason}``,
``kvferry_mock_model_seconds_total{phase}`` (modelled step time: what the timing model
computed, after ``speedup_ratio``), ``kvferry_mock_clock_late_seconds_total`` (sum over steps
of how long after its modelled end each step's tokens were handed to the HTTP side; divided by
``kvferry_mock_steps_total``, the engine's mean lag behind its model: about 0.1 ms when it keeps
up, more when the host cannot run the steps as fast as the model asks),
``kvferry_mock_clock_slip_seconds_total`` (model time given up when the engine fell more than
10 ms behind; TTFT and ITL measured meanwhile are not the model's),
``kvferry_mock_http_responses_total{path,status}``,
``kvferry_mock_http_connections_closed_total{reason}`` (header_timeout, too_many_waiting); and,
for routers that read vLLM's names, ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``, ``vllm:prefix_cache_queries_total``,
``vllm:prefix_cache_hits_total`` (tokens), ``vllm:prompt_tokens_total``,
``vllm:generation_tokens_total``, labelled ``model_name``.

The server binds 127.0.0.1 unless told otherwise and stops cleanly on SIGINT/SIGTERM: running
requests end (streams with an error chunk), event streams close, then the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvferry.config.models import MockConfig
from kvferry.serving.http_front import HttpFront, connections_closed, decode_json, listen, off_loop
from kvferry.serving.mock.calibrate import fit_sla_profile, is_sla_profile, read_sla_profile
from kvferry.serving.mock.kv_events import SUBSCRIBER_QUEUE, EventHub, sse
from kvferry.serving.mock.openai_api import (
    CompletionFormatter,
    HttpError,
    ParsedRequest,
    RequestParser,
    bad_request,
    data_line,
    error_body,
)
from kvferry.serving.mock.scheduler import MockEngine, TokenOut
from kvferry.serving.mock.timing import TimingModel, fit_profile, load_profile
from kvferry.serving.mock.tokenizer import load_tokenizer

__all__ = ["READY", "MockServer", "build_engine", "describe", "serve"]

log = logging.getLogger("kvferry.serving.mock.server")

READY: Final = "kvferry-mock-ready"
"""First word of the line ``kvferry serve mock`` prints once it accepts connections."""

KEEPALIVE_S: Final = 15.0

_PATHS: Final = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/metrics",
        "/kv/stats",
        "/kv/events",
        "/kv/clear",
    }
)


# --- building the engine ---------------------------------------------------------------------


def build_engine(config: MockConfig) -> MockEngine:
    """The engine a ``mock`` config describes: its tokenizer, and its timing model (fitted to
    ``config.profile`` when set: a ``kvferry profile`` directory, calibrated by
    :mod:`kvferry.serving.mock.calibrate`, or a JSON file of step samples, for the kinds of
    samples it holds).

    Raises:
        ConfigError: the profile or tokenizer cannot be loaded or fitted.
        MissingDependency: ``config.tokenizer`` is set and ``tokenizers`` is not installed.
    """
    timing = TimingModel.from_config(config)
    if config.profile and is_sla_profile(config.profile):
        timing = fit_sla_profile(read_sla_profile(config.profile), config, base=timing)
    elif config.profile:
        timing = fit_profile(load_profile(config.profile), base=timing)
    tokenizer = load_tokenizer(config.tokenizer, config.vocab_size)
    return MockEngine(config, tokenizer, timing)


# --- errors ----------------------------------------------------------------------------------


# --- metrics ---------------------------------------------------------------------------------


class _Collector:
    """Reads the server's state at scrape time (module docstring lists the metrics)."""

    def __init__(self, server: MockServer) -> None:
        self._server = server

    def collect(self) -> Iterable[Metric]:
        server = self._server
        engine = server.engine
        c = engine.counters
        s = engine.blocks.stats()
        p = "kvferry_mock_"

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(p + name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(p + name, doc, value=value)

        yield gauge("requests_running", "Requests in the running batch.", engine.num_running)
        yield gauge("requests_waiting", "Requests waiting for admission.", engine.num_waiting)
        yield gauge("kv_used_blocks", "KV blocks held by running requests.", s.used_blocks)
        yield gauge("kv_cached_blocks", "Cached KV blocks held by no request.", s.cached_blocks)
        yield gauge("kv_free_blocks", "KV blocks holding nothing reusable.", s.free_blocks)
        yield gauge("kv_total_blocks", "KV blocks in the cache.", s.num_blocks)
        yield gauge("kv_usage", "Used KV blocks / total KV blocks.", s.usage)
        yield gauge("kv_hit_rate", "Hit blocks / looked-up prompt blocks.", s.hit_rate)
        yield counter("prompt_blocks", "Full prompt blocks looked up.", s.lookup_blocks)
        yield counter("hit_blocks", "Prompt blocks found in the cache.", s.hit_blocks)
        yield counter("evicted_blocks", "Cached blocks evicted for new ones.", s.evicted_blocks)
        yield counter("prompt_tokens", "Prompt tokens of admitted requests.", c.prompt_tokens)
        yield counter(
            "cached_prompt_tokens", "Prompt tokens found in the cache.", c.cached_prompt_tokens
        )
        yield counter(
            "handoff_tokens",
            "P/D: prompt tokens whose KV a prefill instance handed off (not computed here).",
            c.handoff_tokens,
        )
        yield counter("prefill_tokens", "Tokens computed by prefill.", c.prefill_tokens)
        yield counter("generated_tokens", "Output tokens generated.", c.generated_tokens)
        yield counter("preemptions", "Requests preempted for lack of blocks.", c.preemptions)
        yield counter("steps", "Engine steps run.", c.steps)
        yield counter("kv_events", "KV events published.", server.hub.events)
        finished = CounterMetricFamily(
            p + "requests", "Requests finished, by finish reason.", labels=["finish_reason"]
        )
        for reason, n in c.requests_finished.items():
            finished.add_metric([reason], n)
        yield finished
        model_time = CounterMetricFamily(
            p + "model_seconds",
            "Modelled step time (timing model, after speedup_ratio), by phase.",
            labels=["phase"],
        )
        model_time.add_metric(["prefill"], c.prefill_seconds)
        model_time.add_metric(["decode"], c.decode_seconds)
        yield model_time
        yield counter(
            "clock_late_seconds",
            "Sum over steps of how late their tokens were handed out (/ steps = mean lag).",
            c.late_seconds,
        )
        yield counter(
            "clock_slip_seconds",
            "Model time given up because the engine fell too far behind the wall clock.",
            c.slipped_seconds,
        )
        http = CounterMetricFamily(
            p + "http_responses", "HTTP responses, by path and status.", labels=["path", "status"]
        )
        for (path, status), n in sorted(server.responses.items()):
            http.add_metric([path, str(status)], n)
        yield http
        yield connections_closed(p, "mock", server.front.pending)
        # vLLM's names, for routers and dashboards that read them.
        model = [engine.config.model]
        for name, doc, value, kind in (
            ("vllm:num_requests_running", "Running requests.", engine.num_running, "g"),
            ("vllm:num_requests_waiting", "Waiting requests.", engine.num_waiting, "g"),
            ("vllm:kv_cache_usage_perc", "KV cache usage (1 = full).", s.usage, "g"),
            ("vllm:prefix_cache_queries", "Prompt tokens queried.", c.prompt_tokens, "c"),
            ("vllm:prefix_cache_hits", "Prompt tokens hit.", c.cached_prompt_tokens, "c"),
            ("vllm:prompt_tokens", "Prompt tokens.", c.prompt_tokens, "c"),
            ("vllm:generation_tokens", "Generated tokens.", c.generated_tokens, "c"),
        ):
            family: GaugeMetricFamily | CounterMetricFamily
            if kind == "g":
                family = GaugeMetricFamily(name, doc, labels=["model_name"])
            else:
                family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(model, value)
            yield family


# --- the server ------------------------------------------------------------------------------


class MockServer:
    """The HTTP server of one simulated engine (module docstring).

    Args:
        config: the ``mock`` config section.
        engine: the engine to serve; :func:`build_engine` of ``config`` if None.

    Raises:
        ConfigError, MissingDependency: from :func:`build_engine`.
    """

    def __init__(self, config: MockConfig, engine: MockEngine | None = None) -> None:
        self.config = config
        self.engine = engine or build_engine(config)
        self.hub = EventHub(self.engine, config.event_history)
        token = config.auth_token.get_secret_value() if config.auth_token is not None else None
        self.front = HttpFront(
            "mock server", "mock", config, token.encode() if token else None, _PATHS, log
        )
        self.responses = self.front.responses
        self._parser = RequestParser(config, self.engine.tokenizer)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(self))
        self._engine_task: asyncio.Task[None] | None = None
        self._created = int(time.time())
        self.address: tuple[str, int] | None = None

    # --- lifecycle ---

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self.front.middleware()], client_max_size=self.config.max_body_size
        )
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/kv/stats", self._kv_stats)
        app.router.add_get("/kv/events", self._kv_events)
        app.router.add_post("/kv/clear", self._kv_clear)
        return app

    async def start(self) -> tuple[str, int]:
        """Bind, start the engine loop and serve; returns the (host, port) bound.

        Raises:
            ConfigError: the address cannot be bound.
        """
        sock = listen(self.config.bind_address, self.config.port, "mock")
        self._engine_task = asyncio.create_task(self.engine.run(), name="kvferry-mock-engine")
        try:
            self.address = await self.front.start(self.app(), sock)
        except BaseException:
            await self.close()
            raise
        return self.address

    @property
    def engine_task(self) -> asyncio.Task[None] | None:
        """The engine loop's task (done only after :meth:`close`, or if the loop failed)."""
        return self._engine_task

    async def close(self) -> None:
        """End running requests and event streams, then stop serving; idempotent."""
        self.engine.stop()
        self.hub.close()
        task, self._engine_task = self._engine_task, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.front.close()

    # --- generation ---

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    def _parse(self, raw: bytes, chat: bool) -> ParsedRequest:
        return self._parser.parse(decode_json(raw), chat=chat)

    async def _generate(self, http: web.Request, *, chat: bool) -> web.StreamResponse:
        raw = await self.front.read_body(http)
        # A large prompt is decoded and tokenized in a thread: the event loop keeps serving.
        parsed = await off_loop(len(raw), self._parse, raw, chat)
        try:
            request = self.engine.submit(
                parsed.prompt_ids,
                parsed.params,
                cache_salt=parsed.cache_salt,
                handoff_tokens=parsed.handoff_tokens,
            )
        except RuntimeError as e:
            raise HttpError(503, f"the server is shutting down: {e}") from e
        completion = CompletionFormatter(parsed, request, self.config.model)
        if parsed.stream:
            return await self._stream(http, completion)
        texts: list[str] = []
        finish: str | None = None
        async with contextlib.aclosing(self.engine.stream(request)) as outputs:
            async for out in outputs:
                finish = out.finish_reason
                if finish != "abort":
                    texts.append(out.text)
        if finish == "abort":
            raise HttpError(503, "the request was aborted: the server is shutting down")
        return web.json_response(completion.whole("".join(texts), finish))

    async def _stream(
        self, http: web.Request, completion: CompletionFormatter
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(http)
        outputs = self.engine.stream_batches(completion.request)
        try:
            if completion.parsed.chat:
                await response.write(data_line(completion.role_chunk()))
            async for batch in outputs:
                await response.write(b"".join(self._token_chunk(completion, o) for o in batch))
            if completion.parsed.include_usage:
                await response.write(data_line(completion.usage_chunk()))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            log.debug("client of %s went away", completion.request.request_id)
        finally:
            await outputs.aclose()  # aborts the request if it has not finished
        return response

    def _token_chunk(self, completion: CompletionFormatter, out: TokenOut) -> bytes:
        if out.finish_reason == "abort":
            return data_line(
                error_body(503, "the request was aborted: the server is shutting down")
            )
        return completion.chunk_bytes(out.text, out.token_id, out.finish_reason)

    # --- information ---

    async def _models(self, _: web.Request) -> web.Response:
        model = {
            "id": self.config.model,
            "object": "model",
            "created": self._created,
            "owned_by": "kvferry",
            "root": self.config.model,
            "max_model_len": self.config.model_len,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "model": self.config.model,
                "running": self.engine.num_running,
                "waiting": self.engine.num_waiting,
            }
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def kv_stats(self) -> dict[str, object]:
        """What ``GET /kv/stats`` answers."""
        s = self.engine.blocks.stats()
        return {
            "model": self.config.model,
            "block_size": s.block_size,
            "num_blocks": s.num_blocks,
            "used_blocks": s.used_blocks,
            "cached_blocks": s.cached_blocks,
            "free_blocks": s.free_blocks,
            "usage": s.usage,
            "lookup_blocks": s.lookup_blocks,
            "hit_blocks": s.hit_blocks,
            "hit_rate": s.hit_rate,
            "request_hit_rate_mean": s.request_hit_rate_mean,
            "evicted_blocks": s.evicted_blocks,
            "admissions": s.admissions,
            "last_event_id": s.last_event_id,
            "tokenizer": "hf" if self.config.tokenizer else "words",
            "vocab_size": None if self.config.tokenizer else self.config.vocab_size,
        }

    async def _kv_stats(self, _: web.Request) -> web.Response:
        return web.json_response(self.kv_stats())

    async def _kv_clear(self, _: web.Request) -> web.Response:
        return web.json_response({"cleared_blocks": self.engine.blocks.clear_cache()})

    async def _kv_events(self, http: web.Request) -> web.StreamResponse:
        since: int | None = None
        raw = http.query.get("since")
        if raw is not None:
            try:
                since = int(raw)
            except ValueError:
                since = -1
            if since < 0:
                raise bad_request(f"since must be a non-negative event id, got {raw!r}", "since")
        sub, first = self.hub.subscribe(since)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        try:
            await response.prepare(http)
            for message in first:
                await response.write(message)
            while True:
                try:
                    item = await asyncio.wait_for(sub.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if item is None:
                    if sub.lagged:
                        await response.write(
                            sse(
                                None,
                                {
                                    "type": "error",
                                    "message": f"more than {SUBSCRIBER_QUEUE} events behind; "
                                    "reconnect with ?since=<last id received>",
                                },
                            )
                        )
                    break
                await response.write(item)
            await response.write_eof()
        except ConnectionError:
            pass
        finally:
            self.hub.unsubscribe(sub)
        return response


# --- running it ------------------------------------------------------------------------------


async def serve(
    config: MockConfig,
    *,
    on_ready: Callable[[MockServer, tuple[str, int]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run a mock server until SIGINT/SIGTERM (or ``stop`` is set), then shut down cleanly.

    Args:
        config: the ``mock`` config section.
        on_ready: called with the server and the (host, port) it bound, once it accepts
            connections.
        stop: set it to stop the server; one is made (and set by the signals) if None.

    Raises:
        ConfigError, MissingDependency: the engine cannot be built or the port bound.
        RuntimeError: the engine loop failed (a bug; the traceback is logged).
    """
    server = MockServer(config)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        address = await server.start()
        if on_ready is not None:
            on_ready(server, address)
        engine_task = server.engine_task
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait())]
        if engine_task is not None:
            waiters.append(engine_task)
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        waiters[0].cancel()
        if engine_task is not None and engine_task.done() and not engine_task.cancelled():
            error = engine_task.exception()
            if error is not None:
                log.error("mock engine loop failed", exc_info=error)
                raise RuntimeError(f"the mock engine loop failed: {error!r}") from error
    finally:
        await server.close()
        for sig in installed:
            loop.remove_signal_handler(sig)


def describe(server: MockServer) -> str:
    """One line about a mock server's engine, for its log."""
    config, timing = server.config, server.engine.timing
    tokens = config.num_blocks * config.block_size
    return (
        f"model {config.model!r}: {config.num_blocks} blocks x {config.block_size} tokens "
        f"({tokens} tokens), max_num_seqs {config.max_num_seqs}, max_model_len "
        f"{config.model_len}, speedup {_g(timing.speedup_ratio)}x; 1000-token prefill "
        f"{_g(timing.prefill_ms([(1000, 0)]))} ms, decode step (1 seq, 1000 tokens) "
        f"{_g(timing.decode_ms(1, 1000))} ms"
    )


def _g(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)
