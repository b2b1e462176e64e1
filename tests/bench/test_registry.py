"""Tests for the transfer-bench backend registry (kvferry.bench.transfer.backends.registry), a
``kvferry.plugins.Registry`` like every other plug-in point's."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from kvferry.bench.transfer.backends import registry
from kvferry.bench.transfer.backends.base import Op, TransferBenchBackend
from kvferry.bench.transfer.backends.kvferry import KvferryBenchBackend
from kvferry.bench.transfer.backends.mooncake import MooncakeBenchBackend
from kvferry.errors import ConfigError
from kvferry.plugins import Registry


class _DummyBackend(TransferBenchBackend):
    name = "dummy"

    def start_target(self, total_buffer_size: int) -> str:
        return "dummy:0"

    def connect(self, target_seg: str, local_buffer_size: int) -> None:
        pass

    def local_buffer(self) -> memoryview:
        return memoryview(bytearray(1))

    def target_capacity(self) -> int:
        return 0

    def run_batch(
        self, op: Op, local_offsets: list[int], target_offsets: list[int], block_size: int
    ) -> None:
        pass

    def close(self) -> None:
        pass


class _NotABackend:
    pass


@pytest.fixture
def out_of_tree_module() -> Iterator[str]:
    """A throwaway importable module holding backend-ish classes; yields its name."""
    name = "_kvferry_test_oot_backends"
    mod = types.ModuleType(name)
    mod.DummyBackend = _DummyBackend  # type: ignore[attr-defined]
    mod.NotABackend = _NotABackend  # type: ignore[attr-defined]
    sys.modules[name] = mod
    yield name
    del sys.modules[name]


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry of the built-ins only, for this test: what it registers goes with it."""
    monkeypatch.setattr(registry, "BACKENDS", Registry("transfer bench backend", registry.BUILTINS))


def test_builtins_are_registered() -> None:
    assert isinstance(registry.BACKENDS, Registry)
    assert registry.BUILTINS["kvferry"] == (
        "kvferry.bench.transfer.backends.kvferry:KvferryBenchBackend"
    )
    assert registry.BUILTINS["mooncake"] == (
        "kvferry.bench.transfer.backends.mooncake:MooncakeBenchBackend"
    )
    assert registry.names() == ["kvferry", "mooncake"]
    assert registry.load("kvferry") is KvferryBenchBackend


def test_load_by_name_imports_lazily_without_mooncake_installed() -> None:
    # The mooncake backend module imports mooncake only inside its methods.
    assert registry.load("mooncake") is MooncakeBenchBackend


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="nosuch") as exc:
        registry.load("nosuch")
    assert "kvferry" in str(exc.value)
    assert "mooncake" in str(exc.value)


def test_load_dotted_path(out_of_tree_module: str) -> None:
    assert registry.load(f"{out_of_tree_module}:DummyBackend") is _DummyBackend


def test_dotted_path_missing_module_or_class_or_wrong_type(out_of_tree_module: str) -> None:
    with pytest.raises(ConfigError, match="No module named 'no_such_package_kvferry'"):
        registry.load("no_such_package_kvferry.mod:Cls")
    with pytest.raises(ConfigError, match="no 'Missing'"):
        registry.load(f"{out_of_tree_module}:Missing")
    with pytest.raises(ConfigError, match="not a TransferBenchBackend"):
        registry.load(f"{out_of_tree_module}:NotABackend")


def test_register_then_load(out_of_tree_module: str, clean_registry: None) -> None:
    registry.register("dummy", f"{out_of_tree_module}:DummyBackend")
    assert registry.load("dummy") is _DummyBackend
    assert "dummy" in registry.names()


def test_register_duplicate_raises(clean_registry: None) -> None:
    with pytest.raises(ConfigError, match="already registered"):
        registry.register("mooncake", "somewhere:Else")
    assert registry.load("mooncake") is MooncakeBenchBackend


def test_register_rejects_malformed_path(clean_registry: None) -> None:
    with pytest.raises(ConfigError, match="must be 'module:Class'"):
        registry.register("bad", "no_colon_here")
    assert "bad" not in registry.names()
