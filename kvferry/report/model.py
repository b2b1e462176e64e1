"""The report as a document, before it is drawn: sections of tables, figures and findings.

Every part of the report builds these (one section per bench, the setup, the findings, a
comparison) and the renderers draw them, HTML and Markdown alike, so both show the same content.
Nothing here measures: every number in a table cell comes from a result file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kvferry.errors import KvferryError

__all__ = [
    "Candidate",
    "Figure",
    "Finding",
    "ReportDoc",
    "ReportError",
    "Section",
    "Severity",
    "Table",
]

Severity = Literal["info", "warn", "bad", "good"]


class ReportError(KvferryError):
    """A report that cannot be written (the path, and why)."""


@dataclass
class Table:
    """Rows of already formatted cells; ``numeric`` columns are right-aligned."""

    columns: list[str]
    rows: list[list[str]]
    title: str = ""
    numeric: list[bool] = field(default_factory=list)
    note: str = ""
    """A line under the table: units, definitions, where the numbers come from."""


@dataclass
class Figure:
    """One plot as PNG bytes (embedded in HTML as a data URI; written beside the Markdown)."""

    name: str
    """A file-name-safe stem, unique in the report (``transfer-bw``)."""
    title: str
    png: bytes = field(repr=False)
    caption: str = ""


@dataclass(frozen=True)
class Candidate:
    """One config change a finding suggests, and what measures it on the user's machine.

    ``overrides`` are dotted config keys and values as ``--set`` takes them. ``bench`` and
    ``params`` say how ``kvferry advise --verify`` measures the change against the config the
    result ran with (:mod:`kvferry.report.advise`); ``command`` is the same check as a command
    line a user can run."""

    overrides: tuple[tuple[str, str], ...]
    bench: str
    """``transfer``, ``store`` or ``hitrate``: the bench that measures it."""
    objective: str
    """What must improve: ``bw`` (higher), ``p99`` (lower), ``no_space`` (fewer), ``hit_rate``."""
    params: tuple[tuple[str, object], ...] = ()
    """The case to measure on (block size, batch, threads, transport, ...), from the evidence."""
    command: str = ""

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.overrides)


@dataclass
class Finding:
    """A bottleneck or a recommendation, with the evidence it follows from."""

    severity: Severity
    title: str
    detail: str
    evidence: str
    """Where it comes from: the run, the case and the values (``transfer 4096B x128: p99/avg
    = 3.1``)."""
    recommendation: str = ""
    rule: str = ""
    """The rule that made it (``transfer.tail``): stable, for tests and ``kvferry advise``."""
    candidates: list[Candidate] = field(default_factory=list)
    """Config changes worth measuring (``kvferry advise --verify`` keeps those that helped)."""
    source: str = ""
    """The result file the candidates are measured against (set by the rules' runner)."""


@dataclass
class Section:
    title: str
    anchor: str
    intro: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    subsections: list[Section] = field(default_factory=list)


@dataclass
class ReportDoc:
    title: str
    generated_at: float
    """Unix time the report was built."""
    sources: list[str]
    """The result files it was built from."""
    sections: list[Section] = field(default_factory=list)
    headline: list[tuple[str, str]] = field(default_factory=list)
    """(label, formatted value with unit): the few numbers printed after ``make run``."""
    meta: list[tuple[str, str]] = field(default_factory=list)
    """(label, value) lines under the title: when the report was built, and the hosts, commits
    and times of the runs it shows."""
