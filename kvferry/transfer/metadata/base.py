"""The plug-in point for metadata services (how segment names resolve to addresses).

Constructor shape: ``Service(config: MetadataConfig)``; it connects to nothing yet.

``publish(name, address, instance)``
    Target side, after its listener is up: make ``name`` resolve to ``address`` (replacing what
    it resolved to before), or raise; never accept a name it will not resolve. May block on the
    service (Redis) up to a few seconds. With ``ttl`` > 0 the name stops resolving ``ttl``
    seconds after its last publish (however small ``ttl`` is); 0 keeps it until unpublished.
    Raises ``SegmentError`` for a name this service cannot resolve to ``address`` or an address
    no peer could reach (empty host, port outside 1-65535), ``PeerClosed`` when the service is
    unreachable.

``resolve(name) -> (host, port)``
    Initiator side, in ``open_segment``, usually in another process than the publisher. Returns
    exactly what was published. Raises ``SegmentError`` for an unknown or malformed name,
    ``PeerClosed`` when the service is unreachable.

``unpublish(name)``
    Target side, on close: the name stops resolving. Never raises for a name that is already
    gone, nor when the service is unreachable (a closing target must not fail on it).

``close()``
    Releases connections; idempotent.

Names of one service live in its ``key_prefix``: services whose configs differ only there share
no name. A service whose names are addresses (``names_are_addresses``, p2p) has nothing to
store: each well-formed "host:port" resolves to itself, so unpublish, ttl and key_prefix have
nothing to act on. ``kvferry.testing.metadata_kit`` checks all of the above against a live
service.

The handshake that follows resolution is the same for every service, so what a segment grants is
always learned from the target itself, never from the metadata store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from kvferry.config.models import MetadataConfig
from kvferry.errors import SegmentError

__all__ = ["MetadataService", "check_address", "parse_address"]


class MetadataService(ABC):
    name: ClassVar[str]

    names_are_addresses: ClassVar[bool] = False
    """True for a service whose segment names are their targets' "host:port" (p2p)."""

    url_schemes: ClassVar[tuple[str, ...]] = ()
    """Schemes of ``metadata.url`` this service talks to (empty: it talks to no server); what
    a test needs to know to give it a live one."""

    def __init__(self, config: MetadataConfig) -> None:
        self.config = config

    @abstractmethod
    def publish(self, name: str, address: tuple[str, int], instance: str) -> None:
        """Make ``name`` resolve to ``address``."""

    @abstractmethod
    def resolve(self, name: str) -> tuple[str, int]:
        """The address ``name`` was published at."""

    @abstractmethod
    def unpublish(self, name: str) -> None:
        """Forget ``name``; no error if it is already gone."""

    def close(self) -> None:
        """Release connections; idempotent."""


def parse_address(name: str) -> tuple[str, int]:
    """Split "host:port" (or "[v6]:port").

    Raises:
        ValueError: not of that form, or the port is out of range.
    """
    host, sep, port_text = name.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{name!r} is not host:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} in {name!r} is out of range 1-65535")
    return host.strip("[]"), port


def check_address(address: tuple[str, int]) -> None:
    """Refuse an address no peer could connect to.

    Raises:
        SegmentError: an empty host, or a port outside 1-65535.
    """
    host, port = address
    if not isinstance(host, str) or not host:
        raise SegmentError(f"cannot publish address {address!r}: the host is empty")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise SegmentError(f"cannot publish address {address!r}: port must be 1-65535")
