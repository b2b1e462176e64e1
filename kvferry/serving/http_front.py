"""What every kvferry HTTP server (``serve mock``, ``serve router``) does around its handlers and
its connections.

One :class:`HttpFront` per server holds the shared rules:

- **Auth and errors** (:meth:`HttpFront.middleware`): a Bearer token on every path but
  ``/health`` when a token is set (compared in constant time), OpenAI-style JSON errors for
  :class:`~kvferry.serving.mock.openai_api.HttpError` and for aiohttp's own 404/405/413, a 500 for
  this request only when a handler has a bug, and a count of responses per (path, status).
- **Slow clients** (the section's :class:`~kvferry.config.models.HttpFrontConfig` keys): a
  connection must deliver its request's headers within ``header_timeout`` seconds (from
  connecting, or from the first byte of a later request on a kept-alive connection), and at
  most ``max_pending_connections`` (``max_pending_per_address`` per client address) may be
  waiting for theirs at once: past that the longest waiting is closed, so a newcomer always
  gets in (:class:`~kvferry.admission.PendingConnections`). aiohttp has neither: its only clock
  before a request is the keep-alive timer (3630 s by default), which bytes trickled one at a
  time do not restart, so it is set to ``idle_timeout`` and this module adds the rest by
  wrapping each connection's protocol. A body must arrive within ``body_timeout`` (408) and
  be at most ``max_body_size`` bytes (413); both errors name the key and close the
  connection. A handler is cancelled when its client hangs up (aiohttp's
  ``handler_cancellation``), so an abandoned request stops costing.
- **Malformed HTTP** (a bad request line or header, before any handler or auth): aiohttp answers
  400 and logs a traceback; here it is one warning line per minute with a count of the rest,
  and ``("malformed", 400)`` in the response counts. Header line and count limits are
  aiohttp's (8190 bytes a line, 128 headers).
- **Bodies**: :meth:`HttpFront.read_body`, :func:`decode_json` (400 for a body that is not
  UTF-8, not JSON, or nested too deeply for the decoder), and :func:`off_loop`, which runs the
  CPU-heavy work of a large request (decoding, tokenizing) in a thread so that one huge prompt
  does not stall every other request.

:func:`listen` binds the server's socket (a clear error naming the config keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Collection
from typing import Final, TypeVar, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from kvferry.admission import PendingConnections
from kvferry.config.models import HttpFrontConfig
from kvferry.errors import ConfigError
from kvferry.observe.logs import RateLimitedLog
from kvferry.serving.mock.openai_api import HttpError, bad_request, error_body

__all__ = [
    "OFF_LOOP_BYTES",
    "Handler",
    "HttpFront",
    "bearer_authorized",
    "decode_json",
    "error_response",
    "listen",
    "off_loop",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OFF_LOOP_BYTES: Final = 256 << 10
"""Requests with a body larger than this are decoded and tokenized in a thread (below it the
hop to a thread costs more than the work)."""

SHUTDOWN_TIMEOUT_S: Final = 5.0
"""Seconds running handlers get to finish when the server stops."""

_T = TypeVar("_T")


def connections_closed(prefix: str, section: str, pending: PendingConnections) -> Metric:
    """``<prefix>http_connections_closed_total{reason}``: connections a front closed before
    they sent a complete request (``header_timeout``, ``too_many_waiting``)."""
    closed = CounterMetricFamily(
        prefix + "http_connections_closed",
        f"Connections closed before sending a complete request: past {section}.header_timeout, "
        "or the longest waiting while too many waited.",
        labels=["reason"],
    )
    closed.add_metric(["header_timeout"], pending.timed_out)
    closed.add_metric(["too_many_waiting"], pending.evicted)
    return closed


def listen(host: str, port: int, section: str) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when ``host`` has a colon).

    Raises:
        ConfigError: it cannot be bound; names ``<section>.port`` and ``<section>.bind_address``.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as e:
        raise ConfigError(
            f"{section} server cannot listen on {host}:{port}: {e.strerror or e}; choose another "
            f"{section}.port (0 picks a free one) or {section}.bind_address"
        ) from e


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    """An OpenAI-style error body with ``status`` (and the auth challenge on a 401)."""
    headers = {"WWW-Authenticate": 'Bearer realm="kvferry"'} if status == 401 else None
    return web.json_response(error_body(status, message, param), status=status, headers=headers)


def bearer_authorized(request: web.Request, token: bytes | None) -> bool:
    """True when no token is required or the request's ``Authorization: Bearer`` matches it."""
    if token is None:
        return True
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return False
    # compare_digest: the time taken does not reveal how much of the token matched.
    return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), token)


