"""The cpu tier: the conformance kit, pool sizing, zero-copy views and locations."""

from __future__ import annotations

import pytest

from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.cpu import CpuTier, available_memory
from kvferry.config.models import CpuTierConfig
from kvferry.errors import ConfigError, StorageError
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


def test_a_pool_above_the_available_memory_is_refused_before_it_is_allocated() -> None:
    with pytest.raises(ConfigError) as refused:
        CpuTier(CpuTierConfig(capacity=1 << 50), TierContext(slot_size=SLOT))
    message = str(refused.value)
    # What was asked, what there is, and the way out.
    assert "1024TiB" in message and "MemAvailable" in message
    assert "cpu.force_capacity" in message and "--force-capacity" in message


def test_the_memory_limit_is_a_fraction_and_force_capacity_overrides_it() -> None:
    strict = CpuTierConfig(capacity=1 << 20, max_memory_fraction=1e-9)
    with pytest.raises(ConfigError, match=r"more than 1e-07% of the memory available"):
        CpuTier.check(strict, TierContext(slot_size=SLOT))
    forced = strict.model_copy(update={"force_capacity": True})
    CpuTier.check(forced, TierContext(slot_size=SLOT))
    tier = CpuTier(forced, TierContext(slot_size=SLOT))
    try:
        assert tier.capacity_blocks == (1 << 20) // SLOT
    finally:
        tier.close()


def test_available_memory_reads_memavailable() -> None:
    with open("/proc/meminfo") as f:
        line = next(x for x in f if x.startswith("MemAvailable:"))
    now = int(line.split()[1]) * 1024
    got = available_memory()
    assert got is not None and abs(got - now) < now // 2
