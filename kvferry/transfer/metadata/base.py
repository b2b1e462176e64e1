"""The plug-in point for metadata services (how segment names resolve to addresses).

Constructor shape: ``Service(config: MetadataConfig)``.

``publish(name, address, instance)``
    Target side, after its listener is up: make ``name`` resolve to ``address``. May block on the
    service (Redis) up to a few seconds. Raises ``PeerClosed`` when the service is unreachable.

``resolve(name) -> (host, port)``
    Initiator side, in ``open_segment``. Raises ``SegmentError`` for an unknown or malformed name,
    ``PeerClosed`` when the service is unreachable.

``unpublish(name)``
    Target side, on close. Never raises for a name that is already gone.

The handshake that follows resolution is the same for every service, so what a segment grants is
always learned from the target itself, never from the metadata store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from kvferry.config.models import MetadataConfig


class MetadataService(ABC):
    name: ClassVar[str]

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
