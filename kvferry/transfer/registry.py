"""Registries of the transfer engine's plug-in points: transports and metadata services.

Built-ins are listed here as "module:Class" and imported on first use; out-of-tree classes load
by dotted path ("my_pkg.rdma:RdmaTransport"); registering a taken name raises.
"""

from __future__ import annotations

from kvferry.plugins import Registry
from kvferry.transfer.metadata.base import MetadataService
from kvferry.transfer.transports.base import Transport

TRANSPORTS = Registry(
    "transport",
    {
        "local": "kvferry.transfer.transports.local:LocalTransport",
        "shm": "kvferry.transfer.transports.shm:ShmTransport",
        "tcp": "kvferry.transfer.transports.tcp:TcpTransport",
    },
)

METADATA = Registry(
    "metadata service",
    {
        "p2p": "kvferry.transfer.metadata.p2p:P2pMetadata",
        "redis": "kvferry.transfer.metadata.redis:RedisMetadata",
    },
)

AUTO_ORDER = ("local", "shm", "tcp")
"""Transports tried by ``transport: auto``, fastest first."""


def load_transport(name: str) -> type[Transport]:
    return TRANSPORTS.load(name, Transport)  # type: ignore[type-abstract]


def load_metadata(name: str) -> type[MetadataService]:
    return METADATA.load(name, MetadataService)  # type: ignore[type-abstract]
