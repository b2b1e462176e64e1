"""The vLLM connector's statistics as vLLM takes them: per-interval counters, their reduction
for vLLM's "KV Transfer metrics" log line, and one Prometheus counter per statistic in vLLM's
``/metrics``.

Owns the vLLM-facing classes only (they subclass vLLM's, so this module imports vLLM); the
names and help texts are :mod:`kvferry.serving.vllm.metrics`', which imports neither vLLM nor
torch. The connector (:mod:`kvferry.serving.vllm.connector`) counts into an
:class:`IntervalCounters` and hands vLLM what it takes.
"""

from __future__ import annotations

import threading
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvferry.serving.vllm.metrics import PROM_NAMES, STAT_KEYS

__all__ = ["ConnectorPromMetrics", "IntervalCounters", "KvferryConnectorStats"]


class KvferryConnectorStats(KVConnectorStats):  # type: ignore[misc]
    """Counters of one interval (see ``STAT_KEYS``); ``reduce`` adds the speeds in GB/s."""

    def __post_init__(self) -> None:
        for key in STAT_KEYS:
            self.data.setdefault(key, 0)

    def reset(self) -> None:
        self.data = dict.fromkeys(STAT_KEYS, 0)

    def aggregate(self, other: KVConnectorStats) -> KvferryConnectorStats:
        for key, value in other.data.items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {k: round(v, 6) for k, v in d.items()}
        out["load_GBps"] = (
            round(d["load_bytes"] / d["load_seconds"] / 1e9, 3) if d["load_seconds"] else 0.0
        )
        out["save_GBps"] = (
            round(d["save_bytes"] / d["save_seconds"] / 1e9, 3) if d["save_seconds"] else 0.0
        )
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in STAT_KEYS)


class IntervalCounters:
    """Thread-safe interval counters; ``take`` returns them and starts a new interval."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, float] = dict.fromkeys(STAT_KEYS, 0.0)
        self.totals: dict[str, float] = dict.fromkeys(STAT_KEYS, 0.0)

    def add(self, **values: float) -> None:
        with self._lock:
            for key, value in values.items():
                self._data[key] += value
                self.totals[key] += value

    def take(self) -> KvferryConnectorStats | None:
        with self._lock:
            if not any(self._data.values()):
                return None
            data, self._data = self._data, dict.fromkeys(STAT_KEYS, 0.0)
        return KvferryConnectorStats(data=data)


class ConnectorPromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]
    """One counter per statistic, per engine, in vLLM's /metrics (names: ``PROM_NAMES``)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._counters: dict[str, dict[int, Any]] = {}
        for key in STAT_KEYS:
            name, doc = PROM_NAMES[key]
            counter = self._counter_cls(name=name, documentation=doc, labelnames=self._labelnames)
            self._counters[key] = {
                idx: counter.labels(*values) for idx, values in self.per_engine_labelvalues.items()
            }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in transfer_stats_data.items():
            per_engine = self._counters.get(key)
            if per_engine and value and engine_idx in per_engine:
                per_engine[engine_idx].inc(value)
