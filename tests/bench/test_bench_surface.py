"""The public surface of the transfer and store benches and the launcher, pinned.

Every module lists its public names in ``__all__``: each name there exists, and each public
class or function the module defines is there (a new one is a decision, not an accident). The
packages' own surfaces, what a Python user imports, are pinned name by name.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "kvferry.launcher",
    "kvferry.bench.references",
    "kvferry.bench.fio",
    "kvferry.bench.transfer",
    "kvferry.bench.transfer.options",
    "kvferry.bench.transfer.cases",
    "kvferry.bench.transfer.targets",
    "kvferry.bench.transfer.report",
    "kvferry.bench.transfer.harness",
    "kvferry.bench.transfer.backends.base",
    "kvferry.bench.transfer.backends.registry",
    "kvferry.bench.transfer.backends.kvferry",
    "kvferry.bench.transfer.backends.mooncake",
    "kvferry.bench.store",
    "kvferry.bench.store.options",
    "kvferry.bench.store.backends",
    "kvferry.bench.store.client",
    "kvferry.bench.store.report",
    "kvferry.bench.store.harness",
    "kvferry.cli.bench_cmd",
    "kvferry.testing.ready",
    "kvferry.testing.engines",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_the_modules_public_surface(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(set(exported)) == len(exported), f"{name}.__all__ repeats a name"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not have: {missing}"
    defined = [
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == name
    ]
    unlisted = sorted(set(defined) - set(exported))
    assert not unlisted, f"{name} defines public {unlisted} but leaves them out of __all__"


def test_the_packages_surfaces() -> None:
    import kvferry.bench.store as store
    import kvferry.bench.transfer as transfer
    import kvferry.launcher as launcher

    assert sorted(transfer.__all__) == [
        "Case",
        "CaseResult",
        "ConsistencyError",
        "ContenderInfo",
        "ContenderSpec",
        "TransferBenchOptions",
        "TransferBenchReport",
        "parse_contenders",
        "run",
    ]
    assert sorted(store.__all__) == [
        "BACKENDS",
        "OPS",
        "PhaseResult",
        "StoreBackend",
        "StoreBenchError",
        "StoreBenchOptions",
        "StoreBenchReport",
        "VerifyResult",
        "run",
    ]
    assert sorted(launcher.__all__) == ["Child", "LaunchError", "Match", "await_line", "launch"]


def test_the_reports_are_the_ones_load_result_reads() -> None:
    from kvferry.bench.result import result_class
    from kvferry.bench.store import StoreBenchReport
    from kvferry.bench.transfer import TransferBenchReport

    assert result_class("transfer") is TransferBenchReport
    assert result_class("store") is StoreBenchReport
