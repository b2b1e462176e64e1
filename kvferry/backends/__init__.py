"""Storage tiers, one per module, behind ``kvferry.backends.base.Tier`` and one registry.

Importing this package imports no tier: ``TIERS.load(name)`` imports the one asked for, so a
missing optional dependency (redis, mooncake) fails only when that tier is configured.
"""

from kvferry.backends.base import (
    KEY_BYTES,
    Key,
    PutStatus,
    SlotTier,
    Tier,
    TierContext,
    TierStats,
)
from kvferry.backends.registry import TIERS, create_tier, load_tier

__all__ = [
    "KEY_BYTES",
    "TIERS",
    "Key",
    "PutStatus",
    "SlotTier",
    "Tier",
    "TierContext",
    "TierStats",
    "create_tier",
    "load_tier",
]
