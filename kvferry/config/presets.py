"""Named bundles of config values that encode Mooncake's tuning-guide templates.

Owns the preset values and their one-line descriptions only. A preset is a layer below the
config file, the environment and flags (see ``kvferry.config.loader``), so any of them can
override a preset value; it is validated by the same models as every other layer.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, dict[str, object]]] = {
    # Mooncake tuning guide, "high-throughput" template: big slices, more connections and deep
    # queues keep the links busy. kvferry's grace_period_ns is how long a waiter busy-polls
    # before blocking: with deep queues replies arrive back to back, so a short spin suffices
    # and CPU is saved while idle (the guide's "raise the grace period to cut polling CPU").
    "throughput": {
        "transfer": {
            "slice_size": 128 * 1024,  # MC_SLICE_SIZE=131072
            "workers": 4,  # MC_WORKERS_PER_CTX=4
            "max_inflight": 512,  # MC_MAX_WR=512
            "use_hugepages": True,  # MC_STORE_USE_HUGEPAGE=1
            "grace_period_ns": 20_000,  # 20us spin: less polling CPU than the 50us default
        },
    },
    # Mooncake tuning guide, "low-latency online inference" template: smaller slices finish
    # sooner, fewer retries fail fast, and a grace period 4x the 50us default busy-polls longer
    # before blocking, trading CPU for reply latency.
    "latency": {
        "transfer": {
            "slice_size": 64 * 1024,  # MC_SLICE_SIZE=65536
            "workers": 2,  # MC_WORKERS_PER_CTX=2
            "max_inflight": 256,  # MC_MAX_WR=256
            "retry_count": 5,  # MC_RETRY_CNT=5
            "use_hugepages": True,  # MC_STORE_USE_HUGEPAGE=1
            "grace_period_ns": 200_000,  # TENT workers/grace_period_ns=200000 (200us)
        },
    },
}
"""Preset name -> section -> key -> value."""

PRESET_DESCRIPTIONS: dict[str, str] = {
    "throughput": "high-throughput KV-cache transfer",
    "latency": "low-latency online inference",
}
"""Preset name -> one-line description (shown by ``kvferry config presets``)."""

__all__ = ["PRESETS", "PRESET_DESCRIPTIONS"]
