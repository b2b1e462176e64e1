"""Metadata services (kvferry/transfer/metadata/): redis-published names and p2p addresses."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import numpy as np
import pytest

from kvferry import (
    KvferryConfig,
    OpCode,
    PeerClosed,
    SegmentError,
    TransferEngine,
    TransferRequest,
)
from kvferry.testing import TargetProcess

StartTarget = Callable[..., TargetProcess]
MiB = 1 << 20


def redis_engine(url: str, prefix: str, **sections: object) -> TransferEngine:
    metadata = {"backend": "redis", "url": url, "key_prefix": prefix}
    return TransferEngine(KvferryConfig(metadata=metadata, **sections))


@pytest.fixture
def prefix() -> str:
    """A key prefix of its own per test, so tests sharing the redis-server never collide."""
    return f"kvferry-test-{uuid.uuid4().hex[:8]}"


@pytest.mark.redis
def test_open_a_published_name_and_move_bytes(
    redis_server: str, prefix: str, target_process: StartTarget
) -> None:
    target = target_process(metadata_url=redis_server, key_prefix=prefix, segment_name="prefill-0")
    assert target.name == "prefill-0"
    with redis_engine(redis_server, prefix, transfer={"transport": "tcp"}) as ini:
        local = ini.allocate(8 * MiB)
        h = ini.open_segment("prefill-0")
        assert h.name == "prefill-0" and h.transport == "tcp"
        ini.transfer_sync([TransferRequest(OpCode.READ, local, 0, h, 0, 8 * MiB)], timeout=30)
        assert np.array_equal(local.array, target.expected(0))
        local.array[:4096] = 1
        ini.transfer_sync([TransferRequest(OpCode.WRITE, local, 0, h, 0, 4096)], timeout=10)
        local.array[:4096] = 0
        ini.transfer_sync([TransferRequest(OpCode.READ, local, 0, h, 0, 4096)], timeout=10)
        assert (local.array[:4096] == 1).all()


@pytest.mark.redis
def test_unknown_name_raises_segment_error(redis_server: str, prefix: str) -> None:
    with redis_engine(redis_server, prefix) as ini, pytest.raises(SegmentError) as info:
        ini.open_segment("decode-7")
    assert "'decode-7' is not published" in str(info.value)
    assert redis_server in str(info.value)


@pytest.mark.redis
def test_close_unpublishes_and_prefixes_isolate(redis_server: str, prefix: str) -> None:
    target = redis_engine(redis_server, prefix, listen={"port": 0})
    target.allocate(MiB)
    assert target.listen("prefill-1") == "prefill-1"
    with redis_engine(redis_server, prefix + "-other") as stranger, pytest.raises(SegmentError):
        stranger.open_segment("prefill-1")  # same name, another prefix: not visible
    with redis_engine(redis_server, prefix) as ini:
        assert ini.open_segment("prefill-1").size == MiB
        target.close()
        with pytest.raises(SegmentError, match="not published"):
            ini.open_segment("prefill-1", refresh=True)


@pytest.mark.redis
def test_malformed_metadata_entry_raises_segment_error(redis_server: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_server)
    try:
        client.set(f"{prefix}:segment:broken", b'{"host": "127.0.0.1"}')
        client.set(f"{prefix}:segment:garbage", b"\xff not json")
    finally:
        client.close()
    with redis_engine(redis_server, prefix) as ini:
        for name in ("broken", "garbage"):
            with pytest.raises(SegmentError, match="malformed"):
                ini.open_segment(name)


def test_unreachable_redis_raises_peer_closed() -> None:
    with redis_engine("redis://127.0.0.1:1/0", "x") as ini, pytest.raises(PeerClosed):
        ini.open_segment("prefill-0")


@pytest.mark.parametrize(
    "name",
    [
        "prefill-0",
        "127.0.0.1",
        "127.0.0.1:",
        ":15428",
        "127.0.0.1:http",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "",
    ],
)
def test_p2p_malformed_names_raise_a_helpful_segment_error(name: str) -> None:
    with TransferEngine(KvferryConfig()) as ini, pytest.raises(SegmentError) as info:
        ini.open_segment(name)
    message = str(info.value)
    assert f"cannot open segment {name!r}" in message
    assert "host:port" in message and "127.0.0.1:15428" in message  # says what would be valid


def test_p2p_ipv6_name_parses_and_unreachable_port_is_peer_closed() -> None:
    # well-formed names resolve; nothing listens there, so the error is PeerClosed, not SegmentError
    with TransferEngine(KvferryConfig(transfer={"connect_timeout": 2})) as ini:
        for name in ("127.0.0.1:1", "[::1]:1"):
            with pytest.raises(PeerClosed):
                ini.open_segment(name)


def test_p2p_listen_refuses_a_free_name_and_leaves_nothing_listening() -> None:
    """p2p names are addresses: a target told to announce "prefill-0" would be unreachable by
    it. listen says so, and the listener it had bound is closed, so a second listen works."""
    with TransferEngine(KvferryConfig(listen={"port": 0})) as target:
        target.allocate(MiB)
        with pytest.raises(SegmentError, match="with p2p metadata a segment name is"):
            target.listen("prefill-0")
        assert target.address is None and target.segment_name is None
        name = target.listen()
        assert target.address is not None and name == "{}:{}".format(*target.address)
        with TransferEngine(KvferryConfig()) as ini:
            assert ini.open_segment(name).size == MiB


def test_listen_with_unreachable_redis_leaves_nothing_listening() -> None:
    config = {"backend": "redis", "url": "redis://127.0.0.1:1/0", "key_prefix": "x"}
    with TransferEngine(KvferryConfig(metadata=config, listen={"port": 0})) as target:
        with pytest.raises(PeerClosed):
            target.listen("prefill-0")
        assert target.address is None and target.segment_name is None


@pytest.mark.redis
def test_a_live_target_with_a_ttl_keeps_resolving_and_stops_when_closed(
    redis_server: str, prefix: str
) -> None:
    """With ``metadata.ttl`` set, the entry of a target that still serves must not expire: the
    engine publishes it again every third of the ttl. Before, nothing refreshed it, and a live
    target stopped resolving once its ttl ran out."""
    import time

    import redis

    ttl = 0.3
    metadata = {"backend": "redis", "url": redis_server, "key_prefix": prefix, "ttl": ttl}
    key = f"{prefix}:segment:prefill-0"
    client = redis.Redis.from_url(redis_server)
    target = TransferEngine(KvferryConfig(metadata=metadata, listen={"port": 0}))
    target.allocate(4096)
    target.listen("prefill-0")
    try:
        time.sleep(4 * ttl)
        assert client.exists(key), "the entry of a live target expired"
        assert 0 < client.pttl(key) <= ttl * 1000
        with redis_engine(redis_server, prefix) as ini:
            assert ini.open_segment("prefill-0").name == "prefill-0"
        target.stop_listening()
        time.sleep(2 * ttl)
        assert not client.exists(key), "a target that stopped listening is still refreshed"
    finally:
        target.close()
        client.close()
