"""Prometheus exporter: store and transfer statistics as ``/metrics``, plus a ``/health`` probe.

Owns the translation from kvferry's own statistics (``StoreStats`` of a tiered store, the
``MetricSet.snapshot()`` dict of a transfer engine) into Prometheus metric families, and a small
HTTP server that serves them. It reads statistics only through the functions it was given
(``add_source``); it never holds a store or an engine and never changes what it reads.

Translation happens at scrape time in a custom collector, registered in a registry of its own
(never prometheus_client's global default registry, so two exporters in one process and the
library's own process metrics never collide). Every kvferry metric is prefixed ``kvferry_``;
those read from a source carry a ``source`` label (the name given to ``add_source``); tier
metrics add ``tier``, transfer metrics add ``transport``. Latency histograms become Prometheus
histograms whose ``le`` bounds are the power-of-two microsecond bounds of
:class:`~kvferry.observe.counters.LatencyHistogram`, in seconds.

Names follow Prometheus' conventions: base units (bytes, seconds), counters end in ``_total``,
and no ratio or speed is exported, because a lifetime average cannot be windowed: a hit rate is
``rate(kvferry_store_hit_blocks_total[5m]) / rate(kvferry_store_lookup_blocks_total[5m])``, a
tier's load speed ``rate(kvferry_tier_bytes_out_total[5m])`` (``docs/grafana/kvferry.json`` has
these and more). Metric names and their meaning:

- store (every request the store serves, its own calls and a store server's, see
  :mod:`kvferry.store.stats`): ``kvferry_store_{lookups,lookup_blocks,hit_blocks,
  lookup_hit_fractions,puts,put_blocks,gets,get_blocks,get_hit_blocks,leases_expired}_total``,
  ``kvferry_store_leases_active`` (gauge), ``kvferry_store_{lookup,get,put}_latency_seconds``
  (histograms);
- tier traffic: ``kvferry_tier_{lookup_blocks,hit_blocks,blocks_in,blocks_out,bytes_in,bytes_out,
  save_seconds,load_seconds,evictions,demotions,dropped_blocks,promotions,no_space_blocks,errors,
  corrupt_blocks,breaker_skipped_calls,breaker_opens,breaker_closes}_total``,
  ``kvferry_tier_breaker_open`` (gauge; 1 while a shared tier's circuit breaker is open);
- tier usage: ``kvferry_tier_{used,total,peak}_blocks``, ``kvferry_tier_{used,total}_bytes``
  (gauges; ``total_*`` absent for tiers without a fixed capacity), and what a tier reports of its
  own, each where that tier has it: ``kvferry_tier_{reserved_blocks,guarded_slots}`` (cpu),
  ``kvferry_tier_{direct_io,recovered_blocks}`` (disk), ``kvferry_tier_servers`` (server)
  (gauges), ``kvferry_tier_dropped_corrupt_blocks_total`` (cpu, disk, server),
  ``kvferry_tier_foreign_blocks_total`` (redis), ``kvferry_tier_dropped_reads_total`` (mooncake);
- transfer: ``kvferry_transfer_{bytes_read,bytes_written,requests,slices,errors,retries,
  protocol_errors,timeouts,evicted}_total``, ``kvferry_transfer_latency_seconds`` (histogram);
- the exporter itself: ``kvferry_exporter_source_up`` (1 when the last scrape read the source),
  ``kvferry_exporter_source_errors_total``, ``kvferry_build_info{version,python,commit}``
  (always 1), and prometheus_client's ``process_*`` and ``python_info``.

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
import functools
import hmac
import json
import logging
import platform
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar, cast
from urllib.parse import urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from kvferry.admission import PendingConnections
from kvferry.errors import ConfigError
from kvferry.observe.counters import LatencyHistogram
from kvferry.observe.logs import RateLimitedLog
from kvferry.store.stats import StoreStats, TierCounters

log = logging.getLogger("kvferry.telemetry.prometheus")

TransferSnapshot = Mapping[str, Mapping[str, object]]
"""``MetricSet.snapshot()``: transport name -> ``TransportCounters.snapshot()``."""

Source = Callable[[], StoreStats | TransferSnapshot]
"""What ``add_source`` takes: a function returning a fresh snapshot at each scrape."""

PREFIX: Final = "kvferry_"

# The library's own formatting of "le" values (untyped upstream, hence the cast).
_le = cast(Callable[[float], str], floatToGoString)

# (field of StoreStats, metric stem, help) for the store's monotonic counters.
_STORE_COUNTERS: Final = (
    ("lookups", "lookups", "lookup() calls."),
    ("lookup_blocks", "lookup_blocks", "Blocks asked for by lookups."),
    ("hit_blocks", "hit_blocks", "Leading blocks found by lookups."),
    ("puts", "puts", "Store (put) calls."),
    ("put_blocks", "put_blocks", "Blocks offered to store calls."),
    ("gets", "gets", "Load (get) calls."),
    ("get_blocks", "get_blocks", "Blocks asked for by load calls."),
    ("get_hit_blocks", "get_hit_blocks", "Blocks load calls found."),
    ("leases_expired", "leases_expired", "Pins released because their lease ran out."),
    (
        "request_hit_fraction_sum",
        "lookup_hit_fractions",
        "Sum over lookups of each one's hit fraction; over lookups_total, the per-request mean "
        "hit rate (aiperf's definition).",
    ),
)

_LATENCY_DOCS: Final = {
    "lookup": "Seconds from a lookup's start to its answer.",
    "get": "Seconds from a load's start to its answer (views lent or bytes copied).",
    "put": "Seconds from a store call's start to its blocks being published.",
}

# (field of TierCounters, metric stem, help) for the per-tier monotonic counters.
_TIER_COUNTERS: Final = (
    ("lookups", "lookup_blocks", "Blocks looked up in the tier."),
    ("hits", "hit_blocks", "Blocks found in the tier (at the first tier that had them)."),
    ("blocks_in", "blocks_in", "Blocks stored into the tier."),
    ("blocks_out", "blocks_out", "Blocks read out of the tier."),
    ("bytes_in", "bytes_in", "Bytes stored into the tier (puts, promotions, demotions)."),
    ("bytes_out", "bytes_out", "Bytes read out of the tier."),
    ("save_seconds", "save_seconds", "Seconds spent storing into the tier."),
    ("load_seconds", "load_seconds", "Seconds spent reading out of the tier."),
    ("evictions", "evictions", "Blocks evicted from the tier (demoted or dropped)."),
    ("demotions", "demotions", "Evicted blocks that moved on to the next tier."),
    ("dropped", "dropped_blocks", "Evicted blocks lost: the next tier could not take them."),
    ("promotions", "promotions", "Blocks copied into the tier from a lower one."),
    ("no_space", "no_space_blocks", "Blocks a put could not place even after eviction."),
    ("errors", "errors", "Tier calls that failed (counted as misses)."),
    ("breaker_skipped", "breaker_skipped_calls", "Calls skipped while the breaker was open."),
    ("breaker_opens", "breaker_opens", "Times the tier's circuit breaker opened."),
    ("breaker_closes", "breaker_closes", "Times a probe closed the tier's circuit breaker."),
    ("corrupt", "corrupt_blocks", "Blocks that failed their checksum (read as misses)."),
)

# Metric stem -> (a counter?, help): the numbers tiers report in ``TierStats.extra``, each under
# a name of its own.
_TIER_EXTRA: Final = {
    "tier_reserved_blocks": (False, "Slots reserved by writers that have not committed yet."),
    "tier_guarded_slots": (
        False,
        "Slots whose next writer must declare a checksum (an earlier writer vanished).",
    ),
    "tier_dropped_corrupt_blocks": (
        True,
        "Blocks the tier found corrupt (failed checksum, torn write) and dropped; a server "
        "tier counts those it received from a server, which is told to drop them.",
    ),
    "tier_direct_io": (False, "1 when the disk tier uses O_DIRECT, 0 on the page cache."),
    "tier_recovered_blocks": (False, "Blocks the tier found at start (kept over a restart)."),
    "tier_foreign_blocks": (True, "Values under the tier's key prefix that were no block."),
    "tier_servers": (False, "Store servers the server tier spreads blocks over."),
    "tier_dropped_reads": (True, "Reads whose object's lease ran out mid-read (misses)."),
}

# ``TierStats.extra`` key -> metric stem. Keys not here are not exported: a tier's
# configuration (disk io_threads, file_bytes; mooncake segment_bytes, staging_slots; server
# server_slots) or what the store counts itself (redis hits, misses, errors, no_space;
# mooncake no_space_blocks).
_TIER_EXTRA_KEYS: Final = {
    "reserved": "tier_reserved_blocks",  # cpu
    "guarded_slots": "tier_guarded_slots",  # cpu
    "corrupt_dropped": "tier_dropped_corrupt_blocks",  # cpu, disk
    "corrupt": "tier_dropped_corrupt_blocks",  # server
    "direct_io": "tier_direct_io",  # disk
    "recovered_blocks": "tier_recovered_blocks",  # disk
    "foreign": "tier_foreign_blocks",  # redis
    "servers": "tier_servers",  # server
    "dropped_reads": "tier_dropped_reads",  # mooncake
}

# (key of TransportCounters.snapshot(), help) for the transfer counters.
_TRANSFER_COUNTERS: Final = (
    ("bytes_read", "Bytes moved by READ requests."),
    ("bytes_written", "Bytes moved by WRITE requests."),
    ("requests", "Transfer requests completed."),
    ("slices", "Slices the requests were cut into."),
    ("errors", "Requests that failed."),
    ("retries", "Slices retried."),
    ("protocol_errors", "Malformed or unauthorised frames seen."),
    ("timeouts", "Connections closed by a handshake deadline or an idle or stall timeout."),
    ("evicted", "Connections dropped in their handshake for a newer one (listener full)."),
)


def histogram_buckets(bounds_us: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets, ``le`` in seconds, from per-bucket microsecond counts.

    ``counts`` has one more entry than ``bounds_us``: the last is the overflow (``+Inf``)
    bucket. A :class:`LatencyHistogram` bucket ``i`` only holds values below
    ``bounds_us[i]``, so ``le = bounds_us[i]`` is a true upper bound.

    Raises:
        ValueError: the lengths do not match.
    """
    if len(counts) != len(bounds_us) + 1:
        raise ValueError(
            f"histogram has {len(counts)} counts for {len(bounds_us)} bounds; "
            "expected one more count than bounds (the +Inf bucket)"
        )
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound_us, n in zip(bounds_us, counts[:-1]):
        total += n
        buckets.append((_le(bound_us / 1e6), float(total)))
    total += counts[-1]
    buckets.append(("+Inf", float(total)))
    return buckets


