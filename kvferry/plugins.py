"""The one registry type behind every plug-in point (transports, metadata, tiers, policies...).

A registry maps a name to "module:Class". Built-ins are listed where the registry is created and
imported on first use (no import-time cost, no import cycles); out-of-tree classes load by dotted
path ("my_pkg.rdma:RdmaTransport"); registering a taken name raises.
"""

from __future__ import annotations

import importlib
from typing import TypeVar

from kvferry.errors import ConfigError

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
