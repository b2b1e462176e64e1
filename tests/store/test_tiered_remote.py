"""TieredStore with a real shared tier: Redis going away mid-run, hanging, and coming back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest
import redis as redis_py

from kvferry.backends.base import PutStatus, Tier, TierContext
from kvferry.backends.cpu import CpuTier
from kvferry.backends.redis import RedisTier
from kvferry.config.models import CpuTierConfig, KvferryConfig, RedisTierConfig, StoreConfig
from kvferry.store import TieredStore
from kvferry.testing.redis_server import RedisProcess, RedisProcesses
from kvferry.testing.tier_kit import key, value

SLOT = 1024
T = TypeVar("T")


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


class FakeClock:
    """The store's clock (leases, breakers): moved by the test, so an open interval passes
    when the test says, however slow the box."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cpu_redis(
    redis: RedisProcess, *, slots: int = 10, timeout: float = 1.0, **store: object
) -> tuple[KvferryConfig, list[Tier]]:
    cfg = KvferryConfig(store=StoreConfig(slot_size=SLOT, tiers=["cpu", "redis"], **store))
    tiers: list[Tier] = [
        CpuTier(CpuTierConfig(buffer_number=slots), TierContext(slot_size=SLOT)),
        RedisTier(
            RedisTierConfig(url=redis.url, key_prefix="t:", socket_timeout=timeout),
            TierContext(slot_size=SLOT),
        ),
    ]
    return cfg, tiers


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


@pytest.mark.redis
def test_hung_redis_costs_one_timeout_then_the_breaker_skips_it(own_redis: RedisProcesses) -> None:
    redis = own_redis()
    clock = FakeClock()
    cfg, tiers = _cpu_redis(redis, breaker_failures=1, breaker_open_seconds=5)
    with TieredStore(cfg, tiers=tiers, clock=clock) as store:
        local, remote, absent = key(1), key(2), key(3)
        store.put([local], [value(1, SLOT)])
        tiers[1].put([remote], [value(2, SLOT)])  # a block only redis holds
        out = memoryview(bytearray(SLOT))
        with redis.paused():
            # one put+get: the get's redis call times out once (socket_timeout 1 s)
            _, took = _timed(
                lambda: (store.put([key(4)], [value(4, SLOT)]), store.get([absent], [out]))
            )
            assert took < 1.6, f"put+get took {took:.1f}s against one 1s timeout"
            st = store.stats().tiers["redis"]
            assert (st.errors, st.breaker_opens, st.breaker_open) == (1, 1, 1)
            errors = store.error_count()
            # breaker open: redis is skipped at once; the cpu tier serves as before
            for _ in range(3):
                got, took = _timed(
                    lambda: store.get([local, remote], [out, memoryview(bytearray(SLOT))])
                )
                assert got == [SLOT, None] and bytes(out) == value(1, SLOT)
                assert took < 0.5, f"a get took {took:.1f}s with the breaker open"
                (n, took) = _timed(lambda: store.lookup([local, remote]))
                assert n == 1 and took < 0.5
            st = store.stats().tiers["redis"]
            assert st.errors == 1 and st.breaker_skipped == 6
            assert store.error_count() == errors + 6, "a skipped call is not a clean miss"
            # the interval passes: one probe goes through, times out, and reopens the breaker
            clock.now += 5
            _, took = _timed(lambda: store.get([remote], [out]))
            assert 0.5 < took < 1.6, "the probe waited one timeout"
            _, took = _timed(lambda: store.get([remote], [out]))
            assert took < 0.5, "reopened: skipped again"
            st = store.stats().tiers["redis"]
            assert (st.errors, st.breaker_opens, st.breaker_open) == (2, 2, 1)
        # redis answers again; the next probe (after the doubled interval) closes the breaker
        assert store.get([remote], [out]) == [None], "still open: 10 s to the next probe"
        clock.now += 10
        assert store.get([remote], [out]) == [SLOT] and bytes(out) == value(2, SLOT)
        assert store.lookup([local, remote, absent]) == 2, "redis is asked again"
        st = store.stats().tiers["redis"]
        assert (st.breaker_closes, st.breaker_open, st.errors) == (1, 0, 2)


@pytest.mark.redis
def test_a_demotion_into_a_hung_tier_does_not_hold_up_local_gets(
    own_redis: RedisProcesses,
) -> None:
    redis = own_redis()
    # 4 slots: the 4th put passes the high watermark (3) and evicts one block into redis
    cfg, tiers = _cpu_redis(redis, slots=4, timeout=3.0, promote_on_hit=False)
    with TieredStore(cfg, tiers=tiers) as store:
        ks = [key(i) for i in range(4)]
        store.put(ks[:3], [value(i, SLOT) for i in range(3)])
        with redis.paused():
            putter = threading.Thread(target=store.put, args=(ks[3:], [value(3, SLOT)]))
            putter.start()
            try:
                deadline = time.monotonic() + 2
                while store.lookup(ks[:1], tier="cpu") and time.monotonic() < deadline:
                    time.sleep(0.01)  # until the put has evicted key 0 (its demotion hangs)
                outs = [memoryview(bytearray(SLOT)) for _ in range(2)]
                assert store.get(ks[1:3], outs) == [SLOT, SLOT]
                assert putter.is_alive(), "the local get waited for the hung demotion"
                out = memoryview(bytearray(SLOT))
                assert store.get(ks[:1], [out]) == [SLOT], "a block on its way down is served"
                assert bytes(out) == value(0, SLOT)
            finally:
                putter.join()
        st = store.stats()
        assert st.tiers["redis"].errors == 1
        assert st.tiers["cpu"].dropped == 1, "the demotion failed in flight: the block is lost"
        assert store.lookup(ks[1:]) == 3


@pytest.mark.redis
def test_a_foreign_value_under_the_prefix_is_a_miss_not_a_failed_batch(
    own_redis: RedisProcesses,
) -> None:
    redis = own_redis()
    cfg, tiers = _cpu_redis(redis, breaker_failures=1)
    with TieredStore(cfg, tiers=tiers) as store:
        good = [key(i) for i in range(3)]
        tiers[1].put(good, [value(i, SLOT) for i in range(3)])  # blocks only redis holds
        raw = redis_py.Redis(port=redis.port)
        try:
            raw.set(b"t:" + key(9), b"x" * (SLOT + 1))  # larger than any block: not ours
        finally:
            raw.close()
        ks = [good[0], key(9), good[1], good[2]]
        outs = [memoryview(bytearray(SLOT)) for _ in ks]
        assert store.get(ks, outs) == [SLOT, None, SLOT, SLOT]
        assert [bytes(outs[i]) for i in (0, 2, 3)] == [value(i, SLOT) for i in range(3)]
        st = store.stats()
        assert st.usage["redis"].extra["foreign"] == 1
        assert st.tiers["redis"].errors == 0 and st.tiers["redis"].breaker_opens == 0
