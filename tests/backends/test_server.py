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

from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.server import protocol as p
from kvferry.backends.server.client import ServerTier
from kvferry.backends.server.ring import HashRing
from kvferry.backends.server.service import StoreServer
from kvferry.config import load_config
from kvferry.config.models import ServerTierConfig
from kvferry.errors import ConfigError, StorageError
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
        assert tier._mapping(server.address) is not None
        tier.put([key(1)], [value(1, SLOT)])
        out = memoryview(bytearray(SLOT))
        assert tier.get([key(1)], [out]) == [SLOT] and bytes(out) == value(1, SLOT)
        tcp = client(server.address, transport="tcp")
        assert tcp._mapping(server.address) is None
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
