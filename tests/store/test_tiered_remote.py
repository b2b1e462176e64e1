"""TieredStore with a real shared tier: Redis going away mid-run and coming back."""

from __future__ import annotations

import pytest

from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.cpu import CpuTier
from kvferry.backends.redis import RedisTier
from kvferry.config.models import CpuTierConfig, KvferryConfig, RedisTierConfig, StoreConfig
from kvferry.store import TieredStore
from kvferry.testing.redis_server import RedisProcesses
from kvferry.testing.tier_kit import key, value

SLOT = 1024


@pytest.mark.redis
def test_redis_down_store_keeps_serving_from_cpu_and_recovers(own_redis: RedisProcesses) -> None:
    redis = own_redis()
    cfg = KvferryConfig(
        store=StoreConfig(slot_size=SLOT, tiers=["cpu", "redis"], write_policy="write_through")
    )
    tiers = [
        CpuTier(CpuTierConfig(buffer_number=10), TierContext(slot_size=SLOT)),
        RedisTier(
            RedisTierConfig(url=redis.url, key_prefix="t:", socket_timeout=0.5),
            TierContext(slot_size=SLOT),
        ),
    ]
    with TieredStore(cfg, tiers=tiers) as store:
        ks = [key(i) for i in range(12)]
        assert store.put(ks[:6], [value(i, SLOT) for i in range(6)]) == [PutStatus.STORED] * 6
        redis.stop()
        # puts still land in cpu; the redis tier's failures are counted, not raised
        assert store.put(ks[6:8], [value(i, SLOT) for i in range(6, 8)]) == [PutStatus.STORED] * 2
        outs = [memoryview(bytearray(SLOT)) for _ in range(8)]
        assert store.get(ks[:8], outs) == [SLOT] * 8
        assert all(bytes(o) == value(i, SLOT) for i, o in enumerate(outs))
        assert store.lookup(ks) == 8, "the missing tail reads as a miss, not an error"
        assert store.stats().tiers["redis"].errors >= 2
        redis.start()
        # recovered: blocks evicted from cpu are found in redis again
        more = [key(i, 1) for i in range(8)]
        store.put(more, [value(100 + i, SLOT) for i in range(8)])
        assert store.lookup(more) == 8
        assert store.lookup(ks[:8], tier="cpu") < 8, "some of the first blocks left cpu"
        assert store.lookup(ks[:8]) == 8, "evicted blocks went down to redis, none was lost"
        out = memoryview(bytearray(SLOT))
        assert store.get(more[:1], [out]) == [SLOT] and bytes(out) == value(100, SLOT)
        st = store.stats()
        assert st.tiers["cpu"].evictions > 0
        assert st.tiers["redis"].blocks_in >= 8
