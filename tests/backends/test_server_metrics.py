"""A store server's /metrics count its own traffic: a real server process, real clients (the
server tier over TCP and over the shared mapping), a real scrape."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.server.client import ServerTier
from kvferry.config.models import ServerTierConfig
from kvferry.testing.engines import free_port
from kvferry.testing.tier_kit import key, value

SLOT = 4096

_Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Server:
    def __init__(self) -> None:
        self.metrics_port = free_port()
        cmd = [sys.executable, "-m", "kvferry", "serve", "store", "--port", "0", "--quiet"]
        cmd += ["--tiers", "cpu", "--capacity", "1MiB", "--slot-size", str(SLOT)]
        cmd += ["--metrics-port", str(self.metrics_port)]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ)
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("kvferry-store-ready "):
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"server did not start: {line!r} {err}")
        self.address = line.split()[1]

    def client(self, transport: str) -> ServerTier:
        cfg = ServerTierConfig(addresses=[self.address], transport=transport)  # type: ignore[arg-type]
        return ServerTier(cfg, TierContext(slot_size=SLOT))

    def scrape(self) -> _Samples:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        out: _Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def scrape_settled(self, name: str, want: float) -> _Samples:
        """A scrape once the cpu tier's ``name`` reads ``want`` (at most 5 s): a GET's lent
        blocks are counted when it completes, just after its reply went out."""
        deadline = time.monotonic() + 5
        while True:
            s = self.scrape()
            if _tier(s, name) == want or time.monotonic() > deadline:
                return s
            time.sleep(0.02)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.proc.kill()
    s.proc.wait()


def _store(samples: _Samples, name: str) -> float:
    return samples[(name, frozenset({("source", "store")}))]


def _tier(samples: _Samples, name: str) -> float:
    return samples[(name, frozenset({("source", "store"), ("tier", "cpu")}))]


def test_tcp_clients_puts_presence_checks_and_gets_count_as_store_traffic(server: Server) -> None:
    tier = server.client("tcp")
    try:
        ks = [key(i) for i in range(10)]
        assert tier.put(ks, [value(i, SLOT) for i in range(10)]) == [PutStatus.STORED] * 10
        asked = [*ks, key(100), key(101)]
        assert tier.contains(asked) == [True] * 10 + [False] * 2  # a client's lookup
        outs = [memoryview(bytearray(SLOT)) for _ in asked]
        assert tier.get(asked, outs) == [SLOT] * 10 + [None, None]
    finally:
        tier.close()
    s = server.scrape_settled("kvferry_tier_bytes_out_total", 10 * SLOT)
    assert _store(s, "kvferry_store_puts_total") == 1
    assert _store(s, "kvferry_store_put_blocks_total") == 10
    assert _store(s, "kvferry_store_lookups_total") == 1
    assert _store(s, "kvferry_store_lookup_blocks_total") == 12
    assert _store(s, "kvferry_store_hit_blocks_total") == 10
    assert _store(s, "kvferry_store_gets_total") == 1
    assert _store(s, "kvferry_store_get_blocks_total") == 12
    assert _store(s, "kvferry_store_get_hit_blocks_total") == 10
    assert _store(s, "kvferry_store_lookup_latency_seconds_count") == 1
    assert _store(s, "kvferry_store_get_latency_seconds_count") == 1
    assert _store(s, "kvferry_store_put_latency_seconds_count") == 1
    assert _tier(s, "kvferry_tier_blocks_in_total") == 10
    assert _tier(s, "kvferry_tier_bytes_in_total") == 10 * SLOT
    assert _tier(s, "kvferry_tier_blocks_out_total") == 10
    assert _tier(s, "kvferry_tier_bytes_out_total") == 10 * SLOT


def test_shared_memory_clients_reserve_and_locate_count_as_store_traffic(server: Server) -> None:
    tier = server.client("auto")
    try:
        assert tier._wire.mapping(server.address) is not None, "same host: the shm path"
        ks = [key(i, 2) for i in range(5)]
        assert tier.put(ks, [value(i, SLOT) for i in range(5)]) == [PutStatus.STORED] * 5
        asked = [*ks, key(100, 2)]
        outs = [memoryview(bytearray(SLOT)) for _ in asked]
        # LOCATE lends the 5 it has; the client asks for the one it did not get inline (GET).
        assert tier.get(asked, outs) == [SLOT] * 5 + [None]
    finally:
        tier.close()
    s = server.scrape()
    assert _store(s, "kvferry_store_puts_total") == 1  # RESERVE + COMMIT
    assert _store(s, "kvferry_store_put_blocks_total") == 5
    assert _store(s, "kvferry_store_put_latency_seconds_count") == 1
    assert _store(s, "kvferry_store_gets_total") == 2  # LOCATE, then GET of the miss
    assert _store(s, "kvferry_store_get_blocks_total") == 7
    assert _store(s, "kvferry_store_get_hit_blocks_total") == 5
    assert _store(s, "kvferry_store_get_latency_seconds_count") == 2
    assert _tier(s, "kvferry_tier_blocks_in_total") == 5
    assert _tier(s, "kvferry_tier_bytes_out_total") == 5 * SLOT  # counted at RELEASE


def test_build_info_and_process_metrics_are_served(server: Server) -> None:
    s = server.scrape()
    info = [labels for (name, labels) in s if name == "kvferry_build_info"]
    assert len(info) == 1
    labels = dict(info[0])
    assert labels["version"] and labels["python"].count(".") == 2 and "commit" in labels
    assert s[("kvferry_build_info", info[0])] == 1
    assert s[("process_resident_memory_bytes", frozenset())] > 0
    assert s[("process_cpu_seconds_total", frozenset())] >= 0
