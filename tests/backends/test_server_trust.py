"""The store server against clients that stall, misbehave or attack: a committed block is
immutable, a wrong block is a miss (never a hit), and no peer locks the others out."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from kvferry.backends.base import PutStatus, TierContext, block_checksum
from kvferry.backends.server import protocol as p
from kvferry.backends.server.client import ServerTier
from kvferry.config import load_config
from kvferry.config.models import KvferryConfig, ServerTierConfig
from kvferry.store.server import StoreServer
from kvferry.testing.tier_kit import key, value
from kvferry.transfer import handshake, wire
from kvferry.transfer.memory import PeerMapping

SLOT = 4096


def _config(**flags: object) -> KvferryConfig:
    base: dict[str, object] = {
        "listen.port": 0,
        "store.tiers": ["cpu"],
        "cpu.capacity": f"{4 * SLOT}",
        "store.slot_size": SLOT,
        "store.evict_start_threshold": 1.0,
    }
    base.update(flags)
    return load_config(flags=base).config


@pytest.fixture
def server() -> Iterator[StoreServer]:
    with StoreServer(_config(**{"store.lease_seconds": 0.3})) as s:
        yield s


def _address(server: StoreServer) -> tuple[str, int]:
    host, port = server.address
    return host, port


def _tier(server: StoreServer, transport: str = "auto") -> ServerTier:
    host, port = server.address
    cfg = ServerTierConfig(addresses=[f"{host}:{port}"], transport=transport)  # type: ignore[arg-type]
    return ServerTier(cfg, TierContext(slot_size=SLOT))


def _call(sock: socket.socket, method: int, payload: bytes) -> tuple[wire.Op, bytes]:
    sock.sendall(wire.encode(wire.Op.CALL, region=method, req_id=1, length=len(payload)) + payload)
    h = wire.decode(handshake.recv_exact(sock, wire.HEADER_SIZE), reply=True, max_length=1 << 30)
    return h.op, bytes(handshake.recv_exact(sock, h.length))


def _read_back(tier: ServerTier, k: bytes) -> bytes | None:
    out = memoryview(bytearray(SLOT))
    (n,) = tier.get([k], [out])
    return None if n is None else bytes(out[:n])


def test_a_stalled_reservation_never_lands_under_another_key(server: StoreServer) -> None:
    """A same-host client reserves a slot, stalls past the lease, and only then writes into the
    shared mapping and commits: the commit fails, and the block that reused the slot reads back
    as its own bytes or as a miss, never as the stalled client's bytes."""
    sock, peer = handshake.connect(_address(server), token=None, timeout=5)
    region = peer.regions[0]
    assert region.shm is not None
    mapping = PeerMapping(region.shm, region.size)
    stalled = key(1, 40)
    op, body = _call(sock, p.Method.RESERVE, p.encode_keys([stalled]) + p.U32.pack(SLOT))
    assert op is wire.Op.OK
    lease, _ = p.LEASE_REGION.unpack_from(body, 0)
    code, offset, declare = p.RES.unpack_from(body, p.LEASE_REGION.size)
    assert p.CODE_STATUS[code] is PutStatus.STORED
    assert declare == 0, "a slot nobody abandoned is not guarded"
    time.sleep(0.5)  # past store.lease_seconds: the slot goes back to the free list

    good = _tier(server)
    others = [key(i, 41) for i in range(4)]  # fill every slot, the stalled one included
    assert good.put(others, [value(i, SLOT) for i in range(4)]) == [PutStatus.STORED] * 4

    mapping.view[offset : offset + SLOT] = b"\xee" * SLOT  # the late write
    op, body = _call(sock, p.Method.COMMIT, p.U64.pack(lease) + b"\x01" + p.U64.pack(0))
    assert op is wire.Op.ERR, "a commit after the lease ran out fails"
    assert server.store.lookup([stalled]) == 0

    for i, k in enumerate(others):
        got = _read_back(good, k)
        assert got is None or got == value(i, SLOT), "a block never reads back with wrong bytes"
    assert [_read_back(good, k) for k in others].count(None) == 1, "the overwritten one is a miss"
    tcp = _tier(server, transport="tcp")
    for i, k in enumerate(others):
        got = _read_back(tcp, k)
        assert got is None or got == value(i, SLOT)
    good.close()
    tcp.close()
    sock.close()
    mapping.close()


