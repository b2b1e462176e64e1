"""A tuning run as a lab result: :class:`TuneReport` (tool ``tune``), what ``kvferry tune
... --json`` writes and ``kvferry report`` reads.

Owns the result's fields and building it from the tuners' results (:func:`from_transfer`,
:func:`from_store`, :func:`from_cache`). It measures nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from kvferry.bench.result import BenchResult
from kvferry.bench.tune.cache import CacheChoice, CacheTuneResult
from kvferry.bench.tune.search import Step
from kvferry.bench.tune.store import StoreTuneResult
from kvferry.bench.tune.transfer import TransferTuneResult
from kvferry.config.units import format_size

__all__ = ["TuneReport", "from_cache", "from_store", "from_transfer"]


@dataclass(kw_only=True)
class TuneReport(BenchResult):
    """One ``kvferry tune`` run: the steps of the search, the pick, the final run against the
    defaults and the recommendation (empty: keep the defaults)."""

    tool: ClassVar[str] = "tune"

    what: str
    """``transfer``, ``store`` or ``cache``."""
    workload: str
    """The workload tuned for, in words (``1MiB x 16 x 1``: block x batch x threads; the command
    line has the rest)."""
    objective: str = ""
    metric: str = ""
    """What the ratios are of (``BW``, ``P99``, ``ops/s``); empty for cache."""
    higher_better: bool = True
    steps: list[Step] = field(default_factory=list)
    untried: list[tuple[str, str]] = field(default_factory=list)
    picked: dict[str, str] = field(default_factory=dict)
    """The search's pick, before the final run."""
    final_rounds: list[float] = field(default_factory=list)
    """The pick over the defaults, per alternating round of the final run."""
    tuned: dict[str, str] = field(default_factory=dict)
    """The recommendation: overrides of the defaults (empty: keep the defaults)."""
    caveats: list[str] = field(default_factory=list)
    choices: list[CacheChoice] = field(default_factory=list)
    """cache: each policy's answer."""
    search_seconds: float = 0.0


def from_transfer(result: TransferTuneResult) -> TuneReport:
    o = result.options
    return TuneReport(
        what="transfer",
        workload=f"{format_size(o.block_size)} x {o.batch_size} x {o.threads}",
        objective=o.objective,
        metric="BW" if o.higher_better else "P99",
        higher_better=o.higher_better,
        steps=list(result.search.steps),
        untried=list(result.search.untried),
        picked=dict(result.search.best),
        final_rounds=result.final_rounds,
        tuned=result.tuned,
        search_seconds=result.search.seconds,
    )


def from_store(result: StoreTuneResult) -> TuneReport:
    o, b = result.options, result.options.bench
    return TuneReport(
        what="store",
        workload=f"{b.backend} {b.op}, {format_size(b.value_size)} x {b.batch}",
        objective=o.objective,
        metric="ops/s" if o.higher_better else "P99",
        higher_better=o.higher_better,
        steps=list(result.search.steps),
        untried=list(result.search.untried),
        picked=dict(result.search.best),
        final_rounds=list(result.final_rounds),
        tuned=result.tuned,
        caveats=result.caveats,
        search_seconds=result.search.seconds,
    )


def from_cache(result: CacheTuneResult, question: str) -> TuneReport:
    o = result.options
    best = result.best
    tuned: dict[str, str] = {}
    if best is not None and best.capacity_blocks is not None:
        tuned["store.eviction_policy"] = best.policy
        if best.capacity_bytes is not None:
            tuned["cpu.capacity"] = str(best.capacity_bytes)
    return TuneReport(
        what="cache",
        workload=f"{o.trace or o.workload}: {question}",
        objective=question,
        tuned=tuned,
        choices=list(result.choices),
    )
