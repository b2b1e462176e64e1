"""The cpu tier: the conformance kit, pool sizing, zero-copy views and locations."""

from __future__ import annotations

import pytest

from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.cpu import CpuTier
from kvferry.config.models import CpuTierConfig
from kvferry.errors import StorageError
from kvferry.testing.tier_kit import check_tier, key, value

SLOT = 4096


def make(n: int = 32) -> CpuTier:
    return CpuTier(CpuTierConfig(buffer_number=n), TierContext(slot_size=SLOT))


def test_conformance() -> None:
    check_tier(make, slot_size=SLOT)


def test_capacity_from_bytes() -> None:
    tier = CpuTier(CpuTierConfig(capacity=10 * SLOT + 5), TierContext(slot_size=SLOT))
    try:
        assert tier.capacity_blocks == 10
        assert tier.stats().total_bytes == 10 * SLOT
    finally:
        tier.close()


def test_no_slot_is_a_clear_error() -> None:
    with pytest.raises(StorageError, match="holds no slot"):
        CpuTier(CpuTierConfig(capacity=100), TierContext(slot_size=SLOT))


def test_peak_and_locate() -> None:
    tier = make(4)
    try:
        keys = [key(i) for i in range(3)]
        assert tier.put(keys, [value(i, 100 + i) for i in range(3)]) == [PutStatus.STORED] * 3
        tier.delete(keys[:2])
        stats = tier.stats()
        assert (stats.used_blocks, stats.peak_blocks) == (1, 3)
        (loc,) = tier.locate(keys[2:])
        assert loc is not None
        offset, length = loc
        assert length == 102
        assert bytes(tier.region.view[offset : offset + length]) == value(2, 102)
        assert tier.locate(keys[:1]) == [None]
    finally:
        tier.close()


def test_reserve_twice_is_refused() -> None:
    tier = make(4)
    try:
        tier.reserve([key(1)], [10])
        with pytest.raises(ValueError, match="already present or reserved"):
            tier.reserve([key(1)], [10])
        with pytest.raises(ValueError, match="not in"):
            tier.reserve([key(2)], [SLOT + 1])
    finally:
        tier.close()


def test_closed_tier_refuses() -> None:
    tier = make(2)
    tier.close()
    tier.close()
    with pytest.raises(StorageError, match="closed"):
        tier.put([key(1)], [b"x"])