def test_a_raw_write_into_the_pool_is_refused_and_changes_nothing(server: StoreServer) -> None:
    tier = _tier(server, transport="tcp")
    k = key(1, 42)
    assert tier.put([k], [value(1, SLOT)]) == [PutStatus.STORED]
    ((offset, _),) = [loc for loc in server.store.first.locate([k]) if loc is not None]  # type: ignore[attr-defined]
    sock, peer = handshake.connect(_address(server), token=None, timeout=5)
    assert peer.regions[0].writable is False, "the handshake says the pool is read-only"
    sock.sendall(
        wire.encode(wire.Op.WRITE, region=peer.regions[0].region_id, offset=offset, length=SLOT)
        + b"\xee" * SLOT
    )
    h = wire.decode(handshake.recv_exact(sock, wire.HEADER_SIZE), reply=True, max_length=1 << 20)
    assert h.op is wire.Op.ERR
    assert b"read-only" in bytes(handshake.recv_exact(sock, h.length))
    sock.close()
    assert _read_back(tier, k) == value(1, SLOT)
    tier.close()


def test_a_late_write_before_the_new_owner_commits_is_rejected(server: StoreServer) -> None:
    """The stalled client's write lands after the slot's new owner wrote it but before that
    owner's COMMIT: the owner's declared checksum does not match the slot, so the block is
    REJECTED, not published with the stalled client's bytes."""
    a, peer = handshake.connect(_address(server), token=None, timeout=5)
    b, _ = handshake.connect(_address(server), token=None, timeout=5)
    region = peer.regions[0]
    assert region.shm is not None
    mapping = PeerMapping(region.shm, region.size)
    # fill 3 of the 4 slots, so both reservations get the same last slot
    tier = _tier(server, transport="tcp")
    assert tier.put([key(i, 43) for i in range(3)], [b"x"] * 3) == [PutStatus.STORED] * 3

    def reserve(sock: socket.socket, k: bytes) -> tuple[int, int, int]:
        op, body = _call(sock, p.Method.RESERVE, p.encode_keys([k]) + p.U32.pack(SLOT))
        assert op is wire.Op.OK
        lease, _ = p.LEASE_REGION.unpack_from(body, 0)
        code, offset, declare = p.RES.unpack_from(body, p.LEASE_REGION.size)
        assert p.CODE_STATUS[code] is PutStatus.STORED
        return lease, offset, declare

    _, a_offset, _ = reserve(a, key(1, 44))
    time.sleep(0.5)  # a's lease runs out
    owner = key(2, 44)
    b_lease, b_offset, declare = reserve(b, owner)
    assert b_offset == a_offset, "the slot was reused"
    assert declare == 1, "its new writer must declare what it writes"
    mapping.view[b_offset : b_offset + SLOT] = value(2, SLOT)  # b writes its block
    mapping.view[a_offset : a_offset + SLOT] = b"\xee" * SLOT  # a's late write
    payload = p.U64.pack(b_lease) + b"\x01" + p.encode_u64s([block_checksum(owner, value(2, SLOT))])
    op, body = _call(b, p.Method.COMMIT, payload)
    assert op is wire.Op.OK
    assert p.decode_statuses(body, 1) == [PutStatus.REJECTED]
    assert server.store.lookup([owner]) == 0
    assert server.store.stats().tiers["cpu"].corrupt == 1
    # the slot went back to the free list: the block can be put again
    assert tier.put([owner], [value(2, SLOT)]) == [PutStatus.STORED]
    assert _read_back(tier, owner) == value(2, SLOT)
    for sock in (a, b):
        sock.close()
    tier.close()
    mapping.close()


def test_cpu_tier_checksums_turn_a_changed_block_into_a_miss() -> None:
    from kvferry.backends.cpu import CpuTier
    from kvferry.config.models import CpuTierConfig

    tier = CpuTier(
        CpuTierConfig(capacity=4 * SLOT, checksum="on"),  # type: ignore[arg-type]
        TierContext(slot_size=SLOT),
    )
    ks = [key(i, 45) for i in range(3)]
    assert tier.put(ks, [value(i, 1000) for i in range(3)]) == [PutStatus.STORED] * 3
    assert tier.checksums(ks) == [block_checksum(k, value(i, 1000)) for i, k in enumerate(ks)]
    slots = [loc for loc in tier.locate(ks)]
    assert all(slots)
    for k_index in (0, 1):
        offset = slots[k_index][0]  # type: ignore[index]
        tier.region.view[offset + 10] ^= 0xFF  # flip one byte behind the tier's back
    out = memoryview(bytearray(SLOT))
    assert tier.get([ks[0]], [out]) == [None], "get checks the block"
    assert tier.views([ks[1]], verify=True) == [None], "so does a verified view"
    assert tier.contains(ks) == [False, False, True], "and drops what failed"
    assert tier.get([ks[2]], [out]) == [1000] and bytes(out[:1000]) == value(2, 1000)
    assert tier.stats().extra["corrupt_dropped"] == 2
    # a commit publishes a block only when the slot holds what the writer declared
    (view_ok, view_bad) = tier.reserve([key(7, 45), key(8, 45)], [100, 100])
    assert view_ok is not None and view_bad is not None
    view_ok[:] = value(7, 100)
    view_bad[:] = value(9, 100)  # not what the writer declares below
    sums = [block_checksum(key(7, 45), value(7, 100)), block_checksum(key(8, 45), value(8, 100))]
    assert tier.commit([key(7, 45), key(8, 45)], [True, True], sums) == [True, False]
    assert tier.contains([key(7, 45), key(8, 45)]) == [True, False]
    tier.close()


