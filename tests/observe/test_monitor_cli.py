"""``kvferry monitor`` and its sources against a real store server process.

Blocks go through a real TieredStore whose only tier is the server; the monitor reads the
server's STATS call (``--store-server``) and its Prometheus ``--metrics-port`` (URL), and its
numbers must be the ones that traffic made.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from kvferry.cli.main import main
from kvferry.config.models import KvferryConfig, ServerTierConfig, StoreConfig
from kvferry.errors import ConfigError, ProtocolError
from kvferry.serving.vllm.metrics import PROM_NAMES
from kvferry.store import TieredStore
from kvferry.store.stats import StoreStats
from kvferry.telemetry.monitor import StatsMonitor, Thresholds, check
from kvferry.telemetry.sources import (
    MonitorSource,
    PrometheusSource,
    StoreServerSource,
    open_source,
    stats_from_metrics,
)
from kvferry.testing.engines import StoreServerProcess, free_port
from kvferry.testing.tier_kit import key, value

SLOT = 4096
SLOTS = 256  # 1MiB of 4KiB slots


@pytest.fixture
def server() -> Iterator[tuple[StoreServerProcess, int]]:
    metrics = free_port()
    args = ["--tiers", "cpu", "--capacity", "1MiB", "--slot-size", str(SLOT)]
    proc = StoreServerProcess(args=[*args, "--metrics-port", str(metrics)]).start()
    try:
        yield proc, metrics
    finally:
        proc.kill()


def _client(address: str) -> TieredStore:
    return TieredStore(
        KvferryConfig(
            store=StoreConfig(tiers=["server"], slot_size=SLOT),
            server=ServerTierConfig(addresses=[address], transport="tcp"),
        )
    )


def _traffic(store: TieredStore, seed: int, stored: int, absent: int, read: int) -> None:
    """Put ``stored`` blocks, look up those and ``absent`` more, read ``read`` of them back."""
    keys = [key(i, seed) for i in range(stored)]
    store.put(keys, [value(i, SLOT) for i in range(stored)])
    missing = [key(1000 + i, seed) for i in range(absent)]
    assert store.lookup(keys + missing) == stored
    outs = [memoryview(bytearray(SLOT)) for _ in range(read)]
    assert store.get(keys[:read], outs) == [SLOT] * read


def _settled(source: MonitorSource) -> StoreStats:
    """The server's statistics once the last GET's lent blocks were released: the server
    counts a GET's bytes when its reply is on the wire, just after the client has it."""
    deadline = time.monotonic() + 10
    while True:
        stats = source.read()
        if stats.leases_active == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_reports_what_a_tiered_store_did_on_a_real_server(
    server: tuple[StoreServerProcess, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc, _ = server
    store = _client(proc.address)
    try:
        _traffic(store, seed=1, stored=8, absent=4, read=6)
    finally:
        store.close()
    _settled(StoreServerSource(proc.address))
    out = tmp_path / "m.jsonl"
    args = ["monitor", "--store-server", proc.address, "--count", "2", "--interval", "0.2"]
    rc = main([*args, "--json-lines", str(out), "--wide"])
    assert rc == 0
    first, second = _lines(out)
    assert first["source"] == f"store-server {proc.address}"
    # The first sample holds everything so far: one lookup of 12 blocks that found 8...
    assert first["lookup_blocks"] == 12 and first["hit_blocks"] == 8
    assert first["hit_rate"] == pytest.approx(8 / 12)
    assert first["puts"] == 1 and first["gets"] == 1 and first["requests"] == 3
    # ...8 blocks of 4 KiB stored and 6 read back through the server's cpu tier.
    cpu = first["tiers"]["cpu"]
    assert cpu["bytes_in"] == 8 * SLOT and cpu["bytes_out"] == 6 * SLOT
    assert cpu["used_blocks"] == 8 and cpu["total_blocks"] == SLOTS
    assert first["warnings"] == []
    # Nothing happened in the second interval; the cumulative numbers stay.
    assert second["lookup_blocks"] == 0 and second["bytes_in"] == 0 and second["bytes_out"] == 0
    assert second["interval_s"] > 0 and second["total_hit_rate"] == pytest.approx(8 / 12)
    assert second["total_bytes_in"] == 8 * SLOT and second["total_bytes_out"] == 6 * SLOT
    printed = capsys.readouterr()
    assert "hit rate 66.7% (8/12 blocks)" in printed.out and "8/256 (3%)" in printed.out
    assert "warning is off" in printed.err  # no --prefill-tokens-per-s / --kv-bytes-per-token


def test_monitor_intervals_follow_traffic_between_samples(
    server: tuple[StoreServerProcess, int],
) -> None:
    proc, _ = server
    source = StoreServerSource(proc.address)
    store = _client(proc.address)
    try:
        monitor = StatsMonitor(source, interval_s=1.0, thresholds=Thresholds(hit_rate=0.5))
        monitor.sample()
        _traffic(store, seed=2, stored=4, absent=12, read=4)
        _settled(source)
        busy = monitor.sample()
        _traffic(store, seed=3, stored=10, absent=0, read=2)
        _settled(source)
        later = monitor.sample()
    finally:
        store.close()
        source.close()
    assert busy["lookup_blocks"] == 16 and busy["hit_blocks"] == 4
    assert busy["tiers"]["cpu"]["bytes_in"] == 4 * SLOT  # type: ignore[index]
    assert busy["warnings"] == [
        "hit rate low: 25.0% this interval (4/16 blocks) < 50% (--warn-hit-rate)"
    ]
    assert later["lookup_blocks"] == 10 and later["hit_rate"] == 1.0
    assert later["tiers"]["cpu"]["bytes_out"] == 2 * SLOT  # type: ignore[index]
    assert later["total_hit_rate"] == pytest.approx(14 / 26)
    assert later["warnings"] == []


def test_prometheus_url_reads_the_same_numbers_as_stats(
    server: tuple[StoreServerProcess, int], tmp_path: Path
) -> None:
    proc, metrics = server
    store = _client(proc.address)
    try:
        _traffic(store, seed=4, stored=5, absent=5, read=5)
    finally:
        store.close()
    by_stats = _settled(StoreServerSource(proc.address))
    out = tmp_path / "p.jsonl"
    url = f"http://127.0.0.1:{metrics}/metrics"
    assert main(["monitor", url, "--once", "--json-lines", str(out), "--warn-pool", "0.01"]) == 0
    (sample,) = _lines(out)
    assert sample["source"] == url
    assert sample["lookup_blocks"] == by_stats.lookup_blocks == 10
    assert sample["hit_blocks"] == by_stats.hit_blocks == 5
    assert sample["tiers"]["cpu"]["bytes_in"] == by_stats.tiers["cpu"].bytes_in == 5 * SLOT
    assert sample["tiers"]["cpu"]["bytes_out"] == 5 * SLOT
    assert sample["tiers"]["cpu"]["total_blocks"] == SLOTS
    # 5 of 256 slots is past a 1% pool threshold
    assert sample["warnings"] == ["cpu pool near full: 5/256 blocks (2% >= 1%, --warn-pool)"]


def test_a_server_that_goes_away_gets_error_rows_until_count(
    server: tuple[StoreServerProcess, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc, _ = server
    out = tmp_path / "gone.jsonl"
    result: list[int] = []
    args = ["monitor", "--store-server", proc.address, "--count", "3", "--interval", "1s"]
    args += ["--timeout", "2s", "--json-lines", str(out)]
    runner = threading.Thread(target=lambda: result.append(main(args)))
    runner.start()
    deadline = time.monotonic() + 30
    while not (out.exists() and out.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()  # after the first sample was written, before the second is taken
    runner.join(60)
    assert result == [0]
    first, *rest = _lines(out)
    assert "error" not in first and first["lookup_blocks"] == 0
    assert len(rest) == 2
    for row in rest:
        assert proc.address in row["error"] and "hit_rate" not in row
    assert capsys.readouterr().out.count("source unreachable") == 2


def test_unreachable_source_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    assert main(["monitor", "--store-server", f"127.0.0.1:{port}", "--once"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"127.0.0.1:{port}" in err[0]
    assert main(["monitor", f"http://127.0.0.1:{port}/metrics", "--once"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot scrape" in err[0] and "Prometheus" in err[0]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--interval", "fast"], "--interval"),
        (["--interval", "0"], "--interval '0' is invalid"),
        (["--count", "0"], "--count"),
        (["--warn-pool", "1.5"], "--warn-pool"),
        (["--warn-hit-rate", "high"], "--warn-hit-rate 'high' is not a number"),
        (["--kv-bytes-per-token", "lots"], "--kv-bytes-per-token"),
    ],
)
def test_bad_options_are_one_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # checked before the source is opened: the address is never dialled
    assert main(["monitor", "--store-server", "127.0.0.1:1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0]


def test_source_must_be_one_of_url_or_store_server() -> None:
    with pytest.raises(ConfigError, match="give one source"):
        open_source()
    with pytest.raises(ConfigError, match="not both"):
        open_source("http://127.0.0.1:1/metrics", store_server="127.0.0.1:1")
    with pytest.raises(ConfigError, match="is not a URL"):
        open_source("127.0.0.1:9100")
    with pytest.raises(ConfigError, match="host:port"):
        open_source(store_server="nohost")
    assert PrometheusSource("http://127.0.0.1:9/").url == "http://127.0.0.1:9/metrics"


def test_connector_metrics_from_a_vllm_style_registry() -> None:
    registry = CollectorRegistry()
    counters = {
        k: Counter(name, doc, ["model_name", "engine"], registry=registry)
        for k, (name, doc) in PROM_NAMES.items()
    }
    for engine in ("0", "1"):  # two engines: samples are summed over vLLM's labels
        c = {k: v.labels(model_name="tiny", engine=engine) for k, v in counters.items()}
        c["lookups"].inc(2)
        c["lookup_blocks"].inc(10)
        c["hit_blocks"].inc(4)
        c["load_bytes"].inc(4_000_000)
        c["load_seconds"].inc(0.004)
        c["save_bytes"].inc(6_000_000)
        c["save_seconds"].inc(0.002)
        c["load_errors"].inc(1)
    stats, seen = stats_from_metrics(generate_latest(registry).decode())
    assert stats.lookups == 4 and stats.lookup_blocks == 20 and stats.hit_blocks == 8
    connector = stats.tiers["connector"]
    assert connector.bytes_out == 8_000_000 and connector.load_seconds == pytest.approx(0.008)
    assert connector.bytes_in == 12_000_000 and connector.errors == 2
    assert "kvferry_store_lookups" in seen and "kvferry_connector_load_bytes" in seen
    report = StatsMonitor(lambda: stats, interval_s=1.0).sample()
    assert report["load_gbps"] == pytest.approx(1.0)  # 8e6 B in 8 ms
    assert report["error_rate"] == pytest.approx(2 / 4)


def test_router_metrics_map_to_predicted_hits() -> None:
    text = (
        "# TYPE kvferry_router_requests counter\n"
        'kvferry_router_requests_total{worker="http://a"} 3\n'
        'kvferry_router_requests_total{worker="http://b"} 1\n'
        "# TYPE kvferry_router_prompt_blocks counter\n"
        'kvferry_router_prompt_blocks_total{worker="http://a"} 30\n'
        'kvferry_router_prompt_blocks_total{worker="http://b"} 10\n'
        "# TYPE kvferry_router_hit_blocks counter\n"
        'kvferry_router_hit_blocks_total{worker="http://a"} 12\n'
        "# TYPE kvferry_router_errors counter\n"
        'kvferry_router_errors_total{worker="http://b"} 1\n'
    )
    stats, _ = stats_from_metrics(text)
    assert (stats.lookups, stats.lookup_blocks, stats.hit_blocks) == (4, 40, 12)
    assert stats.tiers["router"].errors == 1


def test_warnings_at_thresholds() -> None:
    quiet = Thresholds()
    assert quiet.recompute_gbps is None
    report: dict[str, object] = {
        "lookup_blocks": 10,
        "hit_blocks": 9,
        "hit_rate": 0.9,
        "requests": 100,
        "errors": 1,
        "tiers": {
            "disk": {"bytes_out": 1e9, "load_seconds": 1.0, "load_gbps": 1.0},
            "server": {"bytes_out": 1e9, "load_seconds": 0.0, "load_gbps": 0.0},  # lent
        },
    }
    assert check(report, quiet) == []  # 1% errors is not above 1%
    strict = Thresholds(error_rate=0.005, prefill_tokens_per_s=20_000, kv_bytes_per_token=131072)
    assert strict.recompute_gbps == pytest.approx(2.62144)
    warned = check(report, strict)
    assert warned[0].startswith("error rate high: 1 tier errors for 100 requests")
    assert warned[1].startswith("disk loads slower than recompute: 1.000 GB/s < 2.621 GB/s")
    assert len(warned) == 2  # the server tier moved bytes in no measured time: no speed
    with pytest.raises(ConfigError, match="--kv-bytes-per-token"):
        Thresholds(kv_bytes_per_token=0)


def test_a_stats_document_that_is_not_one_is_refused() -> None:
    with pytest.raises(ProtocolError, match="expected a JSON object"):
        StoreStats.from_json([1, 2])
    with pytest.raises(ProtocolError, match=r"tiers\.cpu\.bytes_in"):
        StoreStats.from_json({"tiers": {"cpu": {"bytes_in": "many"}}})
