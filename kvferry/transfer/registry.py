"""Registries of the transfer engine's plug-in points: transports and metadata services.

Built-ins are listed here as "module:Class" and imported on first use; out-of-tree classes load
by dotted path ("my_pkg.rdma:RdmaTransport"); registering a taken name raises.
"""

from __future__ import annotations

import importlib
from typing import TypeVar

from kvferry.errors import ConfigError
from kvferry.transfer.metadata.base import MetadataService
from kvferry.transfer.transports.base import Transport

T = TypeVar("T")


class Registry:
    """name -> "module:Class", loaded lazily."""

    def __init__(self, kind: str, builtins: dict[str, str]) -> None:
        self.kind = kind
        self._targets = dict(builtins)

    def register(self, name: str, target: str) -> None:
        """Add an implementation under ``name``.

        Raises:
            ConfigError: the name is taken or the target is not "module:Class".
        """
        if name in self._targets:
            raise ConfigError(f"{self.kind} {name!r} is already registered ({self._targets[name]})")
        if ":" not in target:
            raise ConfigError(f"{self.kind} target must be 'module:Class', got {target!r}")
        self._targets[name] = target

    def names(self) -> list[str]:
        return sorted(self._targets)

    def load(self, name: str, base: type[T]) -> type[T]:
        """Import the class registered under ``name`` (or a "module:Class" path).

        Raises:
            ConfigError: unknown name, import failure, or not a subclass of ``base``.
        """
        target = self._targets.get(name, name if ":" in name else None)
        if target is None:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())} "
                "or a 'module:Class' path"
            )
        module_name, _, class_name = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"cannot load {self.kind} {name!r} from {target}: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ConfigError(f"{target} is not a {base.__name__}")
        return cls


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
