"""The redis tier against real redis-server processes: the conformance kit (single server and a
3-node Redis Cluster), key layout, TTL, OOM as NO_SPACE, failure and recovery across a restart.

The session ``redis_server`` is shared: every tier here uses its own key prefix (the test's name
plus a counter). Tests that stop a server or change its memory limit start their own.
"""

from __future__ import annotations

import array
import itertools
import logging
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import redis
import redis.cluster

from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.redis import RedisTier, glob_escape, redact_url
from kvferry.backends.redis_mget import SCRATCH_BYTES, MgetReader
from kvferry.backends.registry import create_tier
from kvferry.config.models import KvferryConfig, RedisTierConfig
from kvferry.errors import MissingDependency, StorageError
from kvferry.testing.redis_server import RedisProcesses, free_port
from kvferry.testing.tier_kit import check_tier, key, value

pytestmark = pytest.mark.redis

SLOT = 16384


# -- real redis-server processes started by these tests ------------------------------------


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A real 3-primary Redis Cluster on free ports; yields the URLs of its nodes."""
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.fail("redis-cli is not installed (it comes with the redis-server package)")
    processes = RedisProcesses(tmp_path_factory.mktemp("cluster"))
    try:
        nodes = [
            processes("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
            for _ in range(3)
        ]
        addrs = [f"127.0.0.1:{n.port}" for n in nodes]
        created = subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {created.stdout!r} {created.stderr!r}")
        deadline = time.monotonic() + 30
        for node in nodes:
            client = redis.Redis(port=node.port)
            try:
                # redis-py parses CLUSTER INFO's "key:value" lines into a dict
                while client.cluster("INFO").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        pytest.fail(f"cluster node {node.port} not ok within 30s")
                    time.sleep(0.05)
            finally:
                client.close()
        yield [n.url for n in nodes]
    finally:
        processes.stop_all()


# -- helpers -------------------------------------------------------------------------------


_counter = itertools.count()


def prefix_for(request: pytest.FixtureRequest) -> str:
    """A key prefix nobody else uses on the shared server."""
    return f"test:{request.node.name}:{next(_counter)}:"


def make(url: str, prefix: str, slot_size: int = SLOT, **kwargs: object) -> RedisTier:
    config = RedisTierConfig(url=url, key_prefix=prefix, **kwargs)
    return RedisTier(config, TierContext(slot_size=slot_size))


# -- the conformance kit -------------------------------------------------------------------


def test_conformance(redis_server: str, request: pytest.FixtureRequest) -> None:
    check_tier(lambda: make(redis_server, prefix_for(request)), slot_size=SLOT)


def test_conformance_with_ttl(redis_server: str, request: pytest.FixtureRequest) -> None:
    check_tier(lambda: make(redis_server, prefix_for(request), ttl=600), slot_size=SLOT)


def test_conformance_resp3(redis_server: str, request: pytest.FixtureRequest) -> None:
    # RESP3 replies are left to redis-py (MGET, then one copy per value)
    url = redis_server + "?protocol=3"
    probe = make(url, prefix_for(request))
    try:
        assert not probe._direct, "RESP3 must not take the direct MGET reader"
    finally:
        probe.close()
    check_tier(lambda: make(url, prefix_for(request)), slot_size=SLOT)


def test_mixed_sizes_and_misses(redis_server: str, request: pytest.FixtureRequest) -> None:
    # sizes around the direct reader's thresholds (16 KiB direct receive, 64-byte header reads,
    # 256 KiB scratch buffer), empty values and misses between them, in one batch
    slot = 1 << 18
    tier = make(redis_server, prefix_for(request), slot_size=slot)
    rng = random.Random(7)
    sizes = [0, 1, 2, 63, 64, 65, 100, 4096, 16383, 16384, 16385, 40_000, 65_536, 200_000, slot]
    sizes = sizes * 3
    rng.shuffle(sizes)
    try:
        assert tier._direct, "a RESP2 server must take the direct MGET reader"
        keys = [key(i, 9) for i in range(len(sizes))]
        vals = [rng.randbytes(n) for n in sizes]
        present = [i % 4 != 3 for i in range(len(keys))]
        tier.put([k for k, p in zip(keys, present) if p], [v for v, p in zip(vals, present) if p])
        for _ in range(2):  # the second round reuses the pooled connection
            outs = [memoryview(bytearray(slot)) for _ in keys]
            got = tier.get(keys, outs)
            assert got == [len(v) if p else None for v, p in zip(vals, present)]
            for i, (o, v, p) in enumerate(zip(outs, vals, present)):
                if p:
                    assert bytes(o[: len(v)]) == v, f"block {i} ({len(v)} bytes) differs"
    finally:
        tier.close()


def test_conformance_cluster(redis_cluster: list[str], request: pytest.FixtureRequest) -> None:
    check_tier(lambda: make(redis_cluster[0], prefix_for(request), cluster=True), slot_size=SLOT)


def test_cluster_spreads_keys_and_lists_all(
    redis_cluster: list[str], request: pytest.FixtureRequest
) -> None:
    prefix = prefix_for(request)
    tier = make(redis_cluster[0], prefix, cluster=True)
    try:
        keys = [key(i, 5) for i in range(48)]
        vals = [value(i, 1000 + i) for i in range(48)]
        assert tier.put(keys, vals) == [PutStatus.STORED] * 48
        assert sorted(tier.keys()) == sorted(keys), "keys() must scan every primary"
        outs = [memoryview(bytearray(SLOT)) for _ in keys]
        assert tier.get(keys, outs) == [len(v) for v in vals]
        assert all(bytes(o[: len(v)]) == v for o, v in zip(outs, vals))
        match = glob_escape(prefix.encode()) + b"*"
        per_node = []
        for url in redis_cluster:  # each primary holds a share of the slots, so of the keys
            node = redis.Redis.from_url(url)
            try:
                per_node.append(len(list(node.scan_iter(match=match))))
            finally:
                node.close()
        assert all(n > 0 for n in per_node) and sum(per_node) == 48, per_node
        assert tier.delete(keys) == 48
    finally:
        tier.close()


def test_a_cluster_node_without_redis_cluster_switches_to_cluster_mode(
    redis_cluster: list[str], request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    # redis.cluster left false against a cluster node: its CLUSTER/INFO answer gives it away
    with caplog.at_level(logging.WARNING, logger="kvferry.backends.redis"):
        tier = make(redis_cluster[0], prefix_for(request))
    try:
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1 and "redis.cluster=true" in said[0], said
        keys = [key(i, 6) for i in range(48)]  # spread over every primary's slots
        vals = [value(i, 100 + i) for i in range(48)]
        assert tier.put(keys, vals) == [PutStatus.STORED] * 48
        outs = [memoryview(bytearray(SLOT)) for _ in keys]
        assert tier.get(keys, outs) == [len(v) for v in vals]
        assert all(bytes(o[: len(v)]) == v for o, v in zip(outs, vals))
        assert tier.contains(keys) == [True] * 48 and sorted(tier.keys()) == sorted(keys)
        assert tier.delete(keys) == 48
    finally:
        tier.close()


@pytest.mark.parametrize("first", ["put", "get"])
def test_a_cluster_reply_names_the_flag_and_the_next_call_works(
    redis_cluster: list[str], request: pytest.FixtureRequest, first: str
) -> None:
    # A user who may not run INFO: the node is not recognised up front, so the first cluster
    # reply gives it away: MOVED to a put's SETs, CROSSSLOT to a get's MGET (read directly).
    for url in redis_cluster:
        admin = redis.Redis.from_url(url)
        try:
            admin.acl_setuser(
                "noinfo", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-info"]
            )
        finally:
            admin.close()
    port = redis_cluster[0].rsplit(":", 1)[1].split("/")[0]
    tier = make(f"redis://noinfo:pw@127.0.0.1:{port}/0", prefix_for(request))
    keys = [key(i, 7) for i in range(48)]
    vals = [value(i, 100 + i) for i in range(48)]
    outs = [memoryview(bytearray(SLOT)) for _ in keys]
    try:
        assert tier._direct, "taken for a single server"
        with pytest.raises(StorageError) as failed:
            tier.put(keys, vals) if first == "put" else tier.get(keys, outs)
        message = str(failed.value)
        assert ("MovedError" if first == "put" else "CROSSSLOT") in message, message
        assert "\n" not in message and "Redis Cluster" in message, message
        assert "redis.cluster=true" in message and "pw@" not in message, message
        # the put's blocks of this node's own slots went in with the failed call
        assert set(tier.put(keys, vals)) <= {PutStatus.STORED, PutStatus.EXISTS}
        assert tier.get(keys, outs) == [len(v) for v in vals]
        assert all(bytes(o[: len(v)]) == v for o, v in zip(outs, vals))
        assert tier.delete(keys) == 48
    finally:
        tier.close()


def test_a_single_server_is_not_taken_for_a_cluster(
    redis_server: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="kvferry.backends.redis"):
        tier = make(redis_server, prefix_for(request))
    try:
        assert caplog.records == [] and tier._direct, "a single server keeps the direct reader"
    finally:
        tier.close()


# -- layout and contract details ------------------------------------------------------------


def test_keys_are_prefix_plus_raw_bytes(redis_server: str, request: pytest.FixtureRequest) -> None:
    # glob characters in the prefix: keys() must match them literally
    prefix = f"t[x]*?\\{request.node.name}:"
    tier = make(redis_server, prefix)
    raw = redis.Redis.from_url(redis_server)
    try:
        k = bytes(range(240, 256))  # not UTF-8: binary safe
        assert tier.put([k], [b"\x00\xffblock"]) == [PutStatus.STORED]
        assert raw.get(prefix.encode() + k) == b"\x00\xffblock"
        # would match the unescaped pattern "t[x]*?..." but not the literal prefix
        decoy = f"tx-?\\{request.node.name}:".encode() + bytes(16)
        raw.set(decoy, b"other")
        # under the prefix but not a 16-byte key: not a block
        raw.set(prefix.encode() + b"meta", b"other")
        assert tier.keys() == [k]
        raw.delete(decoy, prefix.encode() + b"meta")
    finally:
        raw.close()
        tier.close()


def test_value_larger_than_slot_is_refused(
    redis_server: str, request: pytest.FixtureRequest
) -> None:
    tier = make(redis_server, prefix_for(request))
    try:
        k1, k2 = key(1), key(2)
        with pytest.raises(ValueError, match="exceeds the slot size"):
            tier.put([k1, k2], [b"a" * 10, b"z" * (SLOT + 1)])
        assert tier.contains([k1, k2]) == [False, False], "a refused put stores nothing"
        with pytest.raises(ValueError, match="16 bytes"):
            tier.put([b"short"], [b"x"])
    finally:
        tier.close()


@pytest.mark.parametrize("path", ["direct", "resp3", "cluster"])
def test_foreign_values_under_the_prefix_are_misses(
    path: str, redis_server: str, request: pytest.FixtureRequest
) -> None:
    # Another client wrote under kvferry's prefix: a value larger than any block kvferry stores
    # (slot_size) and a hash. A batch get answers the good blocks and a miss for those (counted
    # as foreign where Redis lets the tier see them), never a ValueError for the whole batch.
    url = request.getfixturevalue("redis_cluster")[0] if path == "cluster" else redis_server
    url += "?protocol=3" if path == "resp3" else ""
    prefix = prefix_for(request)
    tier = make(url, prefix, pool_size=1, cluster=path == "cluster")
    raw = (
        redis.cluster.RedisCluster.from_url(url) if path == "cluster" else redis.Redis.from_url(url)
    )
    try:
        assert tier._direct == (path == "direct")
        good = {key(1): value(1, SLOT), key(4): value(4, 100)}
        assert tier.put(list(good), list(good.values())) == [PutStatus.STORED] * 2
        raw.set(prefix.encode() + key(2), b"z" * (SLOT + 1))
        raw.hset(prefix.encode() + key(3), "field", "x")
        keys = [key(1), key(2), key(3), key(4)]
        # slot-sized buffers (the store's), then larger ones; pool_size 1: the second round
        # reuses the connection that drained the foreign value
        for size in (SLOT, 2 * SLOT):
            outs = [memoryview(bytearray(size)) for _ in keys]
            assert tier.get(keys, outs) == [SLOT, None, None, 100]
            assert bytes(outs[0][:SLOT]) == good[key(1)] and bytes(outs[3][:100]) == good[key(4)]
        # MGET answers nil for a key of another type, so only GET (cluster) shows it to the tier
        foreign = 2 if path == "cluster" else 1
        assert tier.stats().extra["foreign"] == 2 * foreign
        assert tier.stats().extra["errors"] == 0
    finally:
        raw.close()
        tier.close()


def test_typed_buffers_roundtrip(redis_server: str, request: pytest.FixtureRequest) -> None:
    tier = make(redis_server, prefix_for(request))
    try:
        src = array.array("I", range(1000))  # a 4-byte-item buffer, 4000 bytes
        dst = array.array("I", bytes(4 * 1000))
        assert tier.put([key(1)], [memoryview(src)]) == [PutStatus.STORED]
        assert tier.put([key(2)], [bytearray(b"ba")]) == [PutStatus.STORED]
        assert tier.get([key(1)], [memoryview(dst)]) == [4000]
        assert dst == src
    finally:
        tier.close()


def test_small_buffer_keeps_the_connection_usable(
    redis_server: str, request: pytest.FixtureRequest
) -> None:
    # pool_size 1: the next get must reuse the connection that drained the refused value
    tier = make(redis_server, prefix_for(request), slot_size=1 << 16, pool_size=1)
    try:
        vals = [value(1, 10), value(2, 40_000), value(3, 300)]
        keys = [key(1), key(2), key(3)]
        tier.put(keys, vals)
        outs = [memoryview(bytearray(n)) for n in (10, 50, 300)]
        with pytest.raises(ValueError, match="block 1 is 40000 bytes but its buffer holds 50"):
            tier.get(keys, outs)
        outs = [memoryview(bytearray(1 << 16)) for _ in keys]
        assert tier.get(keys, outs) == [10, 40_000, 300]
        assert [bytes(o[: len(v)]) for o, v in zip(outs, vals)] == vals
    finally:
        tier.close()


def test_ttl_sets_expiry(redis_server: str, request: pytest.FixtureRequest) -> None:
    prefix = prefix_for(request)
    raw = redis.Redis.from_url(redis_server)
    tiers = [make(redis_server, prefix, ttl=30), make(redis_server, prefix + "none:")]
    try:
        tiers[0].put([key(1)], [b"v"])
        tiers[1].put([key(1)], [b"v"])
        assert 0 < raw.pttl(prefix.encode() + key(1)) <= 30_000
        assert raw.pttl((prefix + "none:").encode() + key(1)) == -1, "ttl 0 means no expiry"
    finally:
        raw.close()
        for tier in tiers:
            tier.close()


def test_stats_count_this_clients_blocks(redis_server: str, request: pytest.FixtureRequest) -> None:
    tier = make(redis_server, prefix_for(request))
    try:
        keys = [key(i) for i in range(5)]
        tier.put(keys, [b"x"] * 5)
        tier.put(keys[:2], [b"x"] * 2)  # EXISTS: not counted again
        tier.delete([*keys[:3], key(99)])
        tier.get([key(3), key(0)], [memoryview(bytearray(4)) for _ in range(2)])
        stats = tier.stats()
        assert (stats.total_blocks, stats.used_blocks, stats.peak_blocks) == (None, 2, 5)
        assert tier.used_blocks == 2 and tier.capacity_blocks is None
        assert stats.extra["hits"] == 1 and stats.extra["misses"] == 1
        assert stats.extra["errors"] == 0
    finally:
        tier.close()


def test_create_tier_from_config(redis_server: str, request: pytest.FixtureRequest) -> None:
    config = KvferryConfig(redis=RedisTierConfig(url=redis_server, key_prefix=prefix_for(request)))
    tier = create_tier("redis", config)
    try:
        assert isinstance(tier, RedisTier) and tier.shared and not tier.persistent
        assert tier.put([key(1)], [b"v"]) == [PutStatus.STORED]
    finally:
        tier.close()


def test_empty_batches(redis_server: str, request: pytest.FixtureRequest) -> None:
    tier = make(redis_server, prefix_for(request))
    try:
        assert tier.contains([]) == [] and tier.put([], []) == [] and tier.get([], []) == []
        assert tier.delete([]) == 0
    finally:
        tier.close()


# -- failures ------------------------------------------------------------------------------


def test_oom_answers_no_space(own_redis: RedisProcesses) -> None:
    server = own_redis("--maxmemory-policy", "noeviction")
    raw = redis.Redis(port=server.port)
    used = int(raw.info("memory")["used_memory"])
    raw.config_set("maxmemory", used + 256 * 1024)
    tier = make(server.url, "oom:")
    try:
        keys = [key(i) for i in range(64)]
        vals = [value(i, SLOT) for i in range(64)]  # 1 MiB in all: past the limit
        status = tier.put(keys, vals)
        stored = [k for k, s in zip(keys, status) if s is PutStatus.STORED]
        assert PutStatus.NO_SPACE in status and stored, status
        assert set(status) <= {PutStatus.STORED, PutStatus.NO_SPACE}
        assert tier.stats().extra["no_space"] == status.count(PutStatus.NO_SPACE)
        assert tier.contains(keys) == [s is PutStatus.STORED for s in status]
        outs = [memoryview(bytearray(SLOT)) for _ in stored]
        assert tier.get(stored, outs) == [SLOT] * len(stored)
        assert all(bytes(o) == vals[keys.index(k)] for o, k in zip(outs, stored))
    finally:
        raw.close()
        tier.close()


def test_refused_connection_is_storage_error() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    tier = make(url, "x:", socket_timeout=1)
    try:
        with pytest.raises(StorageError, match=r"redis tier at redis://:\*\*\*@127\.0\.0\.1") as e:
            tier.contains([key(1)])
        assert "hunter2" not in str(e.value)
        assert isinstance(e.value.__cause__, redis.exceptions.RedisError)
        assert tier.stats().extra["errors"] == 1
    finally:
        tier.close()


def test_silent_server_times_out_as_storage_error() -> None:
    # a real listener that accepts and never answers: every call must end by socket_timeout
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        tier = make(f"redis://127.0.0.1:{port}/0", "silent:", socket_timeout=0.2)
        try:
            with pytest.raises(StorageError, match=r"redis tier at redis://127\.0\.0\.1:\d+/0: "):
                tier.get([key(1)], [memoryview(bytearray(8))])
            with pytest.raises(StorageError, match="Timeout"):
                tier.put([key(1)], [b"v"])
        finally:
            tier.close()


def test_a_hung_server_costs_one_timeout_per_call(own_redis: RedisProcesses) -> None:
    # SIGSTOP: connections are still accepted by the kernel, nothing answers. Each call must
    # fail after one socket_timeout: redis-py retrying a timed-out command (or handshake) on a
    # fresh connection would pay it twice, and a store stalls for every such call.
    server = own_redis()
    tier = make(server.url, "hung:", socket_timeout=1)
    ops = {
        "get": lambda: tier.get([key(1)], [memoryview(bytearray(8))]),
        "contains": lambda: tier.contains([key(1)]),
        "put": lambda: tier.put([key(2)], [b"x"]),
        "delete": lambda: tier.delete([key(1)]),
    }
    try:
        assert tier.put([key(1)], [b"v"]) == [PutStatus.STORED]  # a warm pooled connection
        with server.paused():
            for name, op in ops.items():
                t0 = time.monotonic()
                with pytest.raises(StorageError, match=r"[Tt]ime"):
                    op()
                took = time.monotonic() - t0
                assert took < 1.6, f"{name} took {took:.1f}s against socket_timeout 1s"
        assert tier.contains([key(1)]) == [True], "the first call after SIGCONT works"
    finally:
        tier.close()


def test_error_reply_is_storage_error(own_redis: RedisProcesses) -> None:
    # a user that may not run MGET: the server answers the get with an error reply
    server = own_redis()
    raw = redis.Redis(port=server.port)
    raw.acl_setuser(
        "nomget", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-mget"]
    )
    raw.close()
    tier = make(f"redis://nomget:pw@127.0.0.1:{server.port}/0", "acl:", pool_size=1)
    try:
        assert tier.put([key(1)], [b"v"]) == [PutStatus.STORED]
        with pytest.raises(StorageError, match=r"at redis://nomget:\*\*\*@.*NOPERM") as e:
            tier.get([key(1)], [memoryview(bytearray(8))])
        assert "pw@" not in str(e.value)
        # pool_size 1: the same connection answers next, so the error reply was read whole
        assert tier.contains([key(1), key(2)]) == [True, False]
    finally:
        tier.close()


def _scripted_server(listener: socket.socket, connections: int) -> None:
    """A RESP server for ``connections`` connections, one after another: +OK to every command
    but MGET. On the first connection MGET gets a reply cut short, and the connection stays
    open (any further MGET there gets "stale"); later connections get "hello"."""
    for n in range(connections):
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as f:
            mgets = 0
            while head := f.readline():
                args = []
                for _ in range(int(head[1:])):
                    size = int(f.readline()[1:])
                    args.append(f.read(size + 2)[:size])
                if args[0].upper() != b"MGET":
                    conn.sendall(b"+OK\r\n")
                elif n > 0:
                    conn.sendall(b"*1\r\n$5\r\nhello\r\n")
                elif mgets == 0:
                    conn.sendall(b"*1\r\n$40000\r\n" + b"x" * 1000)  # then silence
                else:
                    conn.sendall(b"*1\r\n$5\r\nstale\r\n")
                mgets += args[0].upper() == b"MGET"


def test_reply_cut_short_drops_the_connection() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        thread = threading.Thread(target=_scripted_server, args=(listener, 2), daemon=True)
        thread.start()
        # pool_size 1: a connection kept after the cut reply would answer the next get
        tier = make(f"redis://127.0.0.1:{port}/0", "cut:", pool_size=1, socket_timeout=0.3)
        try:
            with pytest.raises(StorageError, match="reading the MGET reply"):
                tier.get([key(1)], [memoryview(bytearray(1 << 16))])
            out = memoryview(bytearray(8))
            assert tier.get([key(1)], [out]) == [5]
            assert bytes(out[:5]) == b"hello", "the half-read connection was used again"
        finally:
            tier.close()
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_recovers_after_restart(own_redis: RedisProcesses) -> None:
    server = own_redis()
    tier = make(server.url, "restart:", socket_timeout=1)
    try:
        assert tier.put([key(1)], [b"before"]) == [PutStatus.STORED]
        server.stop()
        for op in (
            lambda: tier.contains([key(1)]),
            lambda: tier.put([key(2)], [b"x"]),
            lambda: tier.get([key(1)], [memoryview(bytearray(8))]),
            lambda: tier.delete([key(1)]),
            tier.keys,
        ):
            with pytest.raises(StorageError, match=f"redis tier at {server.url}"):
                op()
        server.start()  # same port, empty (no persistence)
        assert tier.contains([key(1)]) == [False], "the first call after the restart works"
        assert tier.put([key(1)], [b"after"]) == [PutStatus.STORED]
        out = memoryview(bytearray(8))
        assert tier.get([key(1)], [out]) == [5] and bytes(out[:5]) == b"after"
        assert tier.stats().extra["errors"] == 5
    finally:
        tier.close()


def test_close_releases_connections(own_redis: RedisProcesses) -> None:
    server = own_redis()
    raw = redis.Redis(port=server.port)
    tier = make(server.url, "close:")
    try:
        tier.put([key(1)], [b"v"])
        tier.get([key(1)], [memoryview(bytearray(4))])
        assert len(raw.client_list()) >= 2
        tier.close()
        tier.close()  # idempotent
        deadline = time.monotonic() + 10
        while len(raw.client_list()) > 1 and time.monotonic() < deadline:
            time.sleep(0.02)  # the server notices closed sockets on its next event loop turn
        assert len(raw.client_list()) == 1, "close must close the pooled connections"
        with pytest.raises(StorageError, match="closed"):
            tier.contains([key(1)])
    finally:
        raw.close()
        tier.close()


def test_missing_redis_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import redis` raise ImportError, as if it were not installed
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependency, match=r"kvferry\[redis\]"):
        make("redis://127.0.0.1:1/0", "x:")


# -- the MGET reply reader on its own ---------------------------------------------------------


@pytest.mark.parametrize("scatter", [True, False], ids=["recvmsg_into", "recv_into"])
def test_mget_reader_any_chunking(scatter: bool) -> None:
    # a reply written in random-sized pieces (1 byte to 100 KiB) over a real socket pair:
    # every boundary (inside a header, a value, a CRLF) must parse the same
    rng = random.Random(11)
    sizes = [0, 1, 63, 64, 65, 16383, 16384, 16385, 70_000, 262_144, 300_000, 5]
    vals: list[bytes | None] = [rng.randbytes(n) for n in sizes]
    vals[3] = None
    reply = b"*%d\r\n" % len(vals) + b"".join(
        b"$-1\r\n" if v is None else b"$%d\r\n%s\r\n" % (len(v), v) for v in vals
    )
    outs = [memoryview(bytearray(300_000)) for _ in vals]
    outs[5] = memoryview(bytearray(10))  # too small: drained, reported, not written
    a, b = socket.socketpair()

    def send() -> None:
        pos = 0
        while pos < len(reply):
            step = rng.choice([1, 7, 100, 5000, 100_000])
            a.sendall(reply[pos : pos + step])
            pos += step

    sender = threading.Thread(target=send)
    sender.start()
    try:
        reader = MgetReader(b, bytearray(SCRATCH_BYTES))
        reader.scatter = scatter
        got, too_small, foreign = reader.read(outs, 300_000)
    finally:
        sender.join()
        a.close()
        b.close()
    assert too_small == [5] and foreign == 0
    assert got == [None if v is None else len(v) for v in vals]
    for i, (o, v) in enumerate(zip(outs, vals)):
        if v is not None and i != 5:
            assert bytes(o[: len(v)]) == v, f"value {i} ({len(v)} bytes) differs"
    assert reader.pos == reader.end, "the whole reply and nothing more was consumed"


# -- pure helpers --------------------------------------------------------------------------


def test_redact_url() -> None:
    assert redact_url("redis://u:secret@h:7000/1") == "redis://u:***@h:7000/1"
    assert redact_url("rediss://:secret@h/0") == "rediss://:***@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_glob_escape() -> None:
    assert glob_escape(b"a*b?c[d]e\\f") == b"a\\*b\\?c\\[d\\]e\\\\f"
    assert glob_escape(b"kvferry:kv:") == b"kvferry:kv:"
