"""Prometheus exporter: a real HTTP server on loopback, scraped with urllib and parsed back."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from kvferry.backends.base import TierStats
from kvferry.backends.memory import MemoryTier
from kvferry.config.models import KvferryConfig, StoreConfig
from kvferry.errors import ConfigError
from kvferry.observe.counters import MetricSet
from kvferry.store import TieredStore
from kvferry.store.stats import StoreStats, TierCounters
from kvferry.telemetry.prometheus import MetricsExporter, export_store, histogram_buckets
from kvferry.testing.engines import free_port
from kvferry.testing.slowloris import Trickle
from kvferry.testing.tier_kit import key, value


def _store_stats() -> StoreStats:
    cpu = TierCounters(
        lookups=10,
        hits=6,
        blocks_in=8,
        blocks_out=6,
        bytes_in=4_000_000_000,
        bytes_out=3_000_000_000,
        save_seconds=2.0,
        load_seconds=1.0,
        evictions=5,
        demotions=4,
        promotions=1,
        no_space=2,
        errors=0,
        dropped=7,
    )
    disk = TierCounters(lookups=4, hits=1, bytes_in=1000, save_seconds=0.0, evictions=3)
    redis = TierCounters(errors=2, breaker_skipped=6, breaker_opens=2, breaker_closes=1)
    redis.breaker_open = 1
    stats = StoreStats(
        lookups=4,
        lookup_blocks=10,
        hit_blocks=7,
        request_hit_fraction_sum=3.0,
        puts=2,
        put_blocks=8,
        leases_active=3,
        leases_expired=1,
        tiers={"cpu": cpu, "disk": disk, "redis": redis},
        usage={
            "cpu": TierStats(
                total_blocks=100,
                used_blocks=40,
                peak_blocks=60,
                used_bytes=4096,
                extra={"reserved": 3, "corrupt_dropped": 2, "guarded_slots": 1},
            ),
            "disk": TierStats(
                total_blocks=None,
                used_blocks=7,
                peak_blocks=7,
                extra={"direct_io": 1, "io_threads": 4, "corrupt_dropped": 5},
            ),
        },
    )
    stats.lookup_latency.observe_ns(10_000)
    stats.get_latency.observe_ns(1_500)  # 1 us -> bucket le 2 us
    stats.get_latency.observe_ns(3_000)  # 3 us -> bucket le 4 us
    stats.get_latency.observe_ns(200_000_000_000)  # 200 s -> +Inf
    return stats


def _get(
    url: str, token: str | None = None
) -> tuple[int, dict[str, str], bytes]:  # status, headers, body
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


_Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(text: str) -> _Samples:
    out: _Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert isinstance(s, Sample)
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: _Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


@pytest.fixture
def exporter() -> Iterator[MetricsExporter]:
    exp = MetricsExporter()
    try:
        yield exp
    finally:
        exp.close()


def test_store_stats_are_served_with_their_values(exporter: MetricsExporter) -> None:
    stats = _store_stats()
    exporter.add_source("store", lambda: stats)
    host, port = exporter.start()
    assert host == "127.0.0.1" and port > 0

    status, headers, body = _get(f"http://{host}:{port}/metrics")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST
    s = _samples(body.decode())
    st = {"source": "store"}
    cpu = {"source": "store", "tier": "cpu"}
    disk = {"source": "store", "tier": "disk"}
    assert _value(s, "kvferry_store_lookups_total", **st) == 4
    assert _value(s, "kvferry_store_lookup_blocks_total", **st) == 10
    assert _value(s, "kvferry_store_hit_blocks_total", **st) == 7
    assert _value(s, "kvferry_store_put_blocks_total", **st) == 8
    assert _value(s, "kvferry_store_leases_active", **st) == 3
    assert _value(s, "kvferry_store_leases_expired_total", **st) == 1
    # The per-request mean hit rate is this over lookups_total, in PromQL.
    assert _value(s, "kvferry_store_lookup_hit_fractions_total", **st) == 3.0

    assert _value(s, "kvferry_tier_bytes_in_total", **cpu) == 4e9
    assert _value(s, "kvferry_tier_bytes_out_total", **cpu) == 3e9
    assert _value(s, "kvferry_tier_save_seconds_total", **cpu) == 2.0
    assert _value(s, "kvferry_tier_load_seconds_total", **cpu) == 1.0
    assert _value(s, "kvferry_tier_evictions_total", **cpu) == 5
    assert _value(s, "kvferry_tier_evictions_total", **disk) == 3
    assert _value(s, "kvferry_tier_dropped_blocks_total", **cpu) == 7
    assert _value(s, "kvferry_tier_lookup_blocks_total", **cpu) == 10
    assert _value(s, "kvferry_tier_hit_blocks_total", **cpu) == 6
    assert _value(s, "kvferry_tier_no_space_blocks_total", **cpu) == 2
    assert _value(s, "kvferry_tier_used_blocks", **cpu) == 40
    assert _value(s, "kvferry_tier_total_blocks", **cpu) == 100
    assert _value(s, "kvferry_tier_peak_blocks", **cpu) == 60
    assert _value(s, "kvferry_tier_used_bytes", **cpu) == 4096
    # A tier without a fixed capacity has no total_blocks sample at all (not a fake 0).
    assert ("kvferry_tier_total_blocks", frozenset(disk.items())) not in s
    # What tiers report of their own, each under its own name; configuration is left out.
    assert _value(s, "kvferry_tier_reserved_blocks", **cpu) == 3
    assert _value(s, "kvferry_tier_guarded_slots", **cpu) == 1
    assert _value(s, "kvferry_tier_dropped_corrupt_blocks_total", **cpu) == 2
    assert _value(s, "kvferry_tier_dropped_corrupt_blocks_total", **disk) == 5
    assert _value(s, "kvferry_tier_direct_io", **disk) == 1
    assert not [name for name, _ in s if "io_threads" in name]
    # No lifetime averages or catch-alls: ratios and speeds are PromQL over the counters.
    names = {name for name, _ in s}
    for gone in ("hit_rate", "_gbps", "tier_extra", "request_hit_rate_mean"):
        assert not [n for n in names if gone in n], gone
    redis = {"source": "store", "tier": "redis"}
    assert _value(s, "kvferry_tier_breaker_skipped_calls_total", **redis) == 6
    assert _value(s, "kvferry_tier_breaker_opens_total", **redis) == 2
    assert _value(s, "kvferry_tier_breaker_closes_total", **redis) == 1
    assert _value(s, "kvferry_tier_breaker_open", **redis) == 1
    assert _value(s, "kvferry_tier_breaker_open", **cpu) == 0

    # Latency histogram: cumulative buckets in seconds from the power-of-two us bounds.
    h = "kvferry_store_get_latency_seconds"
    assert _value(s, h + "_bucket", le="1e-06", **st) == 0
    assert _value(s, h + "_bucket", le="2e-06", **st) == 1
    assert _value(s, h + "_bucket", le="4e-06", **st) == 2
    assert _value(s, h + "_bucket", le="67.108864", **st) == 2
    assert _value(s, h + "_bucket", le="+Inf", **st) == 3
    assert _value(s, h + "_count", **st) == 3
    assert _value(s, h + "_sum", **st) == pytest.approx(200.0000045)
    assert _value(s, "kvferry_store_put_latency_seconds_count", **st) == 0
    assert _value(s, "kvferry_store_lookup_latency_seconds_bucket", le="1.6e-05", **st) == 1
    assert _value(s, "kvferry_store_lookup_latency_seconds_bucket", le="8e-06", **st) == 0
    assert _value(s, "kvferry_exporter_source_up", **st) == 1


def test_scrape_reads_the_source_each_time(exporter: MetricsExporter) -> None:
    stats = StoreStats()
    exporter.add_source("store", lambda: stats)
    host, port = exporter.start()
    before = _samples(_get(f"http://{host}:{port}/metrics")[2].decode())
    stats.lookup_blocks, stats.hit_blocks = 4, 1
    after = _samples(_get(f"http://{host}:{port}/metrics")[2].decode())
    assert _value(before, "kvferry_store_hit_blocks_total", source="store") == 0
    assert _value(after, "kvferry_store_hit_blocks_total", source="store") == 1
    assert _value(after, "kvferry_store_lookup_blocks_total", source="store") == 4


def test_transfer_snapshot_and_a_failing_source(exporter: MetricsExporter) -> None:
    metrics = MetricSet()
    metrics.group("tcp").add_request(read=True, nbytes=1000, slices=2, latency_ns=5_000)
    metrics.group("tcp").add_request(read=False, nbytes=300, slices=1, latency_ns=50_000)
    metrics.group("shm").add(errors=2, retries=3)
    exporter.add_source("engine", metrics.snapshot)

    def broken() -> StoreStats:
        raise OSError("store went away")

    exporter.add_source("broken", broken)
    text = exporter.render().decode()
    s = _samples(text)
    tcp = {"source": "engine", "transport": "tcp"}
    shm = {"source": "engine", "transport": "shm"}
    assert _value(s, "kvferry_transfer_bytes_read_total", **tcp) == 1000
    assert _value(s, "kvferry_transfer_bytes_written_total", **tcp) == 300
    assert _value(s, "kvferry_transfer_requests_total", **tcp) == 2
    assert _value(s, "kvferry_transfer_slices_total", **tcp) == 3
    assert _value(s, "kvferry_transfer_errors_total", **shm) == 2
    assert _value(s, "kvferry_transfer_retries_total", **shm) == 3
    assert _value(s, "kvferry_transfer_latency_seconds_count", **tcp) == 2
    assert _value(s, "kvferry_transfer_latency_seconds_bucket", le="8e-06", **tcp) == 1
    assert _value(s, "kvferry_transfer_latency_seconds_sum", **tcp) == pytest.approx(55e-6)
    # The broken source is reported down and counted; the engine is still served.
    assert _value(s, "kvferry_exporter_source_up", source="broken") == 0
    assert _value(s, "kvferry_exporter_source_up", source="engine") == 1
    assert _value(s, "kvferry_exporter_source_errors_total", source="broken") == 1
    assert "store went away" not in text
    s2 = _samples(exporter.render().decode())
    assert _value(s2, "kvferry_exporter_source_errors_total", source="broken") == 2


def test_wrong_source_type_is_reported_down(exporter: MetricsExporter) -> None:
    exporter.add_source("odd", lambda: 42)  # type: ignore[arg-type, return-value]
    s = _samples(exporter.render().decode())
    assert _value(s, "kvferry_exporter_source_up", source="odd") == 0


def test_health_and_unknown_path(exporter: MetricsExporter) -> None:
    exporter.add_source("store", StoreStats)
    host, port = exporter.start()
    status, headers, body = _get(f"http://{host}:{port}/health")
    assert status == 200 and headers["Content-Type"] == "application/json"
    health = json.loads(body)
    assert health["status"] == "ok" and health["sources"] == ["store"]
    assert _get(f"http://{host}:{port}/nope")[0] == 404


def test_auth_token_guards_both_endpoints() -> None:
    with MetricsExporter(auth_token="s3cret") as exp:
        exp.add_source("store", StoreStats)
        host, port = exp.start()
        for path in ("/metrics", "/health"):
            url = f"http://{host}:{port}{path}"
            status, headers, body = _get(url)
            assert status == 401
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert b"kvferry_" not in body
            assert _get(url, token="wrong")[0] == 401
            assert _get(url, token="s3cre")[0] == 401
            status, _, body = _get(url, token="s3cret")
            assert status == 200 and body
        assert b"kvferry_store_lookups_total" in _get(f"http://{host}:{port}/metrics", "s3cret")[2]


def test_trickling_clients_are_closed_and_never_lock_out_a_scraper() -> None:
    """30 connections trickle a header byte every 0.2 s (each a thread in the exporter): the
    scraper with the token is served throughout, at most 8 trickling connections stay past a
    second, and none outlives the 3 s header deadline."""
    with MetricsExporter(
        auth_token="s3cret", header_timeout=3.0, max_pending=16, max_pending_per_address=8
    ) as exp:
        exp.add_source("store", StoreStats)
        host, port = exp.start()
        url = f"http://{host}:{port}/metrics"
        with Trickle(host, port, 30) as slow:
            assert _get(url, token="s3cret")[0] == 200
            deadline = time.monotonic() + 2.5
            while slow.open() > 8:
                assert time.monotonic() < deadline, f"{slow.open()} trickling connections stay"
                time.sleep(0.05)
            assert _get(url, token="s3cret")[0] == 200
            assert slow.wait_closed(4.5)
            assert max(slow.closed.values()) < 4.5
        assert exp.pending.evicted >= 30 - 8 and exp.pending.evicted + exp.pending.timed_out == 30


def _can_listen(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


def test_close_frees_the_port_and_is_idempotent() -> None:
    exp = MetricsExporter()
    host, port = exp.start()
    assert _get(f"http://{host}:{port}/health")[0] == 200
    assert not _can_listen(port)
    with pytest.raises(RuntimeError, match="already started"):
        exp.start()
    exp.close()
    exp.close()
    assert exp.address is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5)
    assert _can_listen(port)
    # The same port serves again from a new exporter.
    with MetricsExporter(port=port) as again:
        assert again.start() == (host, port)
        assert _get(f"http://{host}:{port}/health")[0] == 200


def test_port_in_use_is_a_config_error(exporter: MetricsExporter) -> None:
    _, port = exporter.start()
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
        MetricsExporter(port=port).start()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bind": ""}, "bind address"),
        ({"bind": " 127.0.0.1"}, "bind address"),
        ({"port": -1}, "port -1"),
        ({"port": 65536}, "port 65536"),
        ({"port": True}, "port True"),
        ({"port": "9100"}, "port '9100'"),
        ({"auth_token": ""}, "auth_token"),
        ({"header_timeout": 0.0}, "header_timeout"),
        ({"max_pending_per_address": 0}, "at least 1"),
    ],
)
def test_bad_settings_are_config_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MetricsExporter(**kwargs)  # type: ignore[arg-type]


def test_unresolvable_bind_fails_at_start() -> None:
    exp = MetricsExporter(bind="no-such-host.invalid")
    with pytest.raises(ConfigError, match=r"no-such-host\.invalid"):
        exp.start()


def test_source_names_are_checked(exporter: MetricsExporter) -> None:
    exporter.add_source("store", StoreStats)
    with pytest.raises(ConfigError, match="already registered"):
        exporter.add_source("store", StoreStats)
    with pytest.raises(ConfigError, match="source name"):
        exporter.add_source("", StoreStats)
    with pytest.raises(TypeError, match="not callable"):
        exporter.add_source("x", 3)  # type: ignore[arg-type]
    exporter.remove_source("store")
    assert exporter.sources() == []


def test_histogram_buckets() -> None:
    assert histogram_buckets([1.0, 2.0], [3, 0, 1]) == [
        ("1e-06", 3.0),
        ("2e-06", 3.0),
        ("+Inf", 4.0),
    ]
    with pytest.raises(ValueError, match="one more count"):
        histogram_buckets([1.0, 2.0], [1, 2])


def test_exporters_do_not_share_a_registry() -> None:
    a, b = MetricsExporter(), MetricsExporter()
    a.add_source("only-a", StoreStats)
    assert a.registry is not b.registry
    assert b"only-a" in a.render()
    assert b"only-a" not in b.render()
    assert b"python_gc_" not in a.render()  # not the global default registry
    # but process metrics of its own, and the build
    assert b"process_cpu_seconds_total" in a.render()
    assert b"kvferry_build_info{" in a.render()


def _memory_store(**store: object) -> TieredStore:
    cfg = KvferryConfig(store=StoreConfig(slot_size=4096, **store))
    return TieredStore(cfg, tiers=[MemoryTier.sized(8, label="cpu", slot_size=4096)])


def test_export_store_serves_the_stores_stats_until_the_store_closes() -> None:
    store = _memory_store(metrics_port=free_port())
    exporter = export_store(store)
    assert exporter is not None and exporter.address is not None
    host, port = exporter.address
    store.put([key(0), key(1)], [value(0, 4096), value(1, 4096)])
    store.lookup([key(0), key(1), key(77)])
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["kvferry_store_hit_blocks_total"] == 2
    assert samples["kvferry_store_lookup_blocks_total"] == 3
    store.close()
    assert exporter.address is None  # closed with the store: the port is free again
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a new exporter would
        s.bind((host, port))


def test_export_store_adds_a_transfer_source_and_honours_a_given_config() -> None:
    store = _memory_store()  # its own config has no metrics port
    assert export_store(store) is None
    port = free_port()
    cfg = KvferryConfig(store=StoreConfig(metrics_port=port))
    metrics = MetricSet()
    metrics.group("tcp").add_request(read=True, nbytes=10, slices=1, latency_ns=1_000)
    exporter = export_store(store, cfg, transfer=metrics.snapshot)
    assert exporter is not None and exporter.address == ("127.0.0.1", port)
    assert [name for name, _ in exporter.sources()] == ["store", "transfer"]
    s = _samples(exporter.render().decode())
    assert _value(s, "kvferry_transfer_bytes_read_total", source="transfer", transport="tcp") == 10
    store.close()
    assert exporter.address is None


def test_export_store_on_a_port_in_use_is_a_config_error_and_leaves_nothing_open() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        store = _memory_store(metrics_port=busy.getsockname()[1])
        with pytest.raises(ConfigError, match="cannot listen"):
            export_store(store)
        store.close()