_F = TypeVar("_F", CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)


class _Families:
    """Metric families of one scrape, created on first use and filled across sources."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def _get(self, kind: type[_F], stem: str, doc: str, labels: dict[str, str]) -> _F:
        family = self._families.get(stem)
        if family is None:
            family = self._families[stem] = kind(PREFIX + stem, doc, labels=list(labels))
        if not isinstance(family, kind):  # a stem used for two kinds: a bug in this module
            raise TypeError(f"metric {PREFIX + stem} is a {family.type}, not a {kind.__name__}")
        return family

    def counter(self, stem: str, doc: str, labels: dict[str, str], value: float) -> None:
        family = self._get(CounterMetricFamily, stem, doc, labels)
        family.add_metric(list(labels.values()), value)

    def gauge(self, stem: str, doc: str, labels: dict[str, str], value: float) -> None:
        family = self._get(GaugeMetricFamily, stem, doc, labels)
        family.add_metric(list(labels.values()), value)

    def histogram(
        self,
        stem: str,
        doc: str,
        labels: dict[str, str],
        bounds_us: Sequence[float],
        counts: Sequence[int],
        sum_us: float,
    ) -> None:
        buckets = histogram_buckets(bounds_us, counts)
        family = self._get(HistogramMetricFamily, stem, doc, labels)
        family.add_metric(list(labels.values()), buckets, sum_us / 1e6)

    def latency(self, stem: str, doc: str, labels: dict[str, str], h: LatencyHistogram) -> None:
        snap = h.snapshot()
        self.histogram(
            stem,
            doc,
            labels,
            _floats(snap["bounds_us"], "bounds_us"),
            _ints(snap["counts"], "counts"),
            _number(snap["sum_us"], "sum_us"),
        )

    def merge(self, other: _Families) -> None:
        """Add the samples of ``other`` (another source's families) to these."""
        for stem, family in other._families.items():
            mine = self._families.get(stem)
            if mine is None:
                self._families[stem] = family
            else:
                mine.samples.extend(family.samples)

    def metrics(self) -> list[Metric]:
        return list(self._families.values())


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} is {type(value).__name__}, expected a number")
    return float(value)


