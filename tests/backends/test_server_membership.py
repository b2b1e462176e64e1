"""Store-server membership on Redis leases, and partial failure of the server tier.

Real redis-server, real store server processes (``kvferry serve store --register``), real
SIGKILL. Deadlines below only bound a wait for something that must happen (a hang guard); no
assertion is about how fast it happened.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis as redis_py

from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.cpu import CpuTier
from kvferry.backends.server.client import ServerTier
from kvferry.backends.server.membership import (
    Registration,
    lease_key,
    members_key,
    read_members,
)
from kvferry.config.models import CpuTierConfig, KvferryConfig, ServerTierConfig, StoreConfig
from kvferry.errors import StorageError
from kvferry.store import TieredStore
from kvferry.testing.store_server import StoreServerProcess
from kvferry.testing.tier_kit import key, value

pytestmark = pytest.mark.redis

SLOT = 4096
TTL = 1.0


@pytest.fixture
def prefix() -> str:
    """A membership prefix of this test's own in the session's redis-server."""
    return f"kvferry:test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def servers(redis_server: str, prefix: str) -> Iterator[Callable[..., StoreServerProcess]]:
    """Start registered store servers (killed at teardown)."""
    started: list[StoreServerProcess] = []

    def start(port: int = 0) -> StoreServerProcess:
        s = StoreServerProcess(
            "--register",
            redis_server,
            "--set",
            f"server.membership_key={prefix}",
            "--set",
            f"server.membership_ttl={TTL}",
            port=port,
            slot_size=SLOT,
        )
        started.append(s)
        return s.start()

    yield start
    for s in started:
        s.kill()


def tier(redis_server: str, prefix: str, transport: str = "tcp", poll: float = 60) -> ServerTier:
    cfg = ServerTierConfig(
        membership_url=redis_server,
        membership_key=prefix,
        membership_poll=poll,
        transport=transport,
        timeout=2.0,
    )
    return ServerTier(cfg, TierContext(slot_size=SLOT))


def members(url: str, prefix: str) -> set[str]:
    return set(read_members(url, prefix, timeout=2.0))


def wait_for(what: str, cond: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {seconds}s")
        time.sleep(0.05)


def test_join_leave_and_ttl_expiry_after_kill(
    redis_server: str, prefix: str, servers: Callable[..., StoreServerProcess]
) -> None:
    a, b = servers(), servers()
    assert members(redis_server, prefix) == {a.address, b.address}
    raw = redis_py.Redis.from_url(redis_server)
    try:
        # Each lease carries a TTL of Redis's own (no timestamps to compare between machines).
        assert 0 < raw.pttl(lease_key(prefix, a.address)) <= TTL * 1000
        view = tier(redis_server, prefix, poll=0.1)
        try:
            assert view._ring.members == sorted([a.address, b.address])
            a.stop()  # clean shutdown: the lease is deleted at once, not left to expire
            assert raw.exists(lease_key(prefix, a.address)) == 0
            assert raw.sismember(members_key(prefix), a.address) == 0
            assert members(redis_server, prefix) == {b.address}
            wait_for("the client sees A leave", lambda: view._ring.members == [b.address])
        finally:
            view.close()
        b.kill()  # SIGKILL: nobody deletes the lease, Redis expires it
        wait_for("B's lease expires", lambda: raw.exists(lease_key(prefix, b.address)) == 0)
        assert members(redis_server, prefix) == set()
        assert raw.scard(members_key(prefix)) == 0, "a reader prunes members without a lease"
    finally:
        raw.close()


def test_a_lapsed_lease_and_a_lost_set_entry_come_back(redis_server: str, prefix: str) -> None:
    # The refresh SETs (not PEXPIREs) the lease and re-SADDs the member: a lease lost to a Redis
    # restart, or a set entry a client pruned in a race with a restart, heals by itself.
    reg = Registration(redis_server, prefix, "10.0.0.9:1234", ttl=0.6)
    raw = redis_py.Redis.from_url(redis_server)
    try:
        reg.start()
        raw.delete(lease_key(prefix, reg.member))
        raw.srem(members_key(prefix), reg.member)
        assert members(redis_server, prefix) == set()
        wait_for("the lease is back", lambda: members(redis_server, prefix) == {reg.member})
        assert raw.get(lease_key(prefix, reg.member)) == reg.instance.encode()
    finally:
        reg.close()
        raw.close()
    assert members(redis_server, prefix) == set()


def _fill(view: ServerTier, n: int, base: int = 0) -> list[bytes]:
    keys = [key(base + i) for i in range(n)]
    assert view.put(keys, [value(base + i, 256) for i in range(n)]) == [PutStatus.STORED] * n
    return keys


@pytest.mark.parametrize("transport", ["tcp", "auto"])
def test_a_batch_across_a_dead_server_returns_the_live_part(
    redis_server: str, prefix: str, servers: Callable[..., StoreServerProcess], transport: str
) -> None:
    a, b = servers(), servers()
    view = tier(redis_server, prefix, transport)
    try:
        keys = _fill(view, 1000)
        on_a = set(view._ring.split(keys)[a.address])
        assert 300 < len(on_a) < 700, "the ring spreads the keys over both servers"
        b.kill()
        outs = [memoryview(bytearray(SLOT)) for _ in keys]
        got = view.get(keys, outs)  # no exception: B's blocks are misses
        assert {i for i, n in enumerate(got) if n is not None} == on_a
        for i in on_a:
            assert bytes(outs[i][: got[i] or 0]) == value(i, 256)
        # Out of view right after that one failed call, without waiting for the lease's TTL.
        assert view.down_members() == [b.address]
        assert view._ring.members == [a.address]
        stats = view.stats()
        assert stats.extra["down_misses"] == 1000 - len(on_a)
        assert stats.extra["servers_down"] == 1
        assert view.contains(keys) == [i in on_a for i in range(len(keys))]
        assert view.stats().extra["failed_calls"] == 1, "B was not asked again"
        assert set(view.keys()) == {keys[i] for i in on_a}
    finally:
        view.close()


def test_puts_for_a_dead_server_go_to_the_next_live_owner(
    redis_server: str, prefix: str, servers: Callable[..., StoreServerProcess]
) -> None:
    a, b = servers(), servers()
    view = tier(redis_server, prefix)
    try:
        b.kill()
        # The first call finds B dead mid-batch: its share goes to A in the same call.
        keys = [key(i) for i in range(200)]
        on_b = len(view._ring.split(keys)[b.address])
        vals = [value(i, 256) for i in range(200)]
        assert view.put(keys, vals) == [PutStatus.STORED] * 200
        assert view.stats().extra["put_rerouted"] == on_b
        # Later puts skip B outright; every block is readable from A.
        more = _fill(view, 100, base=1000)
        outs = [memoryview(bytearray(SLOT)) for _ in range(300)]
        got = view.get(keys + more, outs)
        assert None not in got
        assert bytes(outs[0][:256]) == vals[0]
        assert set(view.keys()) == set(keys + more)
        assert view.stats().extra["put_dropped"] == 0
        # With no live server left, a call is an error of the tier (the store's breaker).
        a.kill()
        with pytest.raises(StorageError, match="store server"):
            view.get(keys[:10], outs[:10])
        with pytest.raises(StorageError, match="store server"):
            view.put(keys[:1], vals[:1])
    finally:
        view.close()


def test_a_restarted_server_rejoins(
    redis_server: str, prefix: str, servers: Callable[..., StoreServerProcess]
) -> None:
    a, b = servers(), servers()
    view = tier(redis_server, prefix, poll=0.1)
    try:
        keys = _fill(view, 200)
        b_keys = [keys[i] for i in view._ring.split(keys)[b.address]]
        b.kill()
        assert view.contains(b_keys) == [False] * len(b_keys)
        assert view.down_members() == [b.address]
        b.start()  # same port, a new instance (and an empty pool)
        # Rejoined: not marked down, and in the ring (B's old lease may have expired first, so
        # that B had left the member list, which also clears its down mark, until a poll sees it).
        both = sorted([a.address, b.address])
        wait_for("B rejoins", lambda: view.down_members() == [] and view._ring.members == both)
        assert view.put(b_keys, [b"x" * 64] * len(b_keys)) == [PutStatus.STORED] * len(b_keys)
        stats = view.server_stats()
        assert stats[b.address]["usage"]["cpu"]["used_blocks"] == len(b_keys)
    finally:
        view.close()


def test_a_store_prefix_lookup_across_a_dead_server_is_cut_at_its_first_block(
    redis_server: str, prefix: str, servers: Callable[..., StoreServerProcess]
) -> None:
    a, b = servers(), servers()
    remote = tier(redis_server, prefix)
    cpu = CpuTier(CpuTierConfig(buffer_number=4), TierContext(slot_size=SLOT))
    cfg = KvferryConfig(store=StoreConfig(slot_size=SLOT, tiers=["cpu", "server"]))
    with TieredStore(cfg, tiers=[cpu, remote]) as store:
        keys = _fill(remote, 100)
        owners = [remote._ring.owner(k) for k in keys]
        first_b = owners.index(b.address)
        assert store.lookup(keys) == 100
        b.kill()
        # The prefix is present up to the dead server's first block; no error, no breaker.
        assert store.lookup(keys) == first_b
        outs = [memoryview(bytearray(SLOT)) for _ in keys]
        got = store.get(keys, outs)
        assert [n is not None for n in got] == [o == a.address for o in owners]
        st = store.stats().tiers["server"]
        assert (st.errors, st.breaker_opens) == (0, 0)


def test_a_server_bound_to_every_interface_registers_the_address_it_advertises(
    redis_server: str, prefix: str
) -> None:
    # Bound to 0.0.0.0 it would register its hostname; --advertise names what clients dial.
    s = StoreServerProcess(
        "--register",
        redis_server,
        "--set",
        f"server.membership_key={prefix}",
        "--bind",
        "0.0.0.0",
        "--advertise",
        "localhost",
        slot_size=SLOT,
    ).start()
    try:
        port = s.address.rpartition(":")[2]
        assert members(redis_server, prefix) == {f"localhost:{port}"}
        view = tier(redis_server, prefix)
        try:
            assert view.put([key(1)], [value(1, SLOT)]) == [PutStatus.STORED]
            out = [memoryview(bytearray(SLOT))]
            assert view.get([key(1)], out) == [SLOT]
            assert bytes(out[0]) == value(1, SLOT)
        finally:
            view.close()
    finally:
        s.kill()
