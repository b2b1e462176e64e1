"""``kvferry serve router``: a KV-aware router, an OpenAI-compatible front over N workers.

Like NVIDIA Dynamo's KV router, it sends each request to the worker where it costs least:
the one that already holds most of its prompt's KV blocks, weighed against how busy each
worker is (the cost function is :mod:`kvferry.serving.router.prefix_index`'s). Workers are vLLM
servers or ``kvferry serve mock`` engines (``router.workers``). This module owns the HTTP surface:
routes, auth, the error boundary, proxying, retries and metrics. Worker health and KV event
subscriptions are :mod:`kvferry.serving.router.workers`; the index, load and cost are
:mod:`kvferry.serving.router.prefix_index` (pure).

Routing a request (``POST /v1/completions`` or ``/v1/chat/completions``):

1. The body must be a JSON object (else 400). Its prompt is tokenized the way the mock
   workers do it (:mod:`kvferry.serving.mock.tokenizer`: ``prompt`` text or token ids, ``messages``
   through the fixed chat template; the word tokenizer with ``router.vocab_size`` or the
   ``router.tokenizer`` file) and hashed into full blocks with
   ``BlockHasher(router.block_size, model_name=<model>, cache_salt=<cache_salt or "">)``, the
   mock scheduler's keys. A prompt the router cannot read is routed with no blocks (by load
   only) and the worker answers it (usually 400).
2. The worker: ``router.mode`` kv = lowest cost among the healthy workers (``temperature`` 0)
   or a softmax draw (``temperature`` > 0); round-robin; random. In every mode the router
   records the prompt's blocks as predicted on the chosen worker (``router.approx_ttl``
   seconds in approximate mode, :data:`PREDICTION_GRACE_S` until the worker's own KV events
   confirm them otherwise) and counts the predicted overlap (``hit_blocks``).
3. The request body is forwarded unchanged (with ``router.worker_auth_token`` as its bearer
   token), and the answer is passed back: status, body, and for ``text/event-stream`` every
   chunk as it arrives, never buffered. The response carries ``X-Kvferry-Worker: <url>``.

Failures: a request that fails on a worker before its response started is sent once more, to
the next best healthy worker. A worker that refuses the connection (nothing listens there) is
marked down at once and its blocks are dropped
(:meth:`~kvferry.serving.router.workers.WorkerPool.mark_down`). Any other failure (a 5xx, a
reset or timed-out connection) may be the request's fault, not the worker's: when the retry
fails alike, no worker is suspected; otherwise the worker's ``/health`` is checked first, and
only a failed check marks it down (keeping its blocks: a slow or erring worker still holds its
cache) (:meth:`~kvferry.serving.router.workers.WorkerPool.suspect`). A 4xx is the worker's
answer, passed through. When every try answered 5xx, the client gets the last worker's own
answer. A stream that breaks after it started ends with an error chunk
``data: {"error": {...}}`` and ``data: [DONE]`` (no retry: the client already has part of the
answer); a non-streaming body that breaks is a 502; either way the worker is checked. When no
healthy worker is left the answer is 503; when the retry failed too it is 502. Errors are
OpenAI-style ``{"error": {"message", "type", "param", "code"}}``.

Clients are held to the limits of :mod:`kvferry.serving.http_front` (``router.header_timeout``,
``router.idle_timeout``, ``router.body_timeout``, ``router.max_pending_connections``,
``router.max_pending_per_address``, ``router.max_body_size`` (413) and
``router.max_prompt_chars`` (400)); a large prompt is tokenized off the event loop.

Endpoints (all but ``/health`` require ``Authorization: Bearer <token>`` when
``router.auth_token`` is set):

- ``POST /v1/completions``, ``POST /v1/chat/completions``: routed (above).
- ``GET /v1/models``: the first healthy worker's answer.
- ``GET /health``: ``{"status": "ok", "workers", "healthy_workers"}``; 503 with status
  ``"no healthy worker"`` when none is up.
- ``GET /router/stats``: JSON, below. ``GET /metrics``: the same in Prometheus text.

``/router/stats`` and the metrics are listed in :mod:`kvferry.serving.router.metrics`.

The server binds 127.0.0.1 unless told otherwise and stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import signal
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kvferry.config.models import RouterConfig
from kvferry.index.hashing import BlockHasher
from kvferry.serving.http_front import HttpFront, decode_json, listen, off_loop
from kvferry.serving.mock.openai_api import (
    HttpError,
    data_line,
    error_body,
    request_object,
)
from kvferry.serving.mock.tokenizer import load_tokenizer
from kvferry.serving.router.metrics import Collector, stats
from kvferry.serving.router.prefix_index import LoadTracker, PrefixIndex, RoundRobin, pick, score
from kvferry.serving.router.workers import Worker, WorkerPool, WorkerRole, describe_error

__all__ = ["PREDICTION_GRACE_S", "READY", "WORKER_HEADER", "RouterServer", "describe", "serve"]

log = logging.getLogger("kvferry.serving.router.server")

READY: Final = "kvferry-router-ready"
"""First word of the line ``kvferry serve router`` prints once it accepts connections."""

WORKER_HEADER: Final = "X-Kvferry-Worker"
"""Response header naming the worker that answered."""

PREDICTION_GRACE_S: Final = 30.0
"""With KV events, a routed prompt's blocks count as held by its worker for this long, so that
a repeat arriving before the worker's stored events (or while the first request is still in
prefill) goes to the same worker; the events then confirm or remove them."""

MAX_HASHERS: Final = 4096
"""Block hashers (one per model and cache_salt) kept before the cache is emptied."""
MAX_ATTEMPTS: Final = 2
"""A request is sent to at most this many workers (the first choice and one retry)."""

_PATHS: Final = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/metrics",
        "/router/stats",
    }
)


@dataclass
class PdCounters:
    """P/D (router.pd): prefill steps sent, retried on another instance and failed for good;
    hand-offs passed to a decode instance, prefills that returned none, decodes that failed."""

    prefills: int = 0
    prefill_retries: int = 0
    prefill_failures: int = 0
    handoffs: int = 0
    without_handoff: int = 0
    decode_failures: int = 0


def _error_text(answer: Any, where: str) -> str:
    """An upstream OpenAI-style error's message, prefixed with where it came from."""
    if isinstance(answer, dict):
        err = answer.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return f"{where}: {err['message']}"
        if isinstance(answer.get("message"), str):
            return f"{where}: {answer['message']}"
    return f"{where} refused the request"


