"""The one registry type behind every plug-in point (transports, metadata, tiers, policies...).

A registry maps a name to "module:Class". Built-ins are listed where the registry is created and
imported on first use (no import-time cost, no import cycles); out-of-tree classes load by dotted
path ("my_pkg.rdma:RdmaTransport"); registering a taken name raises.

What a failed load raises: :class:`~kvferry.errors.ConfigError` for anything the caller can fix
in its config (an unknown name, a malformed path, a module or class that does not exist, a class
of the wrong kind, a module that fails to import), and
:class:`~kvferry.errors.MissingDependency` unchanged when the module itself says which optional
extra it needs.
"""

from __future__ import annotations

import importlib
from typing import TypeVar

from kvferry.errors import ConfigError, MissingDependency

__all__ = ["Registry"]

T = TypeVar("T")


class Registry:
    """name -> "module:Class", loaded lazily.

    Args:
        kind: what the registry holds, as error messages name it ("transport").
        builtins: the built-in implementations, name -> "module:Class".
    """

    def __init__(self, kind: str, builtins: dict[str, str]) -> None:
        self.kind = kind
        for target in builtins.values():
            self._split(target)
        self._targets = dict(builtins)

    def register(self, name: str, target: str) -> None:
        """Add an implementation under ``name``; its module is imported on first load.

        Raises:
            ConfigError: the name is taken or the target is not "module:Class".
        """
        if name in self._targets:
            raise ConfigError(f"{self.kind} {name!r} is already registered ({self._targets[name]})")
        self._split(target)
        self._targets[name] = target

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def load(self, name: str, base: type[T]) -> type[T]:
        """Import the class registered under ``name`` (or a "module:Class" path).

        Raises:
            ConfigError: unknown name, malformed path, import failure, or not a subclass of
                ``base``.
            MissingDependency: importing the module needs an optional extra that is missing.
        """
        target = self._targets.get(name, name if ":" in name else None)
        if target is None:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())} "
                "or a 'module:Class' path"
            )
        module_name, class_name = self._split(target)
        try:
            module = importlib.import_module(module_name)
        except MissingDependency:
            raise  # it names the extra to install: more useful than any wrapping
        except ImportError as e:
            raise ConfigError(f"cannot load {self.kind} {name!r} from {target}: {e}") from e
        cls = getattr(module, class_name, None)
        if cls is None:
            raise ConfigError(
                f"cannot load {self.kind} {name!r}: module {module_name!r} has no {class_name!r}"
            )
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ConfigError(f"{target} is not a {base.__name__}")
        return cls

    def _split(self, target: str) -> tuple[str, str]:
        """("module", "Class") of a "module:Class" target.

        Raises:
            ConfigError: not of that form.
        """
        module, sep, attr = target.partition(":")
        if not sep or not module or not attr or ":" in attr:
            raise ConfigError(f"{self.kind} target must be 'module:Class', got {target!r}")
        return module, attr