def test_by_default_only_slots_a_writer_abandoned_are_guarded() -> None:
    """cpu.checksum=auto: no hashing for slots only the tier wrote or a writer finished; a slot
    whose reservation was abandoned guards every block stored in it from then on."""
    from kvferry.backends.cpu import CpuTier
    from kvferry.config.models import CpuTierConfig

    tier = CpuTier(CpuTierConfig(capacity=2 * SLOT), TierContext(slot_size=SLOT))  # type: ignore[arg-type]
    plain, lost, later = key(1, 50), key(2, 50), key(3, 50)
    assert tier.put([plain], [value(1, 100)]) == [PutStatus.STORED]
    assert tier.checksums([plain]) == [None], "nothing to check: no hashing on the common path"
    (view,) = tier.reserve([lost], [100])
    assert view is not None and tier.needs_checksum([lost]) == [False]
    tier.abandon([lost])  # its lease ran out; the writer may still write through `view`
    assert tier.stats().extra["guarded_slots"] == 1
    assert tier.put([later], [value(3, 100)]) == [PutStatus.STORED]  # the abandoned slot
    assert tier.checksums([plain, later]) == [None, block_checksum(later, value(3, 100))]
    view[:] = b"\xee" * 100  # the late write
    out = memoryview(bytearray(SLOT))
    assert tier.get([later], [out]) == [None], "a wrong block is a miss"
    assert tier.get([plain], [out]) == [100]
    assert tier.stats().extra["corrupt_dropped"] == 1
    tier.close()


