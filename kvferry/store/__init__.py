"""The tiered KV-cache store: control plane (index, placement, eviction, leases, stats).

No sockets and no I/O of its own here: tiers in ``kvferry.backends`` move the bytes.
"""

from kvferry.store.leases import LoadHandle, StoreHandle
from kvferry.store.stats import StoreStats, TierCounters
from kvferry.store.tiered import TieredStore

__all__ = ["LoadHandle", "StoreHandle", "StoreStats", "TierCounters", "TieredStore"]
