"""docs/grafana/kvferry.json reads only metrics kvferry exports: every name in every query is in a
real scrape of a real store server (cpu over disk), or is one of the vLLM connector's counters."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvferry.config import load_config
from kvferry.serving.vllm.metrics import PROM_NAMES
from kvferry.store.server import StoreServer
from kvferry.telemetry.prometheus import export_store
from kvferry.testing.engines import free_port
from kvferry.testing.tier_kit import key, value

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "kvferry.json"
SLOT = 4096

# A metric name in PromQL: what kvferry and prometheus_client's collectors export. Functions
# (rate, histogram_quantile), label names and Grafana's $variables never start so.
_METRIC = re.compile(r"\b(?:kvferry|process|python)_[A-Za-z0-9_]*")


def _queries(node: object) -> Iterator[str]:
    """Every PromQL string of the dashboard: panel targets' ``expr``, template variables'
    ``query`` (and ``definition``)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "definition") and isinstance(v, str):
                yield v
            elif k == "query" and isinstance(v, dict) and isinstance(v.get("query"), str):
                yield v["query"]
            else:
                yield from _queries(v)
    elif isinstance(node, list):
        for v in node:
            yield from _queries(v)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Sample names served by a store server's /metrics, after some traffic, plus the
    connector's counters."""
    port = free_port()
    cfg = load_config(
        flags={
            "listen.port": 0,
            "store.tiers": ["cpu", "disk"],
            "store.slot_size": SLOT,
            "store.metrics_port": port,
            "cpu.capacity": "64KiB",
            "disk.capacity": "1MiB",
            "disk.path": str(tmp_path_factory.mktemp("disk")),
            "disk.direct_io": False,
        }
    ).config
    with StoreServer(cfg) as server:
        export_store(server.store, transfer=server.engine.metrics)  # as `kvferry serve store`
        store = server.store
        ks = [key(i) for i in range(40)]  # more than the cpu tier holds: some go to disk
        store.put(ks, [value(i, SLOT) for i in range(40)])
        store.lookup(ks)
        store.get(ks, [memoryview(bytearray(SLOT)) for _ in ks])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    return names | {name + "_total" for name, _ in PROM_NAMES.values()}


def test_every_dashboard_query_names_an_exported_metric(exported: set[str]) -> None:
    doc = json.loads(DASHBOARD.read_text())
    queries = list(_queries(doc))
    assert len(queries) > 20
    used: set[str] = set()
    for q in queries:
        assert "kvferry:" not in q, f"a recording-rule name in {q!r}"
        names = _METRIC.findall(q)
        assert names, f"no metric in {q!r}"
        unknown = [n for n in names if n not in exported]
        assert not unknown, f"{q!r} reads {unknown}, which nothing exports"
        used.update(names)
    # What the dashboard is for: hit rate, GB/s per tier, latency percentiles, evictions,
    # errors, the breakers, the connector, the process and the build.
    for name in (
        "kvferry_store_hit_blocks_total",
        "kvferry_store_lookup_blocks_total",
        "kvferry_tier_bytes_out_total",
        "kvferry_store_get_latency_seconds_bucket",
        "kvferry_tier_evictions_total",
        "kvferry_tier_errors_total",
        "kvferry_tier_breaker_open",
        "kvferry_connector_hit_tokens_total",
        "process_resident_memory_bytes",
        "kvferry_build_info",
    ):
        assert name in used, name
    assert any("histogram_quantile(" in q and "_bucket" in q for q in queries)


def test_every_panel_has_a_query_and_a_unique_id() -> None:
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        if p["type"] != "row":
            assert p["targets"] and all(t.get("expr") for t in p["targets"]), p["title"]
