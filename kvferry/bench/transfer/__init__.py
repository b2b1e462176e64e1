"""The transfer bench (``kvferry bench transfer``, kvferry's tebench) as a library.

Build :class:`TransferBenchOptions`, call :func:`run`, read the :class:`TransferBenchReport`
(a :class:`~kvferry.bench.result.BenchResult`)::

    from kvferry.bench.transfer import TransferBenchOptions, run

    report = run(TransferBenchOptions(backend="kvferry,mooncake", transport="tcp", rounds=3))
    report.write("transfer.json")

:mod:`.options` (the options and the ``NAME+SECTION.KEY=VALUE`` contender grammar),
:mod:`.cases` (the grid, the timed loop, one case's result), :mod:`.targets` (engines and their
targets), :mod:`.report` (the report, its table cells and CSV), :mod:`.harness` (``run``) and
:mod:`.backends` (the engines behind
:class:`~kvferry.bench.transfer.backends.base.TransferBenchBackend`: kvferry's and Mooncake's).
"""

from kvferry.bench.transfer.cases import Case, CaseResult, ConsistencyError
from kvferry.bench.transfer.harness import run
from kvferry.bench.transfer.options import ContenderSpec, TransferBenchOptions, parse_contenders
from kvferry.bench.transfer.report import ContenderInfo, TransferBenchReport

__all__ = [
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
