"""TieredStore over real tiers: lookup, placement, eviction, leases, two-phase API, threads."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest

from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.cpu import CpuTier
from kvferry.backends.disk import DiskTier
from kvferry.config.models import CpuTierConfig, DiskTierConfig, KvferryConfig, StoreConfig
from kvferry.errors import LeaseExpired, StorageError
from kvferry.index.hashing import BlockHasher
from kvferry.observe.trace import Tracer
from kvferry.store import TieredStore
from kvferry.testing.tier_kit import key, value

SLOT = 1024


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def dram(n: int, label: str = "cpu") -> CpuTier:
    return CpuTier(CpuTierConfig(buffer_number=n), TierContext(slot_size=SLOT, label=label))


def make_store(*sizes: int, clock: Clock | None = None, **store: object) -> TieredStore:
    cfg = KvferryConfig(store=StoreConfig(slot_size=SLOT, tiers=["cpu"], **store))  # type: ignore[arg-type]
    tiers = [dram(n, "cpu" if i == 0 else f"cpu{i}") for i, n in enumerate(sizes)]
    return TieredStore(cfg, tiers=tiers, clock=clock or Clock())


def keys(n: int, salt: int = 0) -> list[bytes]:
    return [key(i, salt) for i in range(n)]


def vals(n: int, size: int = SLOT) -> list[bytes]:
    return [value(i, size) for i in range(n)]


def read(store: TieredStore, ks: list[bytes]) -> list[bytes | None]:
    outs = [memoryview(bytearray(SLOT)) for _ in ks]
    got = store.get(ks, outs)
    return [None if n is None else bytes(o[:n]) for o, n in zip(outs, got)]


def test_put_get_lookup_roundtrip() -> None:
    with make_store(64) as store:
        ks, vs = keys(10), vals(10)
        assert store.put(ks, vs) == [PutStatus.STORED] * 10
        assert store.put(ks[:2], vs[:2]) == [PutStatus.EXISTS] * 2
        assert read(store, ks) == vs
        assert store.lookup(ks) == 10
        assert store.lookup([*ks[:3], key(99), *ks[4:]]) == 3
        assert store.lookup([]) == 0
        st = store.stats()
        assert (st.lookup_blocks, st.hit_blocks) == (20, 13)
        assert st.hit_rate == pytest.approx(13 / 20)
        assert st.request_hit_rate_mean == pytest.approx((1 + 3 / 10) / 3)


def test_two_phase_calls_count_as_gets_and_puts_once() -> None:
    with make_store(64) as store:
        handle = store.prepare_store(keys(4))
        for i in handle.pending():
            buf = handle.buffers[i]
            assert buf is not None
            buf[:] = vals(4)[i]
        store.complete_store(handle)
        store.complete_store(store.prepare_store(keys(2)))  # nothing to write: still a put
        loaded = store.prepare_load([*keys(4), key(99)])
        store.complete_load(loaded)
        # A front end serving one request through several calls counts it once.
        t0 = time.perf_counter_ns()
        store.get(keys(2), [memoryview(bytearray(SLOT)) for _ in range(2)], count=False)
        store.complete_load(store.prepare_load(keys(1), count=False))
        store.count_get(3, 2, t0)
        store.count_lookup(5, 4, t0)
        st = store.stats()
        assert (st.puts, st.put_blocks, st.put_latency.count) == (2, 6, 2)
        assert (st.gets, st.get_blocks, st.get_hit_blocks, st.get_latency.count) == (2, 8, 6, 2)
        assert (st.lookups, st.lookup_blocks, st.hit_blocks) == (1, 5, 4)
        assert st.request_hit_rate_mean == pytest.approx(0.8)
        # The tier's traffic counts every call: 4 + 1 blocks lent, 2 copied.
        assert st.tiers["cpu"].bytes_out == 7 * SLOT


def test_bad_input_is_refused_before_anything_is_stored() -> None:
    with make_store(8) as store:
        with pytest.raises(ValueError, match=r"larger than store\.slot_size"):
            store.put([key(1), key(2)], [b"x", b"y" * (SLOT + 1)])
        assert store.lookup([key(1)]) == 0
        with pytest.raises(ValueError, match="hashes but"):
            store.put([key(1)], [])
        with pytest.raises(ValueError, match="unknown tier"):
            store.lookup([key(1)], tier="ssd")


def test_eviction_at_high_watermark_drops_lru_without_lower_tier() -> None:
    with make_store(20, evict_start_threshold=0.9, evict_ratio=0.1) as store:
        ks, vs = keys(18), vals(18)
        store.put(ks, vs)
        assert read(store, ks[:1]) == vs[:1]  # key 0 is now most recent
        store.put([key(100)], [value(100, SLOT)])  # 19 > 18 = 0.9 * 20: evict 2 (10%)
        st = store.stats()
        assert st.tiers["cpu"].evictions == 2
        assert store.contains([ks[0], ks[1], ks[2], ks[3]]) == [True, False, False, True]
        assert read(store, [key(100)]) == [value(100, SLOT)]


def test_eviction_demotes_to_the_next_tier_and_hits_promote() -> None:
    with make_store(10, 40, evict_start_threshold=0.8, evict_ratio=0.2) as store:
        ks, vs = keys(30), vals(30)
        for i in range(0, 30, 5):
            store.put(ks[i : i + 5], vs[i : i + 5])
        st = store.stats()
        assert st.tiers["cpu"].demotions == st.tiers["cpu"].evictions > 0
        assert store.lookup(ks) == 30, "nothing may be lost while the lower tier has room"
        assert store.lookup(ks, tier="cpu") == 0  # the oldest went down
        assert read(store, ks[:5]) == vs[:5]
        assert store.stats().tiers["cpu"].promotions == 5
        assert store.lookup(ks[:5], tier="cpu") == 5, "a hit below promotes into the first tier"
        assert read(store, ks) == vs


def test_write_through_puts_every_tier() -> None:
    with make_store(10, 10, write_policy="write_through") as store:
        store.put(keys(4), vals(4))
        assert store.lookup(keys(4), tier="cpu") == 4
        assert store.lookup(keys(4), tier="cpu1") == 4


def test_pinned_blocks_are_never_evicted_and_no_space_is_reported() -> None:
    with make_store(10, evict_start_threshold=1.0, evict_ratio=0.5) as store:
        ks, vs = keys(10), vals(10)
        assert store.put(ks, vs) == [PutStatus.STORED] * 10
        handle = store.prepare_load(ks[:7])
        assert handle.n == 7
        status = store.put(keys(10, salt=5), vals(10))
        # only 3 slots can ever free up (the 7 pinned ones cannot): most of 10 cannot fit
        assert status.count(PutStatus.NO_SPACE) >= 7 - 3
        assert store.contains(ks[:7]) == [True] * 7, "a pinned block was evicted"
        assert store.stats().usage["cpu"].used_blocks == 10
        for i, b in enumerate(handle.buffers):
            assert bytes(b) == value(i, SLOT), "a pinned block's bytes changed"
        store.complete_load(handle)
        assert store.put(keys(3, salt=6), vals(3)) == [PutStatus.STORED] * 3


def test_lease_expiry_unpins_a_vanished_loader() -> None:
    clock = Clock()
    with make_store(4, clock=clock, lease_seconds=5, evict_start_threshold=1.0) as store:
        store.put(keys(4), vals(4))
        handle = store.prepare_load(keys(4))
        assert store.put([key(50)], [b"x"]) == [PutStatus.NO_SPACE]
        clock.now += 6
        assert store.put([key(50)], [b"x"]) == [PutStatus.STORED]
        assert store.stats().leases_expired == 1
        with pytest.raises(LeaseExpired, match="expired"):
            store.complete_load(handle)


def test_two_phase_store_publishes_only_ok_blocks() -> None:
    with make_store(8) as store:
        ks = keys(3)
        store.put(ks[:1], vals(1))
        handle = store.prepare_store(ks, [SLOT, 100, 200])
        assert handle.status == [PutStatus.EXISTS, PutStatus.STORED, PutStatus.STORED]
        assert handle.pending() == [1, 2]
        assert store.lookup(ks) == 1, "reserved blocks are invisible until complete"
        for i in handle.pending():
            buf = handle.buffers[i]
            assert buf is not None
            buf[:] = value(i, len(buf))
        final = store.complete_store(handle, [True, True, False])
        assert final == [PutStatus.EXISTS, PutStatus.STORED, PutStatus.NO_SPACE]
        assert store.contains(ks) == [True, True, False]
        assert read(store, ks[1:2]) == [value(1, 100)]
        with pytest.raises(LeaseExpired, match="already completed"):
            store.complete_store(handle)
        assert store.stats().usage["cpu"].used_blocks == 2


def test_abandoned_store_lease_frees_its_slots() -> None:
    clock = Clock()
    with make_store(4, clock=clock, lease_seconds=1) as store:
        handle = store.prepare_store(keys(4))
        assert store.stats().usage["cpu"].used_blocks == 4
        clock.now += 2
        assert store.stats().usage["cpu"].used_blocks == 0
        with pytest.raises(LeaseExpired):
            store.complete_store(handle)
        assert store.lookup(keys(4)) == 0


def test_delete_while_pinned_frees_at_unpin() -> None:
    with make_store(4) as store:
        store.put(keys(2), vals(2))
        handle = store.prepare_load(keys(2))
        assert store.delete(keys(2)) == 2
        assert store.lookup(keys(2)) == 0
        assert bytes(handle.buffers[0]) == value(0, SLOT), "a lent view survives a delete"
        assert store.stats().usage["cpu"].used_blocks == 2
        store.complete_load(handle)
        assert store.stats().usage["cpu"].used_blocks == 0


def test_tenants_never_share_blocks() -> None:
    a, b = BlockHasher(4, cache_salt="tenant-a"), BlockHasher(4, cache_salt="tenant-b")
    tokens = list(range(16))
    with make_store(16) as store:
        ha = a.hashes(tokens)
        store.put(ha, [b"secret-a"] * len(ha))
        hb = b.hashes(tokens)
        assert store.lookup(hb) == 0
        assert store.get(hb, [memoryview(bytearray(SLOT)) for _ in hb]) == [None] * len(hb)


def test_async_forms() -> None:
    with make_store(8) as store:
        fut = store.put_async(keys(2), vals(2))
        assert fut.result(timeout=5) == [PutStatus.STORED] * 2
        outs = [memoryview(bytearray(SLOT)) for _ in range(2)]
        assert store.get_async(keys(2), outs).result(timeout=5) == [SLOT, SLOT]
        handle = store.prepare_load_async(keys(2)).result(timeout=5)
        assert handle.n == 2 and handle.done()
        store.complete_load(handle)


def test_closed_store_refuses() -> None:
    store = make_store(4)
    store.close()
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.put(keys(1), vals(1))


def test_threads_hammer_puts_gets_evictions_without_a_wrong_byte() -> None:
    """Several threads put, get, load and delete over a small two-tier store that evicts all
    the time; every byte read must be the block's own bytes."""
    errors: list[BaseException] = []
    with make_store(24, 48, evict_start_threshold=0.8, evict_ratio=0.1) as store:

        def work(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(150):
                    ids = rng.sample(range(120), 6)
                    ks = [key(i, 9) for i in ids]
                    op = rng.random()
                    if op < 0.4:
                        store.put(ks, [value(i, SLOT - i) for i in ids])
                    elif op < 0.8:
                        outs = [memoryview(bytearray(SLOT)) for _ in ks]
                        for i, o, n in zip(ids, outs, store.get(ks, outs)):
                            if n is not None and bytes(o[:n]) != value(i, SLOT - i):
                                raise AssertionError(f"block {i} read back wrong")
                    elif op < 0.95:
                        h = store.prepare_load(ks)
                        for i, b in zip(ids, h.buffers):
                            if bytes(b) != value(i, SLOT - i):
                                raise AssertionError(f"loaded block {i} wrong")
                        store.complete_load(h)
                    else:
                        store.delete(ks[:2])
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        st = store.stats()
        assert st.tiers["cpu"].evictions > 0
        assert st.leases_active == 0
        assert st.usage["cpu"].used_blocks <= 24


def test_trace_file_records_puts_gets_and_evictions(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    with make_store(4, trace_file=str(path), evict_start_threshold=0.5) as store:
        store.put(keys(4), vals(4))
        store.put(keys(2, salt=1), vals(2))  # past the high watermark: evicts
        read(store, keys(2))
        handle = store.prepare_load(keys(1, salt=1))
        store.complete_load(handle)
    events = json.loads(path.read_text())
    names = {e.get("name") for e in events}
    assert {"put", "get", "evict", "complete_load"} <= names
    spans = [e for e in events if e.get("ph") == "X"]
    assert spans and all(e["dur"] >= 0 for e in spans)


def test_a_tracer_given_is_used_and_left_open(tmp_path: Path) -> None:
    """The store records into the tracer it is handed (a sink shared with other components)
    and leaves closing it to the caller; ``store.trace_file`` is then not opened."""
    path = tmp_path / "shared.json"
    unused = tmp_path / "unused.json"
    tracer = Tracer(str(path))
    cfg = KvferryConfig(store=StoreConfig(slot_size=SLOT, trace_file=str(unused)))
    with TieredStore(cfg, tiers=[dram(4, "cpu")], tracer=tracer) as store:
        store.put(keys(2), vals(2))
    assert not tracer.closed
    tracer.instant("after", "test")  # still open: the store did not close it
    tracer.close()
    names = {e.get("name") for e in json.loads(path.read_text())}
    assert {"put", "after"} <= names
    assert not unused.exists()


def test_attached_things_close_with_the_store_before_its_tiers() -> None:
    order: list[str] = []

    class Probe:
        def __init__(self, name: str) -> None:
            self.name = name

        def close(self) -> None:
            order.append(self.name)

    class Broken:
        def close(self) -> None:
            order.append("broken")
            raise RuntimeError("boom")

    store = make_store(4)
    store.attach(Probe("first"))
    store.attach(Broken())  # an isolation boundary: the others still close
    store.attach(Probe("last"))
    store.close()
    assert order == ["last", "broken", "first"]
    store.close()  # idempotent: nothing closed twice
    assert order == ["last", "broken", "first"]
    with pytest.raises(StorageError, match="closed"):
        store.attach(Probe("late"))


def cpu_over_disk(path: Path | None, cpu: int, disk: int, **store: object) -> TieredStore:
    """A cpu tier of ``cpu`` slots over a disk tier of ``disk`` slots in ``path`` (None: no
    disk.path, a private tier)."""
    cfg = KvferryConfig(store=StoreConfig(slot_size=SLOT, **store))  # type: ignore[arg-type]
    slot_bytes = 4096 + 4096  # the disk tier's header block + the payload rounded to 4 KiB
    disk_tier = DiskTier(
        DiskTierConfig(path=str(path or ""), capacity=disk * slot_bytes, direct_io=False),
        TierContext(slot_size=SLOT, label="disk"),
    )
    return TieredStore(cfg, tiers=[dram(cpu), disk_tier])


def test_flush_writes_the_blocks_only_the_cpu_tier_holds_and_a_reopen_finds_them(
    tmp_path: Path,
) -> None:
    with cpu_over_disk(tmp_path, 16, 64) as store:
        store.put(keys(40), vals(40))
        stats = store.stats()
        only_cpu = stats.usage["cpu"].used_blocks
        assert only_cpu > 0 and stats.usage["disk"].used_blocks == 40 - only_cpu
        assert store.flush(0.0) == 0  # no time: nothing written
        demoted = stats.tiers["cpu"].demotions
        assert store.flush(30.0) == only_cpu
        assert store.stats().tiers["cpu"].demotions == demoted + only_cpu, "each counted once"
        assert store.flush(30.0) == 0  # every block is on disk now
        assert store.stats().usage["disk"].used_blocks == 40
    with cpu_over_disk(tmp_path, 16, 64) as reopened:
        assert reopened.lookup(keys(40)) == 40
        assert read(reopened, keys(40)) == vals(40)


def test_flush_writes_nothing_into_a_private_disk_tier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no disk.path: the disk tier's files go with this process, so a graceful shutdown has
    # nothing to keep there (and a server on port 0 would spend up to 30 s writing them)
    monkeypatch.setenv("HOME", str(tmp_path))
    with cpu_over_disk(None, 16, 64) as store:
        store.put(keys(40), vals(40))
        assert store.stats().usage["cpu"].used_blocks > 0
        assert store.flush(30.0) == 0


def test_flush_has_nothing_to_do_under_write_through(tmp_path: Path) -> None:
    with cpu_over_disk(tmp_path, 16, 64, write_policy="write_through") as store:
        store.put(keys(10), vals(10))
        assert store.flush(30.0) == 0
