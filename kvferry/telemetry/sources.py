"""Where ``kvferry monitor`` reads its numbers: a running store server, or a Prometheus endpoint.

Owns the :class:`MonitorSource` protocol (a name, ``read() -> StoreStats`` of cumulative
counters, ``close()``) and its two implementations, which :class:`~kvferry.telemetry.monitor.
StatsMonitor` turns into interval and cumulative numbers:

- :class:`StoreServerSource`: a store server's STATS call over kvferry's own protocol, made by
  the server tier's client (:class:`~kvferry.backends.server.client.ServerTier`), so the wire,
  the handshake and the token are the ones every client uses;
- :class:`PrometheusSource`: a scrape of a Prometheus text endpoint (``http://host:port/metrics``,
  parsed by ``prometheus_client.parser``), whose known families are mapped onto the same
  counters (:func:`stats_from_metrics`): a store server's ``--metrics-port`` (``kvferry_store_*``,
  ``kvferry_tier_*``), a vLLM server's ``/metrics`` with kvferry's connector (the same
  ``kvferry_store_*`` names, and ``kvferry_connector_*`` as a tier named ``connector``), and the
  router's ``/metrics`` (``kvferry_router_*`` as a tier named ``router``: its hit blocks are the
  router's *predicted* hits).

Both only read; neither changes what it reads. A read that fails raises
:class:`~kvferry.errors.StorageError` naming the source and what to check.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from kvferry.backends.base import TierContext, TierStats
from kvferry.backends.server.client import ServerTier
from kvferry.config.models import ServerTierConfig
from kvferry.errors import ConfigError, ProtocolError, StorageError
from kvferry.store.stats import StoreStats, TierCounters

__all__ = [
    "MonitorSource",
    "PrometheusSource",
    "StoreServerSource",
    "open_source",
    "stats_from_metrics",
]


@runtime_checkable
class MonitorSource(Protocol):
    """Cumulative counters of something running (a store server, a router, a vLLM server).

    ``read`` is called by one thread at a time, once per sample; it may block for up to the
    source's timeout and raises :class:`~kvferry.errors.KvferryError` when the source cannot be
    read (StatsMonitor's caller decides whether that ends monitoring).
    """

    name: str
    """What is read, for the table's title and each JSON line (``store-server 1.2.3.4:5``)."""

    def read(self) -> StoreStats:
        """The counters now (cumulative since the source started)."""
        ...

    def close(self) -> None:
        """Let go of connections; idempotent."""
        ...


class StoreServerSource:
    """A store server's statistics, asked for with its STATS call.

    Args:
        address: the server's ``host:port``.
        auth_token: the server's ``listen.auth_token``, if it has one.
        timeout_s: seconds to connect or to wait for the reply.

    Raises:
        ConfigError: ``address`` is not ``host:port``.
    """

    def __init__(
        self, address: str, *, auth_token: str | None = None, timeout_s: float = 5.0
    ) -> None:
        self.address = address
        self.name = f"store-server {address}"
        config = ServerTierConfig(
            addresses=[address],
            transport="tcp",  # only STATS is called: no block bytes, no shared mapping needed
            auth_token=auth_token,  # pydantic wraps it in SecretStr
            timeout=timeout_s,
        )
        # slot_size is unused by STATS; the client needs one to be built.
        self._client = ServerTier(config, TierContext(slot_size=1))

    def read(self) -> StoreStats:
        docs = self._client.server_stats()
        doc = docs.get(self.address)
        if doc is None:  # one address in, one answer out: anything else is a client bug
            raise StorageError(f"{self.name}: no statistics in the reply")
        try:
            return StoreStats.from_json(doc)
        except ProtocolError as e:
            raise StorageError(f"{self.name}: {e}") from e

    def close(self) -> None:
        self._client.close()


class PrometheusSource:
    """A Prometheus text endpoint, scraped with one GET per read.

    Args:
        url: ``http://host:port/metrics`` (a bare ``http://host:port`` gets ``/metrics``).
        auth_token: sent as ``Authorization: Bearer <token>`` (a store server's exporter with
            ``listen.auth_token`` wants it).
        timeout_s: seconds to connect and to read the answer.

    Raises:
        ConfigError: ``url`` is not an http(s) URL with a host.
    """

    def __init__(self, url: str, *, auth_token: str | None = None, timeout_s: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"monitor source {url!r} is not a URL like http://127.0.0.1:9100/metrics "
                "(or use --store-server HOST:PORT)"
            )
        if parts.path in ("", "/"):
            url = parts._replace(path="/metrics").geturl()
        self.url = url
        self.name = url
        self._token = auth_token
        self._timeout = timeout_s
        self.families_seen: set[str] = set()
        """Known metric families the last read found (empty: the endpoint has none of ours)."""

    def read(self) -> StoreStats:
        request = urllib.request.Request(self.url)
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as answer:
                text = answer.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            hint = " (wrong or missing --auth-token)" if e.code == 401 else ""
            raise StorageError(f"cannot scrape {self.url}: HTTP {e.code} {e.reason}{hint}") from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise StorageError(
                f"cannot scrape {self.url}: {reason}; is the server running and serving "
                "Prometheus metrics there?"
            ) from e
        try:
            stats, seen = stats_from_metrics(text)
        except ValueError as e:
            raise StorageError(f"{self.url} did not answer Prometheus text: {e}") from e
        if not seen:
            raise StorageError(
                f"{self.url} serves no kvferry metrics (kvferry_store_*, kvferry_tier_*, "
                "kvferry_connector_*, kvferry_router_*): point it at a store server's "
                "--metrics-port, the router's or a vLLM server's /metrics"
            )
        self.families_seen = seen
        return stats

    def close(self) -> None:
        pass


# kvferry_store_<stem>_total -> StoreStats field (the connector's store counters share them).
_STORE = {
    "lookups": "lookups",
    "lookup_blocks": "lookup_blocks",
    "hit_blocks": "hit_blocks",
    "lookup_hit_fractions": "request_hit_fraction_sum",
    "puts": "puts",
    "put_blocks": "put_blocks",
    "gets": "gets",
    "get_blocks": "get_blocks",
    "get_hit_blocks": "get_hit_blocks",
    "leases_expired": "leases_expired",
    "leases_active": "leases_active",
}
# kvferry_tier_<stem>[_total]{tier} -> TierCounters field
_TIER = {
    "lookup_blocks": "lookups",
    "hit_blocks": "hits",
    "blocks_in": "blocks_in",
    "blocks_out": "blocks_out",
    "bytes_in": "bytes_in",
    "bytes_out": "bytes_out",
    "save_seconds": "save_seconds",
    "load_seconds": "load_seconds",
    "evictions": "evictions",
    "demotions": "demotions",
    "dropped_blocks": "dropped",
    "promotions": "promotions",
    "no_space_blocks": "no_space",
    "errors": "errors",
    "corrupt_blocks": "corrupt",
    "breaker_skipped_calls": "breaker_skipped",
    "breaker_opens": "breaker_opens",
    "breaker_closes": "breaker_closes",
    "breaker_open": "breaker_open",
}
_USAGE = ("used_blocks", "total_blocks", "peak_blocks", "used_bytes", "total_bytes")
# kvferry_connector_<stem>_total -> TierCounters field of the "connector" pseudo tier
_CONNECTOR = {
    "load_blocks": "blocks_out",
    "load_bytes": "bytes_out",
    "load_seconds": "load_seconds",
    "save_blocks": "blocks_in",
    "save_bytes": "bytes_in",
    "save_seconds": "save_seconds",
    "lookup_errors": "errors",
    "load_errors": "errors",
    "save_errors": "errors",
}
# kvferry_router_<stem>_total -> (StoreStats field, TierCounters field of the "router" tier)
_ROUTER = {
    "requests": ("lookups", ""),
    "prompt_blocks": ("lookup_blocks", "lookups"),
    "hit_blocks": ("hit_blocks", "hits"),
    "errors": ("", "errors"),
}
_FLOAT_FIELDS = {"save_seconds", "load_seconds", "request_hit_fraction_sum"}


def stats_from_metrics(text: str) -> tuple[StoreStats, set[str]]:
    """Map the kvferry families of a Prometheus text exposition onto a StoreStats.

    Samples of one name are summed over their labels (``source``, vLLM's ``model_name`` and
    ``engine``, the router's ``worker``), except ``tier``, which picks the tier.

    Returns:
        The counters, and the known metric names that were found (without ``_total``).

    Raises:
        ValueError: the text is not Prometheus' exposition format.
    """
    store: dict[str, float] = defaultdict(float)
    tiers: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    usage: dict[str, dict[str, float]] = defaultdict(dict)
    seen: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if not name.startswith("kvferry_"):
                continue
            stem = name.removeprefix("kvferry_")
            kind, _, rest = stem.partition("_")
            value = float(sample.value)
            if kind == "store" and rest in _STORE:
                store[_STORE[rest]] += value
            elif kind == "tier" and rest in _TIER and "tier" in sample.labels:
                tiers[sample.labels["tier"]][_TIER[rest]] += value
            elif kind == "tier" and rest in _USAGE and "tier" in sample.labels:
                row = usage[sample.labels["tier"]]
                row[rest] = row.get(rest, 0.0) + value
            elif kind == "connector" and rest in _CONNECTOR:
                tiers["connector"][_CONNECTOR[rest]] += value
            elif kind == "router" and rest in _ROUTER:
                top, tier_field = _ROUTER[rest]
                if top:
                    store[top] += value
                if tier_field:
                    tiers["router"][tier_field] += value
            else:
                continue
            seen.add(name)
    stats = StoreStats()
    for key, value in store.items():
        setattr(stats, key, value if key in _FLOAT_FIELDS else int(value))
    for tier, row in tiers.items():
        counters = stats.tiers[tier] = TierCounters()
        for key, value in row.items():
            setattr(counters, key, value if key in _FLOAT_FIELDS else int(value))
    for tier, u in usage.items():
        total_blocks, total_bytes = u.get("total_blocks"), u.get("total_bytes")
        stats.usage[tier] = TierStats(
            total_blocks=None if total_blocks is None else int(total_blocks),
            used_blocks=int(u.get("used_blocks", 0)),
            peak_blocks=int(u.get("peak_blocks", 0)),
            total_bytes=None if total_bytes is None else int(total_bytes),
            used_bytes=int(u.get("used_bytes", 0)),
        )
    return stats, seen


def open_source(
    url: str | None = None,
    *,
    store_server: str | None = None,
    auth_token: str | None = None,
    timeout_s: float = 5.0,
) -> MonitorSource:
    """The source that ``kvferry monitor URL`` or ``--store-server HOST:PORT`` names.

    Raises:
        ConfigError: neither or both given, or one that is malformed.
    """
    if (url is None) == (store_server is None):
        raise ConfigError(
            "monitor: give one source, a URL (http://host:port/metrics) or --store-server "
            "HOST:PORT" + (", not both" if url is not None else "")
        )
    if url is not None:
        return PrometheusSource(url, auth_token=auth_token, timeout_s=timeout_s)
    return StoreServerSource(str(store_server), auth_token=auth_token, timeout_s=timeout_s)