class _Failed(Exception):
    """A worker failed a request before its response started.

    Attributes:
        reason: what happened, for logs and the client's error.
        unreachable: the connection was refused or had no route: nothing listens there now,
            whatever the request (anything else may be the request's fault).
        answer: the worker's 5xx reply, to pass on if no other worker does better.
    """

    def __init__(
        self, reason: str, *, unreachable: bool = False, answer: web.Response | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable
        self.answer = answer


# --- the server ------------------------------------------------------------------------------


class RouterServer:
    """The HTTP server of the router (module docstring).

    Args:
        config: the ``router`` section.
        seed: seeds the tie-breaks and draws (random if None).

    Raises:
        ConfigError: ``config.workers`` is empty or the tokenizer cannot be loaded.
        MissingDependency: ``config.tokenizer`` is set and ``tokenizers`` is not installed.
    """

    def __init__(self, config: RouterConfig, *, seed: int | None = None) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer, config.vocab_size)
        self.index = PrefixIndex()
        self.load = LoadTracker(config.block_size)
        self.pool = WorkerPool(config, self.index)
        self.requests = 0
        self.retries = 0
        self.unrouted = 0
        self.pd = PdCounters()
        self._rng = random.Random(seed)
        self._rr = RoundRobin([w.url for w in self.pool.workers])
        self._hashers: dict[tuple[str, str], BlockHasher] = {}
        self._ids = itertools.count(1)
        token = config.auth_token.get_secret_value() if config.auth_token is not None else None
        self.front = HttpFront(
            "router", "router", config, token.encode() if token else None, _PATHS, log
        )
        self.responses = self.front.responses
        self._upstream_headers = {"Content-Type": "application/json", **self.pool.headers}
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(Collector(self))
        self._session: aiohttp.ClientSession | None = None
        self.address: tuple[str, int] | None = None

    # --- lifecycle ---

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self.front.middleware()], client_max_size=self.config.max_body_size
        )
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/router/stats", self._stats)
        return app

    async def start(self) -> tuple[str, int]:
        """Check the workers, bind and serve; returns the (host, port) bound.

        Raises:
            ConfigError: the address cannot be bound, or a worker's block size or model
                differs from the router's (:meth:`WorkerPool.start`).
        """
        sock = listen(self.config.bind_address, self.config.port, "router")
        try:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout),
            )
            await self.pool.start(self._session)
            self.address = await self.front.start(self.app(), sock)
        except BaseException:
            sock.close()
            await self.close()
            raise
        return self.address

    async def close(self) -> None:
        """Stop serving, the probes and the event streams; idempotent."""
        await self.pool.close()
        await self.front.close()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # --- routing ---

    def _hasher(self, cache_salt: str) -> BlockHasher:
        key = (self.pool.model, cache_salt)
        hasher = self._hashers.get(key)
        if hasher is None:
            if len(self._hashers) >= MAX_HASHERS:  # many tenants: start over, never grow forever
                self._hashers.clear()
            hasher = BlockHasher(
                self.config.block_size, model_name=self.pool.model, cache_salt=cache_salt
            )
            self._hashers[key] = hasher
        return hasher

    def prompt_ids(self, body: Mapping[str, Any], *, chat: bool) -> list[int]:
        """The prompt's token ids as a mock worker computes them; [] when the prompt is not
        readable (the worker will say why)."""
        try:
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                    return []
                return self.tokenizer.chat_ids(messages)
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                return self.tokenizer.encode(prompt)
            if isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= 0xFFFFFFFF
                for t in prompt
            ):
                return prompt
        except (AttributeError, TypeError, ValueError):  # a malformed message part
            return []
        return []

    def choose(
        self,
        hashes: Sequence[bytes],
        prompt_tokens: int,
        exclude: Iterable[Worker] = (),
        role: WorkerRole = "both",
    ) -> tuple[Worker, int] | None:
        """The worker for a request and its predicted overlap; None if no healthy worker is
        left outside ``exclude``. P/D: ``role`` picks among the prefill or the decode
        instances; decode instances are chosen by load alone (their KV comes with the
        request)."""
        skip = {w.url for w in exclude}
        candidates = [
            w for w in self.pool.workers if w.healthy and w.url not in skip and w.role == role
        ]
        if not candidates:
            return None
        urls = [w.url for w in candidates]
        if role == "decode":
            hashes, prompt_tokens = (), 0
        overlaps = self.index.overlaps(hashes, urls, asyncio.get_running_loop().time())
        if self.config.mode == "kv" or role == "decode":
            costs = score(
                urls, hashes, prompt_tokens, overlaps, self.load, self.config.prefill_weight
            )
            chosen = pick(costs, self.config.temperature, self._rng).worker
        elif self.config.mode == "round-robin":
            chosen = self._rr.next(urls) or urls[0]
        else:
            chosen = self._rng.choice(urls)
        return self.pool.by_url(chosen), overlaps[chosen]

    def _blocks(self, raw: bytes, chat: bool) -> tuple[int, list[bytes]]:
        """Decode a request body; its prompt's token count and block hashes.

        Raises:
            HttpError: 400 for a body that is not a JSON object or a prompt over
                ``router.max_prompt_chars``.
        """
        body = request_object(
            decode_json(raw),
            chat=chat,
            max_prompt_chars=self.config.max_prompt_chars,
            key="router.max_prompt_chars",
        )
        tokens = self.prompt_ids(body, chat=chat)
        salt = body.get("cache_salt")
        try:
            hashes = self._hasher(salt if isinstance(salt, str) else "").hashes(tokens)
        except UnicodeEncodeError:  # a salt that is not valid Unicode: the worker says so
            hashes = []
        return len(tokens), hashes

    async def _generate(self, http: web.Request) -> web.StreamResponse:
        raw = await self.front.read_body(http)
        # A large prompt is decoded, tokenized and hashed in a thread: the loop keeps serving.
        chat = http.path == "/v1/chat/completions"
        prompt_tokens, hashes = await off_loop(len(raw), self._blocks, raw, chat)
        self.requests += 1
        if self.config.pd:
            return await self._disaggregated(http, raw, hashes, prompt_tokens)
        return await self._route(http, raw, hashes, prompt_tokens, "both")

    async def _disaggregated(
        self, http: web.Request, raw: bytes, hashes: Sequence[bytes], prompt_tokens: int
    ) -> web.StreamResponse:
        """P/D: prefill on a prefill instance (max_tokens 1, no stream, asking for remote
        decode), then decode on a decode instance with the returned ``kv_transfer_params``.

        A prefill that fails is retried on another prefill instance; when none can, the client
        gets a clear 502/503 naming what failed. A prefill instance that returns no hand-off
        (no P/D connector) still gets the request decoded: the decode instance recomputes it.
        """
        body = decode_json(raw)
        assert isinstance(body, dict)  # checked by _blocks
        params = await self._prefill(http, body, hashes, prompt_tokens)
        if params:
            self.pd.handoffs += 1
            body["kv_transfer_params"] = params
        else:
            self.pd.without_handoff += 1
        decode_raw = json.dumps(body).encode()
        try:
            return await self._route(http, decode_raw, hashes, prompt_tokens, "decode")
        except HttpError:
            self.pd.decode_failures += 1
            raise

    async def _prefill(
        self,
        http: web.Request,
        body: dict[str, Any],
        hashes: Sequence[bytes],
        prompt_tokens: int,
    ) -> dict[str, Any] | None:
        """Run the prefill step; the ``kv_transfer_params`` it returned (None: none).

        Raises:
            HttpError: every prefill instance failed (502/503), or one refused the request
                (its 4xx, passed on: the request is at fault, not the instance).
        """
        prefill = {
            k: v
            for k, v in body.items()
            if k not in ("stream", "stream_options", "min_tokens", "max_completion_tokens")
        }
        prefill.update(
            max_tokens=1,
            stream=False,
            kv_transfer_params={
                "do_remote_decode": True,
                "do_remote_prefill": False,
                "remote_engine_id": None,
                "remote_block_ids": None,
                "remote_host": None,
                "remote_port": None,
            },
        )
        raw = json.dumps(prefill).encode()
        tried: list[Worker] = []
        failures: list[str] = []
        while len(tried) < MAX_ATTEMPTS:
            choice = self.choose(hashes, prompt_tokens, exclude=tried, role="prefill")
            if choice is None:
                break
            worker, overlap = choice
            if tried:
                tried[-1].stats.retries += 1
                self.pd.prefill_retries += 1
            tried.append(worker)
            self.pd.prefills += 1
            try:
                status, answer = await self._post_json(
                    http, worker, raw, hashes, prompt_tokens, overlap
                )
            except _Failed as e:
                worker.stats.errors += 1
                failures.append(f"{worker.url} {e.reason}")
                if e.unreachable:
                    self.pool.mark_down(worker, e.reason)
                else:
                    self.pool.suspect(worker, e.reason)
                continue
            if status >= 400:  # the request's fault: the client gets the instance's answer
                self.pd.prefill_failures += 1
                raise HttpError(status, _error_text(answer, f"prefill on {worker.url}"))
            params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
            return params if isinstance(params, dict) else None
        self.pd.prefill_failures += 1
        detail = f" ({'; '.join(failures)})" if failures else ""
        if not any(w.healthy and w.role == "prefill" for w in self.pool.workers):
            self.unrouted += 1
            raise HttpError(503, f"no healthy prefill instance for the request{detail}")
        raise HttpError(502, f"the prefill failed on {len(failures)} instances{detail}")

    async def _post_json(
        self,
        http: web.Request,
        worker: Worker,
        raw: bytes,
        hashes: Sequence[bytes],
        prompt_tokens: int,
        overlap: int,
    ) -> tuple[int, Any]:
        """POST a non-streamed request to ``worker``; its (status, decoded JSON body).

        Raises:
            _Failed: the worker failed (unreachable, 5xx, a broken or non-JSON answer).
        """
        if self._session is None:
            raise HttpError(503, "the router is shutting down")
        try:
            with self._sent(worker, hashes, prompt_tokens, overlap):
                async with self._session.post(
                    worker.url + http.path, data=raw, headers=self._upstream_headers
                ) as upstream:
                    payload = await upstream.read()
                    status = upstream.status
        except aiohttp.ClientConnectorError as e:
            raise _Failed(f"failed before answering: {describe_error(e)}", unreachable=True) from e
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise _Failed(f"failed: {describe_error(e)}") from e
        text = " ".join(payload[:300].decode(errors="replace").split())
        if status >= 500:
            raise _Failed(f"answered {status}" + (f": {text}" if text else ""))
        try:
            return status, json.loads(payload)
        except ValueError:
            raise _Failed(f"answered {status} with a body that is not JSON: {text!r}") from None

    async def _route(
        self,
        http: web.Request,
        raw: bytes,
        hashes: Sequence[bytes],
        prompt_tokens: int,
        role: WorkerRole,
    ) -> web.StreamResponse:
        """Send the request to the best worker of ``role``, retrying once elsewhere."""
        tried: list[Worker] = []
        failures: list[str] = []
        suspects: list[tuple[Worker, str]] = []
        answer: web.Response | None = None
        while len(tried) < MAX_ATTEMPTS:
            choice = self.choose(hashes, prompt_tokens, exclude=tried, role=role)
            if choice is None:
                break
            worker, overlap = choice
            if tried:
                tried[-1].stats.retries += 1
                self.retries += 1
            tried.append(worker)
            try:
                response = await self._forward(http, worker, raw, hashes, prompt_tokens, overlap)
            except _Failed as e:
                worker.stats.errors += 1
                failures.append(f"{worker.url} {e.reason}")
                if e.unreachable:
                    self.pool.mark_down(worker, e.reason)
                else:
                    suspects.append((worker, e.reason))
                    answer = answer or e.answer
                continue
            # It worked here: a worker it failed on is to blame, if that worker's /health agrees.
            for suspect, reason in suspects:
                self.pool.suspect(suspect, reason)
            return response
        if len(suspects) == 1:  # tried on no other worker: its /health decides
            self.pool.suspect(*suspects[0])
        # (Two workers failed it alike: the request is to blame, and no worker is suspected.)
        if answer is not None:  # a worker's own 5xx says best what went wrong
            return answer
        detail = f" ({'; '.join(failures)})" if failures else ""
        if not any(w.role == role for w in self.pool.healthy()):
            self.unrouted += 1
            what = "worker" if role == "both" else f"{role} instance"
            raise HttpError(
                503,
                f"no healthy {what} to send the request to{detail}; the router retries "
                f"down workers every {self.config.health_interval:g}s",
            )
        raise HttpError(502, f"the request failed on {len(failures)} workers{detail}")

    @contextlib.contextmanager
    def _sent(
        self, worker: Worker, hashes: Sequence[bytes], prompt_tokens: int, overlap: int
    ) -> Iterator[int]:
        """While a request is at ``worker``: count it sent there, record its blocks as predicted
        there, and hold its load; yields its load id (the load ends on leaving)."""
        stats = worker.stats
        stats.requests += 1
        stats.prompt_blocks += len(hashes)
        stats.hit_blocks += overlap
        now = asyncio.get_running_loop().time()
        ttl = self.config.approx_ttl if worker.kv_source == "approx" else PREDICTION_GRACE_S
        self.index.store(worker.url, hashes, until=now + ttl)
        rid = next(self._ids)
        self.load.start(rid, worker.url, hashes, prompt_tokens)
        try:
            yield rid
        finally:
            self.load.finish(rid)

    async def _forward(
        self,
        http: web.Request,
        worker: Worker,
        raw: bytes,
        hashes: Sequence[bytes],
        prompt_tokens: int,
        overlap: int,
    ) -> web.StreamResponse:
        """Send the request to ``worker`` and relay its answer, counting it.

        Raises:
            _Failed: the worker failed before its response started (retry elsewhere).
        """
        with self._sent(worker, hashes, prompt_tokens, overlap) as rid:
            return await self._proxy(http, worker, raw, rid)

    async def _proxy(
        self, http: web.Request, worker: Worker, raw: bytes, rid: int
    ) -> web.StreamResponse:
        if self._session is None:
            raise HttpError(503, "the router is shutting down")
        try:
            upstream = await self._session.post(
                worker.url + http.path, data=raw, headers=self._upstream_headers
            )
        except aiohttp.ClientConnectorError as e:  # refused, no route: no worker there now
            raise _Failed(f"failed before answering: {describe_error(e)}", unreachable=True) from e
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise _Failed(f"failed before answering: {describe_error(e)}") from e
        async with upstream:
            ctype = upstream.headers.get("Content-Type", "application/json")
            headers = {"Content-Type": ctype, WORKER_HEADER: worker.url}
            if upstream.status >= 500:
                payload = b""
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    payload = await upstream.read()
                text = " ".join(payload[:300].decode(errors="replace").split())
                raise _Failed(
                    f"answered {upstream.status}" + (f": {text}" if text else ""),
                    answer=web.Response(status=upstream.status, body=payload, headers=headers),
                )
            if not ctype.startswith("text/event-stream"):
                try:
                    payload = await upstream.read()
                except (aiohttp.ClientError, OSError, TimeoutError) as e:
                    worker.stats.errors += 1
                    self.pool.suspect(worker, f"its answer broke off: {describe_error(e)}")
                    raise HttpError(
                        502, f"worker {worker.url} failed while answering: {describe_error(e)}"
                    ) from e
                return web.Response(status=upstream.status, body=payload, headers=headers)
            return await self._relay(http, worker, upstream, rid, headers)

    async def _relay(
        self,
        http: web.Request,
        worker: Worker,
        upstream: aiohttp.ClientResponse,
        rid: int,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Pass an event stream through chunk by chunk; SSE messages seen count as output
        tokens of the request (one per token for the mock and vLLM's default)."""
        response = web.StreamResponse(
            status=upstream.status, headers={**headers, "Cache-Control": "no-cache"}
        )
        await response.prepare(http)
        ended_newline = False
        while True:
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                worker.stats.errors += 1
                reason = describe_error(e)
                self.pool.suspect(worker, f"its stream broke off: {reason}")
                end = data_line(error_body(502, f"worker {worker.url} failed mid-stream: {reason}"))
                with contextlib.suppress(ConnectionError):
                    await response.write(end + b"data: [DONE]\n\n")
                break
            if not chunk:
                break
            messages = chunk.count(b"\n\n") + (ended_newline and chunk[:1] == b"\n")
            ended_newline = chunk[-1:] == b"\n"
            self.load.add_output(rid, messages)
            try:
                await response.write(chunk)
            except ConnectionError:  # the client went away: drop the worker's stream too
                upstream.close()
                return response
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    # --- information ---

    async def _models(self, _: web.Request) -> web.Response:
        if self._session is None:
            raise HttpError(503, "the router is shutting down")
        failures: list[str] = []
        for worker in self.pool.healthy():
            try:
                async with self._session.get(
                    worker.url + "/v1/models", headers=self.pool.headers
                ) as r:
                    if r.status < 500:
                        body = await r.read()
                        ctype = r.headers.get("Content-Type", "application/json")
                        return web.Response(
                            status=r.status,
                            body=body,
                            headers={"Content-Type": ctype, WORKER_HEADER: worker.url},
                        )
                    failures.append(f"{worker.url} answered {r.status}")
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                failures.append(f"{worker.url}: {describe_error(e)}")
        detail = f" ({'; '.join(failures)})" if failures else ""
        raise HttpError(503, f"no healthy worker answered /v1/models{detail}")

    async def _health(self, _: web.Request) -> web.Response:
        healthy = len(self.pool.healthy())
        return web.json_response(
            {
                "status": "ok" if healthy else "no healthy worker",
                "workers": len(self.pool.workers),
                "healthy_workers": healthy,
            },
            status=200 if healthy else 503,
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def stats(self) -> dict[str, object]:
        """What ``GET /router/stats`` answers (:func:`kvferry.serving.router.metrics.stats`)."""
        return stats(self)

    async def _stats(self, _: web.Request) -> web.Response:
        return web.json_response(self.stats())


# --- running it ------------------------------------------------------------------------------


async def serve(
    config: RouterConfig,
    *,
    on_ready: Callable[[RouterServer, tuple[str, int]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run a router until SIGINT/SIGTERM (or ``stop`` is set), then shut down.

    Args:
        config: the ``router`` section.
        on_ready: called with the server and the (host, port) it bound, once it accepts
            connections.
        stop: set it to stop the router; one is made (and set by the signals) if None.

    Raises:
        ConfigError, MissingDependency: no workers, a worker that does not match the
            router's block size or model, a tokenizer that cannot be loaded, or a port that
            cannot be bound.
    """
    server = RouterServer(config)
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
        await stop.wait()
    finally:
        await server.close()
        for sig in installed:
            loop.remove_signal_handler(sig)


def describe(server: RouterServer) -> str:
    """One line about a router, for its log."""
    config = server.config
    workers = server.pool.workers
    up = sum(1 for w in workers if w.healthy)
    mode: str = config.mode
    if mode == "kv":
        mode += f" (prefill_weight {config.prefill_weight:g}, temperature {config.temperature:g})"
    events = "KV events" if config.kv_events else f"approximate, ttl {config.approx_ttl:g}s"
    if config.pd:
        prefill = [w for w in workers if w.role == "prefill"]
        p_up = sum(1 for w in prefill if w.healthy)
        decode = len(workers) - len(prefill)
        d_up = up - p_up
        fleet = f"P/D: {len(prefill)} prefill ({p_up} up), {decode} decode ({d_up} up)"
    else:
        fleet = f"{len(workers)} workers ({up} up)"
    return (
        f"mode {mode}, {fleet}, block_size {config.block_size}, "
        f"model {server.pool.model!r}, tokenizer {server.tokenizer.name}, {events}"
    )
