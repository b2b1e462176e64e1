"""The registry of transfer-bench backends: name -> "module:Class", imported lazily.

Owns the one table of built-in backends and the lookup that turns a name (or an out-of-tree
``"package.module:Class"`` path) into a :class:`TransferBenchBackend` subclass. Importing this
module imports no backend, so a missing optional dependency (mooncake) only matters to whoever
loads that backend.
"""

from __future__ import annotations

import importlib

from kvferry.bench.transfer.backends.base import TransferBenchBackend
from kvferry.errors import ConfigError

# Every built-in backend, registered here and nowhere else.
BACKENDS: dict[str, str] = {
    "kvferry": "kvferry.bench.transfer.backends.kvferry:KvferryBenchBackend",
    "mooncake": "kvferry.bench.transfer.backends.mooncake:MooncakeBenchBackend",
}


def register(name: str, target: str) -> None:
    """Register ``name`` -> ``target`` ("module:Class"); the class is imported only on load.

    Raises:
        ConfigError: ``name`` is already registered, or ``target`` is not "module:Class".
    """
    if name in BACKENDS:
        raise ConfigError(
            f"transfer bench backend {name!r} is already registered (as {BACKENDS[name]!r}); "
            "pick another name"
        )
    _split(target)
    BACKENDS[name] = target


def names() -> list[str]:
    """Registered backend names, sorted."""
    return sorted(BACKENDS)


def _split(target: str) -> tuple[str, str]:
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr or ":" in attr:
        raise ConfigError(
            f"backend path {target!r} is invalid; expected 'package.module:ClassName'"
        )
    return module, attr


def load(name_or_path: str) -> type[TransferBenchBackend]:
    """The backend class registered as ``name_or_path``, or at that "module:Class" path.

    Raises:
        ConfigError: unknown name (the message lists the valid ones), a path whose module or
            class does not exist, or a class that is not a ``TransferBenchBackend``.
        MissingDependency: the backend's module needs an optional extra that is not installed
            (raised by the backend module itself, passed through).
    """
    target = BACKENDS.get(name_or_path)
    if target is None:
        if ":" not in name_or_path:
            raise ConfigError(
                f"backend={name_or_path!r} is unknown; valid: {', '.join(names())} "
                "or an out-of-tree 'package.module:ClassName'"
            )
        target = name_or_path
    module_name, attr = _split(target)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only a missing backend module is a config error; a missing dependency *inside* an
        # existing module is that module's problem and keeps its own ImportError.
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(
                f"backend={name_or_path!r}: module {module_name!r} cannot be found"
            ) from e
        raise
    try:
        cls = getattr(module, attr)
    except AttributeError as e:
        raise ConfigError(
            f"backend={name_or_path!r}: module {module_name!r} has no attribute {attr!r}"
        ) from e
    if not (isinstance(cls, type) and issubclass(cls, TransferBenchBackend)):
        raise ConfigError(
            f"backend={name_or_path!r}: {target!r} is not a TransferBenchBackend subclass"
        )
    return cls
