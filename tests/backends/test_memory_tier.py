"""The memory tier (the hit-rate simulator's tier): the conformance kit, capacity, empty values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvferry.backends.base import PutStatus
from kvferry.backends.memory import MemoryTier, MemoryTierConfig
from kvferry.testing.tier_kit import check_tier, key

SLOT = 4096


def test_conformance() -> None:
    check_tier(lambda: MemoryTier.sized(32, label="mem", slot_size=SLOT), slot_size=SLOT)


def test_unbounded_and_empty_values() -> None:
    tier = MemoryTier.sized(None, label="sim", slot_size=SLOT)
    keys = [key(i) for i in range(1000)]
    assert tier.put(keys, [b""] * 1000) == [PutStatus.STORED] * 1000
    got = tier.get(keys[:3], [memoryview(bytearray(0))] * 3)
    assert got == [0, 0, 0]
    s = tier.stats()
    assert (s.total_blocks, s.used_blocks, s.used_bytes, tier.label) == (None, 1000, 0, "sim")


def test_capacity_refuses_past_full() -> None:
    tier = MemoryTier.sized(2, label="mem", slot_size=SLOT)
    got = tier.put([key(1), key(2), key(3)], [b"a", b"b", b"c"])
    assert got == [PutStatus.STORED, PutStatus.STORED, PutStatus.NO_SPACE]
    with pytest.raises(ValueError, match="at least 1 block"):
        MemoryTier.sized(0, label="mem", slot_size=SLOT)


def test_peek_hands_out_the_stored_bytes_and_none_for_a_miss() -> None:
    """What the store's demotion reads instead of copying into fresh buffers."""
    from kvferry.config.models import KvferryConfig
    from kvferry.store.tiered import TieredStore

    tier = MemoryTier.sized(4, label="mem", slot_size=SLOT)
    tier.put([key(1), key(2)], [b"one", bytearray(b"two")])
    got = tier.peek([key(2), key(9), key(1)])
    assert got == [b"two", None, b"one"] and isinstance(got[0], bytes)
    # a pipeline of memory tiers demotes through it: bytes intact after a round trip down
    cfg = KvferryConfig(store={"slot_size": SLOT, "evict_start_threshold": 1.0, "evict_ratio": 0})
    tiers = [
        MemoryTier.sized(2, label="a", slot_size=SLOT),
        MemoryTier.sized(8, label="b", slot_size=SLOT),
    ]
    with TieredStore(cfg, tiers=tiers) as store:
        values = [bytes([i]) * (i + 1) for i in range(5)]
        store.put([key(i) for i in range(5)], values)
        assert store.stats().tiers["a"].demotions == 3
        outs = [memoryview(bytearray(SLOT)) for _ in range(5)]
        lengths = store.get([key(i) for i in range(5)], outs)
        assert [bytes(o[:n]) for o, n in zip(outs, lengths)] == values  # type: ignore[misc]


def test_config_is_validated_like_a_config_section() -> None:
    """A local model with the config sections' settings: unknown keys, a wrong type and a change
    after construction are refused (kvferry.config's private base is not imported)."""
    with pytest.raises(ValidationError, match="extra"):
        MemoryTierConfig(capacity_blocks=2, capacity=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        MemoryTierConfig(capacity_blocks="many")  # type: ignore[arg-type]
    cfg = MemoryTierConfig(capacity_blocks=2)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.capacity_blocks = 3  # type: ignore[misc]