def decode_json(raw: bytes) -> object:
    """A request body decoded as JSON.

    Raises:
        HttpError: 400 when it is not UTF-8, not JSON, or nested too deeply to decode.
    """
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not UTF-8: {e}") from e
    except RecursionError as e:  # the decoder recurses once per level of [ or {
        raise bad_request(
            "the request body is JSON nested too deeply (over about 1000 levels of [ or {)"
        ) from e
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from e


async def off_loop(nbytes: int, fn: Callable[..., _T], *args: object) -> _T:
    """``fn(*args)``, in the loop's default executor when the request is over
    :data:`OFF_LOOP_BYTES` (``nbytes``), else right here."""
    if nbytes <= OFF_LOOP_BYTES:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class _Connection(asyncio.Protocol):
    """One client connection: aiohttp's protocol, wrapped to tell the front when a request
    starts arriving (it then waits for its headers) and to close it."""

    def __init__(self, front: HttpFront, inner: asyncio.Protocol) -> None:
        self._front = front
        self._inner = inner
        self.transport: asyncio.Transport | None = None
        self.address = ""
        self.idle = False
        """Between requests: the next byte starts the next request's header clock."""
        self._waiting = False
        self._tail = b""  # the last bytes seen while waiting: "\r\n\r\n" may straddle chunks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream server's transport
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else "unknown"
        self._waiting = True
        self._front._connected(self)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.idle:
            self.idle = False
            self._waiting = True
            self._tail = b""
            self._front.pending.waiting(self, self.address, self.close)
        if self._waiting:
            # The end of the headers, seen as the bytes come (not when the handler starts,
            # which a busy loop may delay): the request has arrived.
            if b"\r\n\r\n" in data or b"\r\n\r\n" in self._tail + data[:3]:
                self.arrived()
            else:
                self._tail = (self._tail + data[-3:])[-3:]
        self._inner.data_received(data)

    def arrived(self) -> None:
        """Its request's headers are in."""
        self._waiting = False
        self._front.pending.arrived(self)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._front._disconnected(self)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _MalformedLog(logging.Logger):
    """The logger aiohttp's protocol writes to: a request aiohttp could not parse (bad request
    line, header, size) is one throttled line and a count; anything else goes to ``target``
    unchanged (a traceback there is a bug)."""

    def __init__(self, front: HttpFront, target: logging.Logger) -> None:
        super().__init__(target.name + ".http", logging.DEBUG)
        self._front = front
        self._target = target

    def handle(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            self._front._malformed(record, error)
        elif self._target.isEnabledFor(record.levelno):
            self._target.handle(record)


class HttpFront:
    """The rules around one server's handlers and connections (module docstring).

    Args:
        name: the server's name in log lines ("mock server", "router").
        section: its config section, named in error messages ("mock", "router").
        config: its limits (the section's config).
        token: the shared bearer token, or None for no auth.
        paths: the paths counted by name; any other path is counted as "other".
        log: where its lines go.
    """

    def __init__(
        self,
        name: str,
        section: str,
        config: HttpFrontConfig,
        token: bytes | None,
        paths: Collection[str],
        log: logging.Logger,
    ) -> None:
        self.name = name
        self.section = section
        self.config = config
        self.responses: dict[tuple[str, int], int] = {}
        """(path, status) -> responses; path is "malformed" for requests aiohttp refused."""
        self.pending = PendingConnections(
            config.header_timeout, config.max_pending_connections, config.max_pending_per_address
        )
        self._token = token
        self._paths = paths
        self._log = log
        # What clients provoke: one line a minute of each kind (the counts have them all).
        self._peer_log = RateLimitedLog(log, interval=60.0, burst=1)
        self._connections: dict[asyncio.BaseTransport, _Connection] = {}
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # --- serving ---

    async def start(self, app: web.Application, sock: socket.socket) -> tuple[str, int]:
        """Serve ``app`` on ``sock``; returns the address bound. The socket is closed if
        serving cannot start."""
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            keepalive_timeout=self.config.idle_timeout,
            handler_cancellation=True,
            logger=_MalformedLog(self, self._log),
        )
        self._runner = runner
        try:
            await runner.setup()
            protocols = runner.server
            if protocols is None:  # pragma: no cover - set by setup()
                raise RuntimeError("aiohttp's runner has no server after setup")
            loop = asyncio.get_running_loop()
            # Our own asyncio server instead of a web.SockSite: each connection's protocol is
            # aiohttp's, wrapped; runner.cleanup() still closes the connections (it knows them).
            self._server = await loop.create_server(
                lambda: _Connection(self, protocols()), sock=sock, backlog=1024
            )
        except BaseException:
            sock.close()
            await self.close()
            raise
        self._sweeper = asyncio.create_task(self._sweep(), name=f"kvferry-{self.section}-sweep")
        bound = sock.getsockname()
        return str(bound[0]), int(bound[1])

    async def close(self) -> None:
        """Stop accepting, end the connections (running handlers get a few seconds); idempotent."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        server, self._server = self._server, None
        if server is not None:
            server.close()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if server is not None:
            await server.wait_closed()

    async def _sweep(self) -> None:
        pending = self.pending
        while True:
            await asyncio.sleep(pending.sweep_interval)
            before = pending.timed_out + pending.evicted
            pending.sweep()
            if pending.timed_out + pending.evicted > before:
                self._peer_log.warning(
                    "slow",
                    "%s",
                    f"{self.name}: closed connections that sent no complete request: "
                    f"{pending.timed_out} in all past {self.section}.header_timeout "
                    f"({self.config.header_timeout:g} s), {pending.evicted} that waited longest "
                    f"while over {self.section}.max_pending_connections "
                    f"({self.config.max_pending_connections}) or "
                    f"{self.section}.max_pending_per_address "
                    f"({self.config.max_pending_per_address})",
                )

    def _connected(self, conn: _Connection) -> None:
        if conn.transport is not None:
            self._connections[conn.transport] = conn
        self.pending.waiting(conn, conn.address, conn.close)

    def _disconnected(self, conn: _Connection) -> None:
        if conn.transport is not None:
            self._connections.pop(conn.transport, None)
        self.pending.closed(conn)

    def _malformed(self, record: logging.LogRecord, error: HttpProcessingError) -> None:
        key = ("malformed", error.code or 400)
        self.responses[key] = self.responses.get(key, 0) + 1
        client = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        reason = " ".join(str(error.message or error).split())[:200]
        self._peer_log.warning(
            "malformed",
            "%s",
            f"{self.name}: malformed HTTP request from {client}: {reason}; answered "
            f"{error.code or 400}",
        )

    # --- requests ---

    def middleware(self) -> Middleware:
        """The middleware of the rules (module docstring)."""
        token, paths, responses, front = self._token, self._paths, self.responses, self

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            conn = front._connections.get(request.transport) if request.transport else None
            if conn is not None:
                conn.arrived()  # (usually noticed already, from the bytes)
            path = request.path if request.path in paths else "other"
            response: web.StreamResponse
            try:
                if (
                    token is not None
                    and path != "/health"
                    and not bearer_authorized(request, token)
                ):
                    response = error_response(
                        401, "missing or wrong API key: send Authorization: Bearer <token>"
                    )
                else:
                    response = await handler(request)
            except HttpError as e:
                response = error_response(e.status, e.message, e.param)
            except web.HTTPException as e:  # aiohttp's own: unknown path, wrong method, too large
                message = e.text or e.reason
                if e.status == 404:
                    message = f"{request.method} {request.path} not found"
                elif e.status == 405:
                    message = f"{request.method} is not allowed on {request.path}"
                elif e.status == 413:
                    message = front.too_large(request.content_length).message
                response = error_response(e.status, message)
            except (asyncio.CancelledError, ConnectionError):
                raise
            except Exception as e:  # isolation boundary: a bug is a 500 for this request only
                front._log.exception("%s: %s %s failed", front.name, request.method, request.path)
                response = error_response(500, f"internal error: {type(e).__name__}: {e}")
            finally:
                if conn is not None:
                    conn.idle = True
            if response.status in (408, 413):  # the rest of the body is not worth reading
                response.force_close()
            key = (path, response.status)
            responses[key] = responses.get(key, 0) + 1
            return response

        return middleware

    def too_large(self, size: int | None) -> HttpError:
        """The 413 of a body over ``max_body_size`` (of ``size`` bytes, if known)."""
        limit = self.config.max_body_size
        what = f"{size} bytes" if size is not None else "larger"
        return HttpError(
            413,
            f"the request body is {what}; {self.section}.max_body_size is {limit} bytes",
        )

    async def read_body(self, request: web.Request) -> bytes:
        """The request's body, within the limits.

        Raises:
            HttpError: 413 over ``max_body_size``, 408 slower than ``body_timeout``; both
                name the key.
        """
        size = request.content_length
        if size is not None and size > self.config.max_body_size:
            raise self.too_large(size)
        try:
            return await asyncio.wait_for(request.read(), self.config.body_timeout)
        except TimeoutError as e:
            raise HttpError(
                408,
                f"the request body did not arrive within {self.section}.body_timeout "
                f"({self.config.body_timeout:g} s)",
            ) from e
