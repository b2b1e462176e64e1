"""The store bench (``kvferry bench store``, kvferry's master_bench) as a library.

Build :class:`StoreBenchOptions`, call :func:`run`, read the :class:`StoreBenchReport`
(a :class:`~kvferry.bench.result.BenchResult`)::

    from kvferry.bench.store import StoreBenchOptions, run

    report = run(StoreBenchOptions(backend="cpu", op="batch-get", value_size=4096))
    report.raise_for_failures()

:mod:`.options` (the options), :mod:`.backends` (the one table of backends and what each needs
before its clients start), :mod:`.client` (what one client process runs), :mod:`.report` (the
report, the merge of the clients' tallies, table cells and CSV) and :mod:`.harness` (``run``).
"""

from kvferry.bench.store.backends import BACKENDS, StoreBackend
from kvferry.bench.store.client import StoreBenchError
from kvferry.bench.store.harness import run
from kvferry.bench.store.options import OPS, StoreBenchOptions
from kvferry.bench.store.report import PhaseResult, StoreBenchReport, VerifyResult

__all__ = [
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