def _floats(value: object, what: str) -> list[float]:
    if not isinstance(value, list | tuple):
        raise TypeError(f"{what} is {type(value).__name__}, expected a list of numbers")
    return [_number(v, what) for v in value]


def _ints(value: object, what: str) -> list[int]:
    return [int(v) for v in _floats(value, what)]


def _add_store(out: _Families, source: str, stats: StoreStats) -> None:
    labels = {"source": source}
    for field, stem, doc in _STORE_COUNTERS:
        out.counter(f"store_{stem}", doc, labels, getattr(stats, field))
    out.gauge("store_leases_active", "Pins held now.", labels, stats.leases_active)
    for kind, h in (
        ("lookup", stats.lookup_latency),
        ("get", stats.get_latency),
        ("put", stats.put_latency),
    ):
        out.latency(f"store_{kind}_latency_seconds", _LATENCY_DOCS[kind], labels, h)
    for tier, counters in stats.tiers.items():
        _add_tier_counters(out, {"source": source, "tier": tier}, counters)
    for tier, usage in stats.usage.items():
        tl = {"source": source, "tier": tier}
        out.gauge("tier_used_blocks", "Blocks stored in the tier now.", tl, usage.used_blocks)
        out.gauge("tier_peak_blocks", "Most blocks the tier has held.", tl, usage.peak_blocks)
        if usage.total_blocks is not None:
            out.gauge("tier_total_blocks", "Block capacity of the tier.", tl, usage.total_blocks)
        out.gauge("tier_used_bytes", "Bytes stored in the tier now.", tl, usage.used_bytes)
        if usage.total_bytes is not None:
            out.gauge("tier_total_bytes", "Byte capacity of the tier.", tl, usage.total_bytes)
        for key, value in usage.extra.items():
            own = _TIER_EXTRA_KEYS.get(key)
            if own is None:
                continue  # configuration, or a count the store keeps itself (see the table)
            counter, doc = _TIER_EXTRA[own]
            if counter:
                out.counter(own, doc, tl, value)
            else:
                out.gauge(own, doc, tl, value)


