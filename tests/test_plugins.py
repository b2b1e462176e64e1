"""The one registry type (kvferry/plugins.py): lazy loading, names, and what a bad load raises."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from kvferry.errors import ConfigError, MissingDependency
from kvferry.plugins import Registry


class Base:
    pass


class Impl(Base):
    pass


class Other:
    pass


HERE = f"{__name__}:Impl"


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path for throwaway plug-in modules."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _module(where: Path, body: str) -> str:
    name = f"kvferry_plugin_{uuid.uuid4().hex[:8]}"
    (where / f"{name}.py").write_text(body)
    return name


def test_builtins_load_by_name_and_paths_load_directly() -> None:
    registry = Registry("widget", {"impl": HERE})
    assert registry.load("impl", Base) is Impl
    assert registry.load(HERE, Base) is Impl  # an out-of-tree "module:Class" path
    assert "impl" in registry and "nope" not in registry
    assert registry.names() == ["impl"]


def test_a_registered_module_is_imported_on_first_load_only(plugin_dir: Path) -> None:
    name = _module(plugin_dir, "class Late(Exception): pass\n")
    registry = Registry("widget", {})
    registry.register("late", f"{name}:Late")
    assert name not in sys.modules
    cls = registry.load("late", Exception)
    assert cls.__name__ == "Late" and name in sys.modules
    assert registry.names() == ["late"]


def test_a_taken_name_is_refused() -> None:
    registry = Registry("widget", {"impl": HERE})
    with pytest.raises(ConfigError, match="widget 'impl' is already registered"):
        registry.register("impl", f"{__name__}:Other")
    assert registry.load("impl", Base) is Impl  # the first registration stands


@pytest.mark.parametrize("target", ["no_colon", ":Impl", "module:", "a:b:c", ""])
def test_a_malformed_target_is_refused(target: str) -> None:
    with pytest.raises(ConfigError, match="must be 'module:Class'"):
        Registry("widget", {}).register("x", target)
    with pytest.raises(ConfigError, match="must be 'module:Class'"):
        Registry("widget", {"x": target})


def test_an_unknown_name_lists_the_valid_ones() -> None:
    registry = Registry("widget", {"b": HERE, "a": HERE})
    with pytest.raises(ConfigError, match=r"unknown widget 'c'; valid: a, b or a 'module:Class'"):
        registry.load("c", Base)


def test_a_class_of_the_wrong_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match="is not a Base"):
        Registry("widget", {}).load(f"{__name__}:Other", Base)
    with pytest.raises(ConfigError, match="is not a Base"):
        Registry("widget", {}).load(f"{__name__}:HERE", Base)  # not even a class


def test_a_missing_module_or_class_is_a_config_error(plugin_dir: Path) -> None:
    registry = Registry("widget", {})
    with pytest.raises(ConfigError, match="cannot load widget 'no_such_mod_x:C'"):
        registry.load("no_such_mod_x:C", Base)
    with pytest.raises(ConfigError, match="has no 'Missing'"):
        registry.load(f"{__name__}:Missing", Base)
    broken = _module(plugin_dir, "import no_such_dependency_x\n")
    with pytest.raises(ConfigError, match="no_such_dependency_x"):
        registry.load(f"{broken}:C", Base)


def test_a_missing_extra_passes_through_naming_the_extra(plugin_dir: Path) -> None:
    needy = _module(
        plugin_dir,
        "from kvferry.errors import MissingDependency\nraise MissingDependency('rdma', 'rdma')\n",
    )
    with pytest.raises(MissingDependency, match=r"pip install 'kvferry\[rdma\]'"):
        Registry("widget", {"needy": f"{needy}:C"}).load("needy", Base)
