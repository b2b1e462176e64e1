"""The registry of transfer-bench backends: name -> "module:Class", imported lazily.

The one table of built-in backends (:data:`BUILTINS`) behind a :class:`kvferry.plugins.Registry`
(:data:`BACKENDS`), the registry type every plug-in point uses: lookup by name or by an
out-of-tree ``"package.module:Class"`` path, duplicate names refused. Importing this module
imports no backend, so a missing optional dependency (mooncake) only matters to whoever loads
that backend.
"""

from __future__ import annotations

from kvferry.bench.transfer.backends.base import TransferBenchBackend
from kvferry.plugins import Registry

__all__ = ["BACKENDS", "BUILTINS", "load", "names", "register"]

BUILTINS: dict[str, str] = {
    "kvferry": "kvferry.bench.transfer.backends.kvferry:KvferryBenchBackend",
    "mooncake": "kvferry.bench.transfer.backends.mooncake:MooncakeBenchBackend",
}
"""Every built-in backend, registered here and nowhere else."""

BACKENDS = Registry("transfer bench backend", BUILTINS)


def register(name: str, target: str) -> None:
    """Register ``name`` -> ``target`` ("module:Class"); the class is imported only on load.

    Raises:
        ConfigError: ``name`` is already registered, or ``target`` is not "module:Class".
    """
    BACKENDS.register(name, target)


def names() -> list[str]:
    """Registered backend names, sorted."""
    return BACKENDS.names()


def load(name_or_path: str) -> type[TransferBenchBackend]:
    """The backend class registered as ``name_or_path``, or at that "module:Class" path.

    Raises:
        ConfigError: unknown name (the message lists the valid ones), a path whose module or
            class cannot be loaded (the message says why), or a class that is not a
            ``TransferBenchBackend``.
    """
    return BACKENDS.load(name_or_path, TransferBenchBackend)  # type: ignore[type-abstract]
