"""The store server and the server tier, over real processes, sockets and shared memory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_py

from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.cpu import CpuTier
from kvferry.backends.server import protocol as p
from kvferry.backends.server.client import ServerTier
from kvferry.backends.server.membership import lease_key, members_key
from kvferry.backends.server.ring import HashRing
from kvferry.config import load_config
from kvferry.config.models import CpuTierConfig, KvferryConfig, ServerTierConfig, StoreConfig
from kvferry.errors import ConfigError, StorageError
from kvferry.store import TieredStore
from kvferry.store.server import StoreServer
from kvferry.testing.hang import hung
from kvferry.testing.redis_server import RedisProcesses
from kvferry.testing.tier_kit import check_tier, key, value
from kvferry.transfer import handshake, wire

SLOT = 4096


class ServerProcess:
    def __init__(self, proc: subprocess.Popen[str], address: str) -> None:
        self.proc = proc
        self.address = address


def start_server(*extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    cmd = [sys.executable, "-m", "kvferry", "serve", "store", "--port", "0", "--quiet"]
    cmd += ["--tiers", "cpu", "--capacity", "1MiB", "--slot-size", str(SLOT), *extra]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("kvferry-store-ready "):
        proc.kill()
        raise AssertionError(
            f"server did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        )
    return ServerProcess(proc, line.split()[1])


@pytest.fixture
def servers() -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(*extra: str, env: dict[str, str] | None = None) -> ServerProcess:
        s = start_server(*extra, env=env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.proc.kill()
        s.proc.wait()


def client(*addresses: str, transport: str = "auto", token: str | None = None) -> ServerTier:
    cfg = ServerTierConfig(addresses=list(addresses), transport=transport, auth_token=token)  # type: ignore[arg-type]
    return ServerTier(cfg, TierContext(slot_size=SLOT))


@pytest.mark.parametrize("transport", ["tcp", "auto"])
def test_conformance_against_a_server_process(
    servers: Callable[..., ServerProcess], transport: str
) -> None:
    server = servers()

    def fresh() -> ServerTier:
        tier = client(server.address, transport=transport)
        tier.delete(tier.keys())
        return tier

    check_tier(fresh, slot_size=SLOT)


def test_shm_path_is_used_on_the_same_host(servers: Callable[..., ServerProcess]) -> None:
    server = servers()
    tier = client(server.address)
    try:
        assert tier._wire.mapping(server.address) is not None
        tier.put([key(1)], [value(1, SLOT)])
        out = memoryview(bytearray(SLOT))
        assert tier.get([key(1)], [out]) == [SLOT] and bytes(out) == value(1, SLOT)
        tcp = client(server.address, transport="tcp")
        assert tcp._wire.mapping(server.address) is None
        out2 = memoryview(bytearray(SLOT))
        assert tcp.get([key(1)], [out2]) == [SLOT] and bytes(out2) == value(1, SLOT)
        tcp.close()
    finally:
        tier.close()


def test_big_batch_and_stats(servers: Callable[..., ServerProcess]) -> None:
    server = servers()
    tier = client(server.address, transport="tcp")
    try:
        ks = [key(i, 3) for i in range(200)]
        status = tier.put(ks, [value(i, SLOT) for i in range(200)])
        assert status.count(PutStatus.STORED) == 200
        outs = [memoryview(bytearray(SLOT)) for _ in ks]
        got = tier.get(ks, outs)
        present = [i for i, n in enumerate(got) if n is not None]
        assert len(present) == 200
        assert all(bytes(outs[i]) == value(i, SLOT) for i in present)
        doc = tier.server_stats()[server.address]
        assert doc["put_blocks"] == 200
        assert tier.stats().used_blocks == 200
    finally:
        tier.close()


def test_two_servers_share_keys_by_consistent_hashing(
    servers: Callable[..., ServerProcess],
) -> None:
    a, b = servers(), servers()
    tier = client(a.address, b.address, transport="tcp")
    try:
        ks = [key(i, 4) for i in range(64)]
        tier.put(ks, [value(i, 100) for i in range(64)])
        per = {m: s["put_blocks"] for m, s in tier.server_stats().items()}
        assert set(per) == {a.address, b.address} and all(n > 0 for n in per.values())
        assert sum(per.values()) == 64
        outs = [memoryview(bytearray(SLOT)) for _ in ks]
        assert tier.get(ks, outs) == [100] * 64
        # another client with the same members agrees on every key
        other = client(b.address, a.address, transport="tcp")
        assert other.contains(ks) == [True] * 64
        other.close()
    finally:
        tier.close()


def test_ring_moves_few_keys_when_a_member_joins() -> None:
    ks = [os.urandom(16) for _ in range(2000)]
    three = HashRing(["a:1", "b:1", "c:1"])
    four = HashRing(["a:1", "b:1", "c:1", "d:1"])
    moved = sum(1 for k in ks if three.owner(k) != four.owner(k))
    assert 0.1 < moved / len(ks) < 0.45
    assert all(four.owner(k) == "d:1" for k in ks if three.owner(k) != four.owner(k))
    with pytest.raises(ValueError, match="at least one member"):
        HashRing([])


@pytest.mark.redis
def test_membership_through_redis(redis_server: str, servers: Callable[..., ServerProcess]) -> None:
    a = servers("--register", redis_server, "--set", "server.membership_key=kvferry:test-members")
    cfg = ServerTierConfig(membership_url=redis_server, membership_key="kvferry:test-members")
    deadline = time.monotonic() + 10
    while True:
        try:
            tier = ServerTier(cfg, TierContext(slot_size=SLOT))
            break
        except ConfigError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        assert tier._ring.members == [a.address]
        assert tier.put([key(7)], [b"hello"]) == [PutStatus.STORED]
    finally:
        tier.close()


@pytest.mark.redis
def test_a_hung_membership_redis_costs_no_call_a_wait_and_keeps_the_old_members(
    own_redis: RedisProcesses, servers: Callable[..., ServerProcess]
) -> None:
    # The member list is re-read by the watcher thread, not inside tier calls: against a hung
    # Redis a call does not wait at all, the poll ends after server.timeout, and the tier goes
    # on with the members it knew.
    redis = own_redis()
    server = servers()
    raw = redis_py.Redis(port=redis.port)
    raw.set(lease_key("kvferry:hung", server.address), "i1", px=60_000)
    raw.sadd(members_key("kvferry:hung"), server.address)
    raw.close()
    cfg = ServerTierConfig(
        membership_url=redis.url, membership_key="kvferry:hung", timeout=1.0, membership_poll=60
    )
    tier = ServerTier(cfg, TierContext(slot_size=SLOT))
    try:
        assert tier.put([key(1)], [b"v"]) == [PutStatus.STORED]
        with redis.paused():
            t0 = time.monotonic()
            assert tier.contains([key(1)]) == [True]
            tier._watch_once()  # what the watcher does each poll
            took = time.monotonic() - t0
            assert took < 1.6, f"a call and a poll took {took:.1f}s against a 1s timeout"
        assert tier._ring.members == [server.address]
    finally:
        tier.close()


def test_a_hung_server_behind_a_store_costs_one_timeout_then_is_skipped(
    servers: Callable[..., ServerProcess],
) -> None:
    # The store's circuit breaker covers every shared tier: SIGSTOP the store server, and one
    # call pays server.timeout, the next ones (stats included) skip the tier at once; after
    # SIGCONT the probe finds it again.
    server = servers()
    now = [1000.0]
    cfg = KvferryConfig(
        store=StoreConfig(slot_size=SLOT, tiers=["cpu", "server"], breaker_failures=1)
    )
    remote = ServerTier(
        ServerTierConfig(addresses=[server.address], timeout=1.0), TierContext(slot_size=SLOT)
    )
    cpu = CpuTier(CpuTierConfig(buffer_number=8), TierContext(slot_size=SLOT))
    with TieredStore(cfg, tiers=[cpu, remote], clock=lambda: now[0]) as store:
        assert remote.put([key(1)], [value(1, SLOT)]) == [PutStatus.STORED]
        out = memoryview(bytearray(SLOT))
        with hung(server.proc.pid):
            t0 = time.monotonic()
            assert store.get([key(1)], [out]) == [None]
            took = time.monotonic() - t0
            assert took < 1.6, f"the first get took {took:.1f}s against a 1s timeout"
            t0 = time.monotonic()
            assert store.get([key(1)], [out]) == [None]
            assert store.lookup([key(1)]) == 0
            assert "server" not in store.stats().usage, "a skipped tier is not asked for stats"
            took = time.monotonic() - t0
            assert took < 0.5, f"calls took {took:.1f}s with the breaker open"
        now[0] += cfg.store.breaker_open_seconds
        assert store.get([key(1)], [out]) == [SLOT] and bytes(out) == value(1, SLOT)
        st = store.stats()
        assert (st.tiers["server"].breaker_opens, st.tiers["server"].breaker_closes) == (1, 1)
        assert st.tiers["server"].breaker_skipped == 2 and "server" in st.usage


def test_auth_token_is_required(servers: Callable[..., ServerProcess]) -> None:
    server = servers(env={"KVFERRY_LISTEN_AUTH_TOKEN": "s3cret"})
    bad = client(server.address, token="wrong")
    with pytest.raises(StorageError, match="token"):
        bad.contains([key(1)])
    bad.close()
    good = client(server.address, token="s3cret")
    assert good.contains([key(1)]) == [False]
    good.close()


def test_no_server_configured_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no store server known"):
        ServerTier(ServerTierConfig(), TierContext(slot_size=SLOT))
    with pytest.raises(ConfigError, match="not host:port"):
        client("localhost")


def test_a_dead_server_is_a_storage_error_and_a_restart_is_picked_up(
    servers: Callable[..., ServerProcess],
) -> None:
    server = servers()
    tier = client(server.address, transport="tcp")
    try:
        tier.put([key(1)], [b"abc"])
        server.proc.kill()
        server.proc.wait()
        with pytest.raises(StorageError, match="store server"):
            tier.get([key(1)], [memoryview(bytearray(SLOT))])
    finally:
        tier.close()


def _raw(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock, _ = handshake.connect((host, int(port)), token=None, timeout=5)
    return sock


def _call(sock: socket.socket, method: int, payload: bytes) -> tuple[wire.Op, bytes]:
    sock.sendall(wire.encode(wire.Op.CALL, region=method, req_id=1, length=len(payload)) + payload)
    h = wire.decode(handshake.recv_exact(sock, wire.HEADER_SIZE), reply=True, max_length=1 << 30)
    return h.op, bytes(handshake.recv_exact(sock, h.length))


def test_malformed_calls_get_errors_and_the_server_keeps_serving(
    servers: Callable[..., ServerProcess],
) -> None:
    server = servers()
    sock = _raw(server.address)
    bad_payloads = [
        (p.Method.LOOKUP, b""),
        (p.Method.LOOKUP, p.U32.pack(3) + b"x" * 10),
        (p.Method.GET, p.U32.pack(1 << 30)),
        (p.Method.PUT, p.encode_keys([key(1)]) + p.U32.pack(100) + b"short"),
        (p.Method.RELEASE, b"\x01"),
        (p.Method.RELEASE, p.U64.pack(999)),
        (p.Method.COMMIT, p.U64.pack(5) + b"\x01"),
        (p.Method.RESERVE, p.encode_keys([key(1)]) + p.U32.pack(SLOT + 1)),
        (p.Method.DELETE, p.encode_keys([key(1)]) + b"trailing"),
        (99, b""),
    ]
    for method, payload in bad_payloads:
        op, body = _call(sock, method, payload)
        assert op is wire.Op.ERR, (method, payload)
        assert body, "an error reply says why"
    # the same connection still works
    op, body = _call(sock, p.Method.LOOKUP, p.encode_keys([key(1)]))
    assert op is wire.Op.OK and p.U32.unpack(body) == (0,)
    sock.close()
    # random garbage frames close only their own connection
    rng = __import__("random").Random(7)
    for _ in range(30):
        s = _raw(server.address)
        s.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 100))))
        s.close()
    tier = client(server.address, transport="tcp")
    assert tier.put([key(2)], [b"still here"]) == [PutStatus.STORED]
    tier.close()
    assert server.proc.poll() is None


def test_vanished_client_pins_expire(servers: Callable[..., ServerProcess]) -> None:
    server = servers(
        "--capacity",
        f"{8 * SLOT}",
        env={"KVFERRY_STORE_LEASE_SECONDS": "1", "KVFERRY_STORE_EVICT_START_THRESHOLD": "1.0"},
    )
    tier = client(server.address, transport="tcp")
    ks = [key(i, 8) for i in range(8)]
    assert tier.put(ks, [value(i, SLOT) for i in range(8)]) == [PutStatus.STORED] * 8
    # a client pins every block (LOCATE) and vanishes without RELEASE
    sock = _raw(server.address)
    op, _ = _call(sock, p.Method.LOCATE, p.encode_keys(ks))
    assert op is wire.Op.OK
    sock.close()
    more = [key(i, 9) for i in range(4)]
    assert tier.put(more, [b"x"] * 4) == [PutStatus.NO_SPACE] * 4, "pinned blocks are not evicted"
    time.sleep(1.5)
    assert tier.put(more, [b"x"] * 4) == [PutStatus.STORED] * 4, "expired pins became evictable"
    tier.close()


def test_in_process_server_and_config_checks(tmp_path: object) -> None:
    cfg = load_config(
        flags={
            "listen.port": 0,
            "store.tiers": ["cpu"],
            "cpu.capacity": "1MiB",
            "store.slot_size": SLOT,
        }
    ).config
    with StoreServer(cfg) as server:
        host, port = server.address
        tier = client(f"{host}:{port}")
        assert tier.put([key(1)], [b"in-process"]) == [PutStatus.STORED]
        assert server.store.lookup([key(1)]) == 1
        tier.close()
    bad = load_config(flags={"store.tiers": ["cpu", "redis"]}).config
    with pytest.raises(ConfigError, match="local tiers only"):
        StoreServer(bad)


def test_sigkill_mid_put_then_restart_serves_completed_blocks_and_nothing_torn(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A store server with cpu + disk (write-through) is SIGKILLed while a client keeps
    putting; after a restart on the same disk directory every acknowledged block reads back
    exactly, and no block ever reads back wrong."""
    disk = tmp_path / "disk"
    args = ("--tiers", "cpu,disk", "--disk-path", str(disk), "--set", "disk.capacity=64MiB")
    env = {"KVFERRY_STORE_WRITE_POLICY": "write_through"}
    server = servers(*args, env=env)
    tier = client(server.address, transport="tcp")
    acked: list[int] = []
    killer = threading.Timer(0.15, os.kill, (server.proc.pid, signal.SIGKILL))
    killer.start()  # from another thread: the kill lands while puts are in flight
    try:
        for i in range(0, 6000, 8):  # fewer blocks than the disk tier's 8192 slots
            ids = list(range(i, i + 8))
            try:
                status = tier.put([key(j, 12) for j in ids], [value(j, SLOT) for j in ids])
            except StorageError:
                break
            acked += [j for j, s in zip(ids, status) if s is PutStatus.STORED]
    finally:
        tier.close()
    server.proc.wait()
    killer.join()
    assert len(acked) >= 8, "the client got puts in before the kill"
    restarted = servers(*args, env=env)
    tier = client(restarted.address, transport="tcp")
    try:
        ids = list(range(0, max(acked) + 64))
        outs = [memoryview(bytearray(SLOT)) for _ in ids]
        got = tier.get([key(j, 12) for j in ids], outs)
        for j, n, out in zip(ids, got, outs):
            if n is not None:
                assert bytes(out[:n]) == value(j, SLOT), f"block {j} came back torn or wrong"
        present = {j for j, n in zip(ids, got) if n is not None}
        assert set(acked) <= present, f"lost acknowledged blocks: {sorted(set(acked) - present)}"
    finally:
        tier.close()
