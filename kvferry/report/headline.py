"""Headline metrics: the few numbers a reader takes away, each with its unit, its definition
and the run and case it comes from.

Owns :class:`Headline` (what each bench's section module returns for its results) and the
headline section: the table of every result's headline numbers and the definitions the whole
report uses (GB, percentiles, hit-rate weighting). The numbers are read from results by the
bench modules; nothing here measures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvferry.report import fmt
from kvferry.report.model import Section, Table

__all__ = ["DEFINITIONS", "Headline", "headline_section"]

DEFINITIONS: list[tuple[str, str]] = [
    ("GB, GB/s", "10^9 bytes (KiB, MiB, GiB are powers of 1024: block and buffer sizes)"),
    (
        "percentiles (p50, p99, p99.9)",
        "linear interpolation between closest ranks, rank = p/100 x (n - 1), as numpy's "
        "'linear' method and Mooncake's tebench (kvferry.bench.stats)",
    ),
    (
        "block hit rate",
        "leading hit blocks / blocks looked up over the whole trace (block-weighted: a ratio "
        "of sums, so long prompts weigh more)",
    ),
    (
        "per-request mean hit rate",
        "the mean over requests of each request's hit blocks / blocks (every request weighs "
        "the same); shown beside the block-weighted rate",
    ),
    (
        "transfer BW",
        "bytes moved / 1e9 / wall seconds of the case, threads averaged (tebench's definition)",
    ),
    ("P99 Tx", "99th percentile of the per-batch submit-to-completion time (microseconds)"),
    (
        "TTFT, ITL",
        "time to first token; inter-token latency = (request latency - TTFT) / (output tokens "
        "- 1), aiperf's definitions",
    ),
    ("goodput", "requests per second that met every SLO given with --goodput"),
]
"""Every definition the report's numbers follow, shown once in the headline section."""


@dataclass
class Headline:
    """One headline number."""

    label: str
    """What it is (``transfer peak bandwidth``)."""
    value: float
    unit: str
    definition: str
    run: str
    """The run's name in the report."""
    case: str = ""
    """The case it comes from, where it is one case's."""
    digits: int = 3

    @property
    def formatted(self) -> str:
        if self.unit == "%":
            return fmt.pct(self.value)
        if self.unit == "x":
            return fmt.ratio(self.value)
        text = fmt.num(self.value, self.digits)
        return f"{text} {self.unit}" if self.unit and math.isfinite(self.value) else text


def headline_section(headlines: Sequence[Headline]) -> Section:
    """The headline table (one row per number, with where it comes from) and the definitions."""
    rows = [
        [h.label, h.formatted, h.definition, h.run + (f", {h.case}" if h.case else "")]
        for h in headlines
    ]
    table = Table(
        columns=["Metric", "Value", "Definition", "Source (run, case)"],
        rows=rows,
        title="Headline numbers",
        numeric=[False, True, False, False],
        note="Each number is read from the result file named in its row.",
    )
    definitions = Table(
        columns=["Term", "Definition"],
        rows=[[term, text] for term, text in DEFINITIONS],
        title="Definitions",
    )
    return Section(
        title="Headline metrics",
        anchor="headline",
        intro="" if headlines else "No result in this report has a headline number.",
        tables=[table, definitions] if headlines else [definitions],
    )
