"""Prometheus exporter: store and transfer statistics as ``/metrics``, plus a ``/health`` probe.

Owns a small HTTP server that serves the metric families :mod:`kvferry.telemetry.families`
builds (the names and their meaning are listed there), and :func:`export_store`, the one way an
entry point (``kvferry serve store``, the vLLM connector, a Python user) starts an exporter over a
store from ``store.metrics_port``. It reads statistics only through the functions it was given
(``add_source``); it never holds a store or an engine and never changes what it reads. The store
starts no exporter itself: it sits below this layer.

Translation happens at scrape time in a custom collector, registered in a registry of its own
(never prometheus_client's global default registry, so two exporters in one process and the
library's own process metrics never collide).

A source whose function raises is an isolation boundary: its metrics are left out of that scrape,
``source_up`` reads 0, the error is counted and logged, and the other sources are still served.

HTTP: a standard-library ``ThreadingHTTPServer`` in a daemon thread, bound to 127.0.0.1 unless
told otherwise. ``GET /metrics`` answers the text exposition format, ``GET /health`` answers
``{"status": "ok", ...}``; with ``auth_token`` set both require ``Authorization: Bearer <token>``
and answer 401 otherwise. Anything else is 404. Each connection is a thread and one request
(HTTP/1.0), so slow clients are cut off (:class:`~kvferry.admission.PendingConnections`): a
request's headers must arrive within ``header_timeout`` seconds of connecting, whatever was
trickled meanwhile, and past ``max_pending`` connections waiting for theirs
(``max_pending_per_address`` from one address) the one waiting longest is closed, so a scraper
always gets in.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

from kvferry.admission import PendingConnections
from kvferry.errors import ConfigError
from kvferry.observe.logs import RateLimitedLog
from kvferry.store.stats import StoreStats
from kvferry.telemetry.families import (
    PREFIX,
    BuildInfoCollector,
    Families,
    Source,
    TransferSnapshot,
    add_store,
    add_transfer,
    build_info,
    histogram_buckets,
)

if TYPE_CHECKING:
    from kvferry.config.models import KvferryConfig
    from kvferry.store.tiered import TieredStore

__all__ = [
    "PREFIX",
    "MetricsExporter",
    "Source",
    "TransferSnapshot",
    "build_info",
    "export_store",
    "histogram_buckets",
]

log = logging.getLogger("kvferry.telemetry.prometheus")


class _SourcesCollector:
    """Reads every source at scrape time and yields its metric families."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterable[Metric]:
        out = Families()
        up: list[tuple[str, float]] = []
        for name, fn in self._exporter.sources():
            # Each source into its own _Families first: a source that fails half-way must not
            # leave half of its samples in the scrape.
            mine = Families()
            try:
                value = fn()
                if isinstance(value, StoreStats):
                    add_store(mine, name, value)
                elif isinstance(value, Mapping):
                    add_transfer(mine, name, value)
                else:
                    raise TypeError(
                        f"returned {type(value).__name__}; expected StoreStats or a "
                        "MetricSet.snapshot() dict"
                    )
            except Exception as e:  # isolation boundary: one bad source, the others still served
                self._exporter._source_failed(name, e)
                up.append((name, 0.0))
                continue
            up.append((name, 1.0))
            out.merge(mine)
        errors = self._exporter.source_errors()
        for name, ok in up:
            labels = {"source": name}
            out.gauge("exporter_source_up", "1 if the source was read by this scrape.", labels, ok)
            out.counter(
                "exporter_source_errors",
                "Scrapes in which reading the source failed.",
                labels,
                errors.get(name, 0),
            )
        return out.metrics()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog (socketserver's default is 5)
    exporter: MetricsExporter

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        # Waiting for its request from now on; evicted or timed out by shutting it down, which
        # ends the handler thread's blocked read.
        if isinstance(request, socket.socket):
            sock = request
            host = client_address[0] if isinstance(client_address, tuple) else "unknown"
            self.exporter.pending.waiting(sock, str(host), lambda: _shut(sock))
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        self.exporter.pending.closed(request)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        # Called by serve_forever at every poll (0.2 s): close the slow connections.
        self.exporter._sweep()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10.0  # a client that stalls mid-request cannot hold a thread for long
    server_version = "kvferry-metrics"

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the headers
        # The request line and headers are in (or refused): it waits no more.
        self.server.exporter.pending.arrived(self.request)
        return parsed

    def do_GET(self) -> None:
        exporter = self.server.exporter
        if not exporter._authorized(self.headers.get("Authorization")):
            self._reply(
                401,
                b'{"error": "unauthorized"}',
                "application/json",
                {"WWW-Authenticate": 'Bearer realm="kvferry"'},
            )
            return
        path = urlsplit(self.path).path
        try:
            if path == "/metrics":
                self._reply(200, exporter.render(), CONTENT_TYPE_LATEST)
            elif path == "/health":
                self._reply(200, json.dumps(exporter.health()).encode(), "application/json")
            else:
                self._reply(404, b'{"error": "not found"}', "application/json")
        except Exception as e:  # isolation boundary: a failed scrape is a 500, not a dead server
            log.exception("metrics exporter: %s failed", path)
            body = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
            self._reply(500, body, "application/json")

    def _reply(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Scrapes every few seconds would flood stderr; keep them at debug level.
        log.debug("metrics exporter %s: " + format, self.address_string(), *args)


class MetricsExporter:
    """Serves the registered sources as Prometheus metrics (see the module docstring).

    Args:
        bind: address to listen on; 127.0.0.1 by default (use 0.0.0.0 or :: deliberately).
        port: TCP port; 0 picks a free one (``start()`` says which).
        auth_token: when set, both endpoints require ``Authorization: Bearer <token>``.
        header_timeout: seconds a connection has to send its request's headers.
        max_pending: connections that may wait for their request at once; past it the one
            waiting longest (1 s or more) is closed.
        max_pending_per_address: the same bound per client address.

    Raises:
        ConfigError: ``bind``, ``port``, ``auth_token`` or a limit is invalid.
    """

    def __init__(
        self,
        bind: str = "127.0.0.1",
        port: int = 0,
        *,
        auth_token: str | None = None,
        header_timeout: float = 5.0,
        max_pending: int = 64,
        max_pending_per_address: int = 16,
    ) -> None:
        if not isinstance(bind, str) or not bind.strip() or bind != bind.strip():
            raise ConfigError(
                f"metrics bind address {bind!r} is invalid; give a host name or an IP address "
                "such as 127.0.0.1"
            )
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(
                f"metrics port {port!r} is invalid; it must be an integer in 0..65535 "
                "(0 = pick a free port)"
            )
        if auth_token is not None and (not isinstance(auth_token, str) or not auth_token):
            raise ConfigError(
                "metrics auth_token is empty; give a non-empty token, or None for no auth"
            )
        try:
            self.pending = PendingConnections(header_timeout, max_pending, max_pending_per_address)
            """Connections waiting for their request (slow-client bookkeeping and counts)."""
        except ValueError as e:
            raise ConfigError(f"metrics exporter: {e}") from e
        self._slow_log = RateLimitedLog(log, interval=60.0, burst=1)
        self._closed_slow = 0
        self.bind = bind
        self.port = port
        self._token = auth_token.encode() if auth_token is not None else None
        self._lock = threading.Lock()
        self._sources: dict[str, Source] = {}
        self._errors: dict[str, int] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._started_at = time.monotonic()
        self.registry = CollectorRegistry(auto_describe=False)
        """This exporter's own registry (never the global default one)."""
        self.registry.register(_SourcesCollector(self))
        self.registry.register(BuildInfoCollector())
        # process_* (CPU seconds, resident memory, open fds, start time) and python_info
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def add_source(self, name: str, fn: Source) -> None:
        """Serve what ``fn()`` returns at each scrape under the label ``source=name``.

        ``fn`` returns a ``StoreStats`` or a ``MetricSet.snapshot()`` dict; it is called from a
        server thread, once per scrape, and must be thread-safe.

        Raises:
            ConfigError: ``name`` is empty or already registered.
            TypeError: ``fn`` is not callable.
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"metrics source name {name!r} is invalid; give a non-empty name")
        if not callable(fn):
            raise TypeError(f"metrics source {name!r}: {fn!r} is not callable")
        with self._lock:
            if name in self._sources:
                raise ConfigError(f"metrics source {name!r} is already registered")
            self._sources[name] = fn

    def remove_source(self, name: str) -> None:
        """Stop serving a source (no error if it is not registered)."""
        with self._lock:
            self._sources.pop(name, None)
            self._errors.pop(name, None)

    def sources(self) -> list[tuple[str, Source]]:
        with self._lock:
            return list(self._sources.items())

    def source_errors(self) -> dict[str, int]:
        with self._lock:
            return dict(self._errors)

    def _source_failed(self, name: str, error: Exception) -> None:
        with self._lock:
            self._errors[name] = self._errors.get(name, 0) + 1
        log.warning("metrics source %r failed: %s: %s", name, type(error).__name__, error)

    def _sweep(self) -> None:
        pending = self.pending
        pending.sweep()
        closed = pending.timed_out + pending.evicted
        if closed > self._closed_slow:
            self._closed_slow = closed
            self._slow_log.warning(
                "slow",
                "%s",
                f"metrics exporter: closed connections that sent no complete request: "
                f"{pending.timed_out} in all past the {pending.header_timeout:g} s header "
                f"deadline, {pending.evicted} that waited longest while over "
                f"{pending.max_pending} waiting ({pending.max_per_address} per address)",
            )

    def _authorized(self, header: str | None) -> bool:
        if self._token is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        # compare_digest: the time taken does not reveal how much of the token matched.
        return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), self._token)

    def render(self) -> bytes:
        """The text exposition of every source now (what ``GET /metrics`` answers)."""
        return generate_latest(self.registry)

    def health(self) -> dict[str, object]:
        """What ``GET /health`` answers."""
        return {
            "status": "ok",
            "sources": [name for name, _ in self.sources()],
            "uptime_s": round(time.monotonic() - self._started_at, 3),
        }

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) being served, or None before ``start()`` / after ``close()``."""
        server = self._server
        if server is None:
            return None
        host, port = server.server_address[:2]
        return str(host), int(port)

    def start(self) -> tuple[str, int]:
        """Listen and serve in a daemon thread; returns the (host, port) actually bound.

        Raises:
            ConfigError: the address cannot be bound (in use, not local, not resolvable).
            RuntimeError: the exporter is already started.
        """
        with self._lock:
            if self._server is not None:
                raise RuntimeError("metrics exporter is already started")
            cls = _Server6 if ":" in self.bind else _Server
            try:
                server = cls((self.bind, self.port), _Handler)
            except (OSError, OverflowError) as e:
                reason = getattr(e, "strerror", None) or str(e)
                raise ConfigError(
                    f"metrics exporter cannot listen on {self.bind}:{self.port}: {reason}"
                ) from e
            server.exporter = self
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.2},
                name="kvferry-metrics",
                daemon=True,
            )
            self._thread.start()
        address = self.address
        if address is None:  # closed by another thread between the two locks
            raise RuntimeError("metrics exporter was closed while starting")
        log.info("metrics exporter serving on http://%s:%d/metrics", *address)
        return address

    def close(self) -> None:
        """Stop serving and free the port; idempotent."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> MetricsExporter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def export_store(
    store: TieredStore,
    config: KvferryConfig | None = None,
    *,
    transfer: Callable[[], TransferSnapshot] | None = None,
) -> MetricsExporter | None:
    """Serve ``store``'s statistics on ``store.metrics_port`` (source ``store``), closed with
    the store; None when the port is 0 (no exporter).

    The one helper every entry point that runs a store calls (``kvferry serve store``, the vLLM
    connector, a Python user): the store itself starts no exporter.

    Args:
        store: the store whose ``stats`` are served.
        config: where ``store.metrics_port`` and ``listen`` (bind address, token) are read;
            None: the store's own config.
        transfer: a transfer engine's ``metrics`` (``MetricSet.snapshot``), served as source
            ``transfer`` (a store server's).

    Raises:
        ConfigError: the port cannot be bound.
        StorageError: the store is closed.
    """
    cfg = store.config if config is None else config
    port = cfg.store.metrics_port
    if not port:
        return None
    token = cfg.listen.auth_token
    exporter = MetricsExporter(
        cfg.listen.bind_address,
        port,
        auth_token=token.get_secret_value() if token is not None else None,
    )
    exporter.add_source("store", store.stats)
    if transfer is not None:
        exporter.add_source("transfer", transfer)
    exporter.start()
    try:
        store.attach(exporter)
    except BaseException:
        exporter.close()
        raise
    return exporter
