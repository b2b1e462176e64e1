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


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not _cuda(), reason="no CUDA device here (runs on a GPU machine)")
def test_pinned_pool_is_page_locked_and_unpinned_on_close(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    for round_ in range(3):  # a new pool may be mapped where the last one was: pinning again works
        tier = CpuTier(CpuTierConfig(buffer_number=256, pinned=True), TierContext(slot_size=SLOT))
        try:
            assert torch.from_numpy(tier.region.array).is_pinned(), f"round {round_}"
            keys = [key(i) for i in range(4)]
            assert tier.put(keys, [value(i, SLOT) for i in range(4)]) == [PutStatus.STORED] * 4
            (loc,) = tier.locate(keys[1:2])
            assert loc is not None
            on_gpu = torch.from_numpy(tier.region.array[loc[0] : loc[0] + loc[1]]).cuda()
            assert bytes(on_gpu.cpu().numpy()) == value(1, SLOT)
        finally:
            tier.close()
    assert "failed" not in caplog.text


def test_pinned_without_a_gpu_warns_and_stays_pageable(caplog: pytest.LogCaptureFixture) -> None:
    if _cuda():
        pytest.skip("this machine has a GPU: the pinned pool test runs")
    tier = CpuTier(CpuTierConfig(buffer_number=4, pinned=True), TierContext(slot_size=SLOT))
    try:
        assert tier.put([key(1)], [value(1, 10)]) == [PutStatus.STORED]
        assert "stays pageable" in caplog.text
    finally:
        tier.close()
