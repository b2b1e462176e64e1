"""The mooncake tier against a real ``mooncake_master`` and real Mooncake Store clients: the
conformance kit, NO_SPACE when the pool is full, two clients sharing blocks, batches with
repeated keys, bad input, a closed tier, an unreachable master, a missing wheel, and the
``mooncake_master`` helper itself.

One master serves the module (eviction off, so a full pool answers NO_SPACE instead of evicting
in the background). Each tier is a Mooncake client with its own segment; closing one unmounts the
segment and drops the objects in it, which is what makes each kit tier start empty. A client
lives at least ~2 s (Mooncake's shutdown), so tests share tiers where they can.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Iterator

import pytest

from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.cpu import CpuTier
from kvferry.backends.mooncake import MooncakeTier, describe_code, object_name
from kvferry.backends.mooncake_master import MooncakeMaster, find_master_binary, free_port
from kvferry.backends.registry import create_tier
from kvferry.config.models import CpuTierConfig, KvferryConfig, MooncakeTierConfig, StoreConfig
from kvferry.errors import ConfigError, MissingDependency, StorageError
from kvferry.store import TieredStore
from kvferry.testing.hang import hung
from kvferry.testing.tier_kit import check_tier, key, value

pytestmark = pytest.mark.mooncake

SLOT = 4096
SEGMENT = 16 << 20  # Mooncake's smallest segment


def _require_mooncake() -> None:
    try:
        importlib.import_module("mooncake.store")
    except ImportError as e:
        pytest.fail(
            f"mooncake is not importable ({e}); the mooncake tests need the "
            "mooncake-transfer-engine-non-cuda wheel: pip install 'kvferry[mooncake]' "
            "(the test command installs it)",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def master() -> Iterator[MooncakeMaster]:
    _require_mooncake()
    # Eviction off: no background eviction at a high watermark, and none after a put that
    # found no room (which otherwise evicts eviction_ratio = 5% of the unleased objects).
    evict_off = ["--eviction_high_watermark_ratio=1.0", "--eviction_ratio=0.0"]
    with MooncakeMaster.start(extra_args=evict_off) as m:
        yield m


def _config(master: MooncakeMaster, **kwargs: float | str) -> MooncakeTierConfig:
    fields: dict[str, float | str] = {
        "master_address": master.address,
        "global_segment_size": SEGMENT,
        "local_buffer_size": 1 << 20,
    }
    fields.update(kwargs)
    return MooncakeTierConfig.model_validate(fields)


def _tier(master: MooncakeMaster, slot: int = SLOT, **kwargs: float | str) -> MooncakeTier:
    return MooncakeTier(_config(master, **kwargs), TierContext(slot_size=slot, label="mc"))


@pytest.fixture(scope="module")
def tier(master: MooncakeMaster) -> Iterator[MooncakeTier]:
    """A tier shared by the tests that neither fill nor close it (each uses its own salt)."""
    t = _tier(master)
    try:
        yield t
    finally:
        t.close()


def test_conformance_kit(master: MooncakeMaster) -> None:
    check_tier(lambda: _tier(master), slot_size=SLOT)


def test_full_pool_answers_no_space_and_keeps_what_it_stored(master: MooncakeMaster) -> None:
    slot = 64 << 10
    # 16 MiB of segment, 20 MiB of blocks: the tail cannot fit (eviction is off).
    n = 320
    t = _tier(master, slot=slot, local_buffer_size=4 << 20)
    try:
        keys = [key(i, 31) for i in range(n)]
        status = t.put(keys, [value(i, slot) for i in range(n)])
        stored = [i for i, s in enumerate(status) if s is PutStatus.STORED]
        refused = [i for i, s in enumerate(status) if s is PutStatus.NO_SPACE]
        assert len(stored) + len(refused) == n, f"only STORED/NO_SPACE expected: {set(status)}"
        assert refused, "20 MiB of blocks went into a 16 MiB pool without NO_SPACE"
        assert len(stored) * slot <= SEGMENT
        assert t.contains([keys[i] for i in refused]) == [False] * len(refused)
        outs = [memoryview(bytearray(slot)) for _ in stored]
        assert t.get([keys[i] for i in stored], outs) == [slot] * len(stored)
        for i, out in zip(stored, outs):
            assert bytes(out) == value(i, slot), f"block {i} changed by a put into a full pool"
        assert t.stats().extra["no_space_blocks"] == len(refused)
        assert t.delete([keys[i] for i in stored]) == len(stored)
        assert t.put([keys[refused[0]]], [value(refused[0], slot)]) == [PutStatus.STORED]
    finally:
        t.close()


def test_two_clients_share_blocks(master: MooncakeMaster, tier: MooncakeTier) -> None:
    config = KvferryConfig.model_validate(
        {"store": {"slot_size": SLOT}, "mooncake": _config(master).model_dump()}
    )
    other = create_tier("mooncake", config)
    try:
        assert isinstance(other, MooncakeTier) and other.shared and other.label == "mooncake"
        keys = [key(i, 41) for i in range(6)]
        vals = [value(i + 1000, SLOT - i) for i in range(6)]
        assert tier.put(keys, vals) == [PutStatus.STORED] * 6
        assert other.contains(keys) == [True] * 6, "a block put by one client is seen by another"
        assert other.put(keys[:1], [vals[0]]) == [PutStatus.EXISTS]
        outs = [memoryview(bytearray(SLOT)) for _ in keys]
        assert other.get(keys, outs) == [len(v) for v in vals]
        assert [bytes(o[: len(v)]) for o, v in zip(outs, vals)] == vals
        assert other.delete(keys[:3]) == 3
        assert tier.contains(keys) == [False] * 3 + [True] * 3
        assert tier.delete(keys) == 3
    finally:
        other.close()


def test_repeated_key_in_one_batch_stores_the_first_copy(tier: MooncakeTier) -> None:
    k, j = key(1, 51), key(2, 51)
    status = tier.put([k, j, k], [value(1, 100), value(2, 100), value(3, 100)])
    assert status == [PutStatus.STORED, PutStatus.STORED, PutStatus.EXISTS]
    out = memoryview(bytearray(SLOT))
    assert tier.get([k], [out]) == [100]
    assert bytes(out[:100]) == value(1, 100)
    assert tier.delete([k, k, j]) == 2


def test_bad_values_raise_before_storing(tier: MooncakeTier) -> None:
    k = key(1, 61)
    with pytest.raises(ValueError, match="slot_size"):
        tier.put([key(0, 61), k], [value(0, 10), b"z" * (SLOT + 1)])
    with pytest.raises(ValueError, match="1 to"):
        tier.put([k], [b""])
    with pytest.raises(ValueError, match="keys"):
        tier.put([k], [])
    assert tier.contains([key(0, 61), k]) == [False, False]
    assert tier.contains([]) == [] and tier.get([], []) == [] and tier.delete([]) == 0


def test_values_of_other_buffer_types(tier: MooncakeTier) -> None:
    k1, k2 = key(1, 71), key(2, 71)
    words = memoryview(bytearray(value(7, 256))).cast("I")  # a non-byte format
    assert tier.put([k1, k2], [bytearray(b"abc"), words]) == [PutStatus.STORED] * 2
    outs = [memoryview(bytearray(SLOT)), memoryview(bytearray(SLOT))]
    assert tier.get([k1, k2], outs) == [3, 256]
    assert bytes(outs[0][:3]) == b"abc" and bytes(outs[1][:256]) == value(7, 256)
    tier.delete([k1, k2])


def test_shared_tier_facts_and_names(tier: MooncakeTier) -> None:
    assert tier.capacity_blocks is None
    with pytest.raises(NotImplementedError):
        tier.keys()
    assert object_name(bytes(range(16))) == "kvferry:000102030405060708090a0b0c0d0e0f"
    assert describe_code(-200).startswith("-200 NO_AVAILABLE_HANDLE")
    assert "UNKNOWN" in describe_code(-12345)
    assert describe_code(-901).startswith("-901 RPC_TIMEOUT"), "a hung master's answer"
    before = tier.stats().used_blocks
    assert tier.put([key(1, 81)], [value(1, 64)]) == [PutStatus.STORED]
    assert tier.used_blocks == before + 1
    assert tier.delete([key(1, 81)]) == 1
    assert tier.stats().used_blocks == before


def test_closed_tier_raises_instead_of_crashing(master: MooncakeMaster) -> None:
    t = _tier(master)
    assert t.put([key(1, 91)], [value(1, 64)]) == [PutStatus.STORED]
    t.close()
    t.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        t.contains([key(1, 91)])
    with pytest.raises(StorageError, match="closed"):
        t.get([key(1, 91)], [memoryview(bytearray(SLOT))])


def test_unreachable_master_is_a_storage_error(master: MooncakeMaster) -> None:
    # Mooncake's own setup would retry for ~90 s; the tier probes the master's port first.
    with pytest.raises(StorageError, match="not reachable"):
        _tier(master, master_address=f"127.0.0.1:{free_port()}")


def test_a_hung_master_costs_one_rpc_timeout_then_the_store_skips_it() -> None:
    # SIGSTOP the master: each call waits mooncake.rpc_timeout (Mooncake's own default is
    # 30 s), after which the store's circuit breaker skips the tier until a probe finds it.
    _require_mooncake()
    with MooncakeMaster.start() as master:
        now = [1000.0]
        cfg = KvferryConfig(
            store=StoreConfig(slot_size=SLOT, tiers=["cpu", "mooncake"], breaker_failures=1)
        )
        remote = _tier(master, rpc_timeout=1.0)
        cpu = CpuTier(CpuTierConfig(buffer_number=8), TierContext(slot_size=SLOT))
        with TieredStore(cfg, tiers=[cpu, remote], clock=lambda: now[0]) as store:
            k = key(1, 99)
            assert remote.put([k], [value(1, SLOT)]) == [PutStatus.STORED]
            out = memoryview(bytearray(SLOT))
            with hung(master.proc.pid):
                # a key this client never saw (it may answer for the ones it just put)
                t0 = time.monotonic()
                assert store.lookup([key(2, 99)]) == 0
                took = time.monotonic() - t0
                assert took < 1.6, f"a lookup took {took:.1f}s against rpc_timeout 1s"
                assert store.stats().tiers["mc"].errors == 1, "the master did not answer"
                t0 = time.monotonic()
                assert store.get([k], [out]) == [None] and store.lookup([k]) == 0
                took = time.monotonic() - t0
                assert took < 0.5, f"calls took {took:.1f}s with the breaker open"
            now[0] += cfg.store.breaker_open_seconds
            assert store.get([k], [out]) == [SLOT] and bytes(out) == value(1, SLOT)
            st = store.stats().tiers["mc"]
            assert (st.errors, st.breaker_opens, st.breaker_closes, st.breaker_skipped) == (
                1,
                1,
                1,
                2,
            )


def test_bad_sizes_are_config_errors(master: MooncakeMaster) -> None:
    with pytest.raises(ConfigError, match="local_buffer_size"):
        _tier(master, local_buffer_size=SLOT - 1)
    with pytest.raises(ConfigError, match="global_segment_size"):
        _tier(master, global_segment_size=1 << 20)


def test_missing_wheel_names_the_extra(
    master: MooncakeMaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mooncake.store", None)  # makes the import fail
    with pytest.raises(MissingDependency, match=r"kvferry\[mooncake\]"):
        _tier(master)


def test_master_helper_starts_and_stops_a_real_master() -> None:
    _require_mooncake()
    assert find_master_binary().endswith("mooncake_master")
    m = MooncakeMaster.start()
    try:
        assert m.alive() and m.rpc_port != m.metrics_port
    finally:
        m.close()
    assert not m.alive()
    m.close()  # idempotent
    assert f"Master service started on port {m.rpc_port}" in m.log()
