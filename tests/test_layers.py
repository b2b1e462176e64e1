"""Imports run one way: every module of kvferry imports only its own layer and the layers below.

The table below is the architecture (docs/architecture.md draws it). A module's layer is the
longest prefix of its dotted name found in the table. Every import counts: module level,
inside a function, and under ``TYPE_CHECKING``, since each is a dependency a reader must follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kvferry

ROOT = Path(kvferry.__file__).parent

# Lowest first. A module may import modules of its own layer or of any layer before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "primitives",
        (
            "kvferry.errors",
            "kvferry.version",
            "kvferry.plugins",
            "kvferry.admission",
            "kvferry.observe",
            "kvferry.index",
            "kvferry.tables",
            "kvferry.launcher",
        ),
    ),
    ("config", ("kvferry.config",)),
    ("transfer", ("kvferry.transfer",)),
    ("backends", ("kvferry.backends",)),
    ("store", ("kvferry.store",)),
    ("telemetry", ("kvferry.telemetry",)),
    ("serving", ("kvferry.serving",)),
    ("lab", ("kvferry.bench",)),
    ("report", ("kvferry.report",)),
    ("cli", ("kvferry.cli", "kvferry.__main__")),
    ("facade", ("kvferry",)),
    ("testing", ("kvferry.testing",)),
]

# Edges that break the table today, each with the issue that removes it. Empty is the goal.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _layer_of(module: str) -> int:
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best < 0:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it")
    return best


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # ``from kvferry.bench import stats`` imports the submodule kvferry.bench.stats
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (ROOT.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                    ROOT.parent / candidate.replace(".", "/") / "__init__.py"
                ).exists():
                    found.add(candidate)
    return {name for name in found if name == "kvferry" or name.startswith("kvferry.")}


def _all_edges() -> list[tuple[str, str]]:
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        for target in sorted(_imports(path, module)):
            edges.append((module, target))
    return edges


def test_every_module_is_in_a_layer() -> None:
    for path in ROOT.rglob("*.py"):
        _layer_of(_module_name(path))


def test_imports_run_down_the_layers() -> None:
    upward = []
    for module, target in _all_edges():
        if _layer_of(target) > _layer_of(module) and (module, target) not in KNOWN_UPWARD:
            upward.append(
                f"{module} ({LAYERS[_layer_of(module)][0]}) imports {target} "
                f"({LAYERS[_layer_of(target)][0]})"
            )
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_known_upward_edges_still_exist() -> None:
    """An exception that no longer happens is deleted from the table, so it cannot come back."""
    edges = set(_all_edges())
    assert edges >= KNOWN_UPWARD, f"remove from KNOWN_UPWARD: {sorted(KNOWN_UPWARD - edges)}"


def test_nothing_outside_testing_imports_testing() -> None:
    offenders = [
        f"{module} imports {target}"
        for module, target in _all_edges()
        if target.startswith("kvferry.testing") and not module.startswith("kvferry.testing")
    ]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("module", ["kvferry.serving.vllm.config", "kvferry.serving.vllm.metrics"])
def test_connector_settings_import_without_vllm(module: str) -> None:
    """The connector's settings and metrics are read by the router and the CLI, which run where
    vLLM is not installed: importing them must not import vLLM."""
    import subprocess
    import sys

    code = f"import sys, {module}; assert 'vllm' not in sys.modules, 'vllm was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