def _trickle(address: tuple[str, int], n: int, source: str = "127.0.0.2") -> list[socket.socket]:
    """n connections from ``source`` that each send the first byte of a HELLO and no more."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(address, timeout=5, source_address=(source, 0))
        s.sendall(b"K")
        socks.append(s)
    return socks


def _closed_by_peer(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


@pytest.mark.parametrize("source", ["127.0.0.2", "127.0.0.1"], ids=["other-host", "same-host"])
def test_trickling_connections_never_lock_out_a_client_with_the_token(source: str) -> None:
    """Slowloris: more trickling connections than the listener serves at once, each holding
    a half-sent HELLO, from another address or from the good client's own. A client with the
    token still gets in every time, and every trickler is closed by the handshake deadline."""
    cfg = _config(
        **{
            "listen.auth_token": "s3cret",
            "listen.max_connections": 16,
            "listen.max_pending": 8,
            "listen.max_pending_per_host": 4,
            "listen.handshake_timeout": 1.0,
        }
    )
    with StoreServer(cfg) as server:
        attackers = _trickle(_address(server), 24, source)  # 1.5x max_connections
        for _ in range(3):  # while they trickle, a good client gets in every time
            for s in attackers:
                try:
                    s.sendall(b"F")
                except OSError:
                    pass
            sock, _ = handshake.connect(_address(server), token="s3cret", timeout=2)
            op, _ = _call(sock, p.Method.LOOKUP, p.encode_keys([key(1)]))
            assert op is wire.Op.OK
            sock.close()
        with pytest.raises(Exception, match="token"):
            handshake.connect(_address(server), token="wrong", timeout=2)
        # every trickler is gone by the handshake deadline (plus slack for a busy machine)
        assert all(_closed_by_peer(s, within=4.0) for s in attackers)
        for s in attackers:
            s.close()


def test_an_authenticated_connection_that_stalls_mid_frame_is_closed() -> None:
    """A CALL header that announces 64 MiB and then stalls: the connection is closed after
    listen.stall_timeout and its memory goes with it; other clients are served meanwhile."""
    cfg = _config(**{"listen.stall_timeout": 0.5})
    with StoreServer(cfg) as server:
        sock, _ = handshake.connect(_address(server), token=None, timeout=5)
        sock.sendall(wire.encode(wire.Op.CALL, region=p.Method.PUT, req_id=1, length=64 << 20))
        sock.sendall(b"x" * 100)
        tier = _tier(server, transport="tcp")
        assert tier.put([key(1, 46)], [b"meanwhile"]) == [PutStatus.STORED]
        assert _closed_by_peer(sock, within=4.0)
        sock.close()
        tier.close()


def test_an_idle_connection_is_closed_and_the_client_reconnects() -> None:
    cfg = _config(**{"listen.idle_timeout": 0.5})
    with StoreServer(cfg) as server:
        tier = _tier(server, transport="tcp")
        assert tier.put([key(1, 47)], [b"before"]) == [PutStatus.STORED]
        time.sleep(1.2)  # the server closes the idle connection
        assert _read_back(tier, key(1, 47)) == b"before", "the client reconnects by itself"
        tier.close()


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def server_process() -> Iterator[tuple[int, tuple[str, int]]]:
    """A `kvferry serve store` process with 64 KiB slots: (pid, address)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "kvferry", "serve", "store", "--port", "0", "--quiet"]
    cmd += ["--tiers", "cpu", "--capacity", "8MiB", "--slot-size", "64KiB"]
    cmd += ["--set", "listen.stall_timeout=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("kvferry-store-ready "), line
    host, port = line.split()[1].rsplit(":", 1)
    yield proc.pid, (host, int(port))
    proc.kill()
    proc.wait()


def test_a_get_of_absent_keys_allocates_nothing_per_key(
    server_process: tuple[int, tuple[str, int]],
) -> None:
    """20,000 absent keys in one GET: before, the server allocated a 64 KiB slot per key
    (1.3 GB) before it knew they were absent; now it answers from what is there."""
    pid, address = server_process
    before = _rss_mib(pid)
    sock, _ = handshake.connect(address, token=None, timeout=5)
    keys = [key(i, 48) for i in range(20_000)]
    op, body = _call(sock, p.Method.GET, p.encode_keys(keys))
    assert op is wire.Op.OK
    assert body[0] == 0 and p.U32.unpack_from(body, 1) == (p.MISS,)
    assert _rss_mib(pid) - before < 100
    sock.close()


def test_stalled_large_call_headers_hold_no_memory(
    server_process: tuple[int, tuple[str, int]],
) -> None:
    """16 connections announce a 64 MiB CALL and send 100 bytes of it: before, the server
    allocated (and zeroed) all 64 MiB each, 1 GB held for as long as they stalled."""
    pid, address = server_process
    before = _rss_mib(pid)
    socks = []
    for _ in range(16):
        sock, _ = handshake.connect(address, token=None, timeout=5)
        sock.sendall(wire.encode(wire.Op.CALL, region=p.Method.PUT, req_id=1, length=64 << 20))
        sock.sendall(b"x" * 100)
        socks.append(sock)
    time.sleep(0.5)
    assert _rss_mib(pid) - before < 100
    assert all(_closed_by_peer(s, within=6.0) for s in socks), "stalled frames time out"
    for s in socks:
        s.close()


def test_a_flood_of_bad_frames_logs_a_few_lines_and_never_blocks_the_server() -> None:
    """1,000 malformed frames against a server whose stderr is a pipe nobody reads: before,
    one warning each filled the pipe and blocked the connection threads (and with them the
    logging lock); now a few lines a kind per 10 s go out and the server keeps serving."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "kvferry", "serve", "store", "--port", "0", "--quiet"]
    cmd += ["--tiers", "cpu", "--capacity", "1MiB", "--slot-size", str(SLOT)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert line.startswith("kvferry-store-ready "), line
        host, port = line.split()[1].rsplit(":", 1)
        address = (host, int(port))
        for i in range(1000):
            sock, _ = handshake.connect(address, token=None, timeout=5)
            sock.sendall(b"XX" + bytes(30) + b"padding %d" % i)  # bad magic
            sock.close()
        cfg = ServerTierConfig(addresses=[f"{host}:{port}"], transport="tcp")  # type: ignore[arg-type]
        tier = ServerTier(cfg, TierContext(slot_size=SLOT))
        assert tier.put([key(1, 49)], [b"served"]) == [PutStatus.STORED]
        assert _read_back(tier, key(1, 49)) == b"served"
        tier.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert 0 < err.count("closing connection from") <= 10


def test_checksum_on_sends_a_check_with_every_lent_block() -> None:
    with StoreServer(_config(**{"cpu.checksum": "on"})) as server:
        tier = _tier(server, transport="tcp")
        k = key(1, 51)
        assert tier.put([k], [value(1, 500)]) == [PutStatus.STORED]
        sock, _ = handshake.connect(_address(server), token=None, timeout=5)
        op, body = _call(sock, p.Method.GET, p.encode_keys([k]))
        assert op is wire.Op.OK and body[0] == p.SUMS
        sums, end = p.decode_checks(memoryview(body), 1 + 4, 1)
        assert sums == [block_checksum(k, value(1, 500))] and body[end:] == value(1, 500)
        assert _read_back(tier, k) == value(1, 500)
        sock.close()
        tier.close()