def _add_tier_counters(out: _Families, labels: dict[str, str], t: TierCounters) -> None:
    for field, stem, doc in _TIER_COUNTERS:
        out.counter(f"tier_{stem}", doc, labels, getattr(t, field))
    out.gauge(
        "tier_breaker_open", "1 while the tier's circuit breaker is open.", labels, t.breaker_open
    )


def _add_transfer(out: _Families, source: str, snapshot: TransferSnapshot) -> None:
    for transport, counters in snapshot.items():
        labels = {"source": source, "transport": str(transport)}
        for key, doc in _TRANSFER_COUNTERS:
            if key in counters:
                out.counter(f"transfer_{key}", doc, labels, _number(counters[key], key))
        latency = counters.get("latency")
        if isinstance(latency, Mapping):
            out.histogram(
                "transfer_latency_seconds",
                "Latency of transfer requests.",
                labels,
                _floats(latency.get("bounds_us"), "latency.bounds_us"),
                _ints(latency.get("counts"), "latency.counts"),
                _number(latency.get("sum_us", 0.0), "latency.sum_us"),
            )


@functools.cache
def build_info() -> dict[str, str]:
    """``kvferry_build_info``'s labels: kvferry's version, Python's, and the git commit of the
    checkout kvferry runs from ("unknown" when it is not one, e.g. an installed wheel).

    Asks git once per process, at the first exporter built (never at import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        kvferry_version = version("kvferry")
    except PackageNotFoundError:  # a checkout on sys.path, not installed
        from kvferry.version import __version__ as kvferry_version
    return {
        "version": kvferry_version,
        "python": platform.python_version(),
        "commit": _git_commit(Path(__file__).resolve().parents[2]),
    }


def _git_commit(root: Path) -> str:
    if not (root / ".git").exists():
        return "unknown"
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return "unknown"
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else "unknown"


class _BuildInfoCollector:
    """``kvferry_build_info``: always 1, the build in its labels (``build_info``)."""

    def __init__(self) -> None:
        self._labels = build_info()

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            PREFIX + "build_info",
            "kvferry's version, Python's version and the git commit (always 1).",
            labels=list(self._labels),
        )
        family.add_metric(list(self._labels.values()), 1.0)
        return [family]


class _SourcesCollector:
    """Reads every source at scrape time and yields its metric families."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterable[Metric]:
        out = _Families()
        up: list[tuple[str, float]] = []
        for name, fn in self._exporter.sources():
            # Each source into its own _Families first: a source that fails half-way must not
            # leave half of its samples in the scrape.
            mine = _Families()
            try:
                value = fn()
                if isinstance(value, StoreStats):
                    _add_store(mine, name, value)
                elif isinstance(value, Mapping):
                    _add_transfer(mine, name, value)
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
        self.registry.register(_BuildInfoCollector())
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
