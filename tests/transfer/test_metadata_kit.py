"""Every registered metadata service passes the conformance kit (kvferry/testing/metadata_kit.py).

The services are taken from the registry, so a new one is checked without editing this file:
one that talks to no server (``url_schemes`` empty) runs as is, one that talks Redis gets the
session's real redis-server, and one whose server this session cannot start is skipped, saying
which.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

from kvferry import SegmentError
from kvferry.config.models import MetadataConfig
from kvferry.errors import MissingDependency
from kvferry.testing.metadata_kit import MetadataKit, check_metadata
from kvferry.transfer.metadata.base import MetadataService
from kvferry.transfer.metadata.p2p import P2pMetadata
from kvferry.transfer.metadata.redis import RedisMetadata
from kvferry.transfer.registry import METADATA

SERVERS = {"redis": "redis_server"}
"""URL scheme -> the fixture that yields a live server's URL of it."""


def _service(name: str) -> type[MetadataService]:
    return METADATA.load(name, MetadataService)  # type: ignore[type-abstract]


def _params() -> list[object]:
    params = []
    for name in METADATA.names():
        marks = [pytest.mark.redis] if "redis" in _service(name).url_schemes else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _unreachable(url: str) -> str:
    """The same kind of URL, pointing at a port nothing listens on."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc="127.0.0.1:1"))


@pytest.mark.parametrize("name", _params())
def test_every_registered_service_passes_the_kit(name: str, request: pytest.FixtureRequest) -> None:
    cls = _service(name)
    prefix = f"kvferry-kit-{uuid.uuid4().hex[:8]}"
    config = MetadataConfig(key_prefix=prefix)
    unreachable = None
    if cls.url_schemes:
        fixture = next((SERVERS[s] for s in cls.url_schemes if s in SERVERS), None)
        if fixture is None:
            pytest.skip(f"no {'/'.join(cls.url_schemes)} server in this test session for {name}")
        url = request.getfixturevalue(fixture)
        config = MetadataConfig(url=url, key_prefix=prefix)
        unreachable = MetadataConfig(url=_unreachable(url), key_prefix=prefix)
    try:
        cls(config).close()
    except MissingDependency as e:
        pytest.skip(f"{name}: {e}")
    check_metadata(cls, config, unreachable)


def test_the_builtins_are_all_registered() -> None:
    """The kit runs over the registry: the built-ins must be in it to be checked."""
    assert {"p2p", "redis"} <= set(METADATA.names())
    assert _service("p2p") is P2pMetadata and _service("redis") is RedisMetadata


# -- the failures the kit found, each pinned -----------------------------------------------
def test_p2p_refuses_to_publish_a_name_that_is_not_its_address() -> None:
    """check_names_are_addresses: p2p accepted ``publish("prefill-0", address)`` and stored
    nothing, so the target announced a name nobody could open."""
    service = P2pMetadata(MetadataConfig())
    with pytest.raises(SegmentError, match="with p2p metadata a segment name is the target's"):
        service.publish("prefill-0", ("127.0.0.1", 15428), "x")
    service.publish("127.0.0.1:15428", ("127.0.0.1", 15428), "x")  # its own address: fine


@pytest.mark.redis
def test_redis_ttl_under_a_millisecond_still_expires(redis_server: str) -> None:
    """check_ttl: ``metadata.ttl: 500us`` was rounded down to 0 ms, which Redis reads as no
    expiry at all, so the name stayed forever."""
    config = MetadataConfig(url=redis_server, key_prefix=f"kit-{uuid.uuid4().hex[:8]}", ttl=5e-4)
    kit = MetadataKit(RedisMetadata, config)
    service = kit.service()
    try:
        service.publish("short", ("127.0.0.1", 15428), "x")
        kit._expires(service, "short", "ttl 500us")
    finally:
        kit.close()


@pytest.mark.redis
def test_redis_refuses_an_address_no_peer_could_reach(redis_server: str) -> None:
    """check_bad_address: Redis stored port 0 (or an empty host) and every initiator then
    failed at connect, far from the cause."""
    config = MetadataConfig(url=redis_server, key_prefix=f"kit-{uuid.uuid4().hex[:8]}")
    service = RedisMetadata(config)
    try:
        with pytest.raises(SegmentError, match="port must be 1-65535"):
            service.publish("zero", ("127.0.0.1", 0), "x")
        with pytest.raises(SegmentError, match="not published"):
            service.resolve("zero")
    finally:
        service.close()
