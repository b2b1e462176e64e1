"""The doctor's part of the report: one subsection per ``kvferry doctor`` result.

Each holds the counts per status, one row per check (status, value, threshold, fix, why) and
the numbers the probes measured (wake-up p50/p99 and the grace period it suggests, Redis round
trips, H2D speed). Its headline numbers are the counts of FAIL and WARN checks; its findings
(one per WARN or FAIL check, with the check's value and threshold as evidence and its fix as
the recommendation) go to the report's findings through :mod:`.findings`. Nothing is measured
here: every cell is read from the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvferry.bench.doctor.report import DoctorReport
from kvferry.report import fmt
from kvferry.report.headline import Headline
from kvferry.report.inputs import LoadedResult
from kvferry.report.model import Finding, Section, Table

__all__ = ["CHECK_COLUMNS", "findings", "headlines", "subsection"]

CHECK_COLUMNS = ["Check", "Status", "Value", "Threshold", "Fix", "Why"]


def _report(item: LoadedResult) -> DoctorReport:
    report = item.result
    if not isinstance(report, DoctorReport):
        raise TypeError(f"{item.name} is a {report.tool} result, not a doctor result")
    return report


def subsection(item: LoadedResult, index: int) -> Section:
    report = _report(item)
    tables = [
        Table(
            columns=CHECK_COLUMNS,
            rows=[
                [c.name, c.status, c.value, c.threshold, c.fix or fmt.DASH, c.why]
                for c in report.checks
            ],
            title="Checks",
            note="SKIP: not applicable here (not configured, no such device) or the file it "
            "reads is absent; WARN and FAIL are listed under Bottlenecks and recommendations.",
        )
    ]
    if report.measurements:
        tables.append(
            Table(
                columns=["Measurement", "Value"],
                rows=[[k, fmt.num(v)] for k, v in report.measurements.items()],
                title="What the probes measured",
                numeric=[False, True],
                note="Wake-up: a thread asleep on an event, set from another thread, in "
                "microseconds; the grace period suggested is the median rounded up to 10 us.",
            )
        )
    return Section(
        title=item.name,
        anchor=f"doctor-{index}",
        intro=f"kvferry doctor on {report.environment.host or 'an unrecorded host'}: "
        f"{report.summary()}.",
        tables=tables,
    )


def headlines(item: LoadedResult) -> Sequence[Headline]:
    counts = _report(item).counts()
    return [
        Headline("doctor checks FAIL", counts["FAIL"], "", "checks of kvferry doctor that "
                 "failed: the machine or config breaks kvferry there", item.name),
        Headline("doctor checks WARN", counts["WARN"], "", "checks of kvferry doctor that "
                 "warned: kvferry runs, slower or less safely than it could", item.name),
    ]  # fmt: skip


def findings(item: LoadedResult) -> Iterable[Finding]:
    """One finding per WARN or FAIL check: the check is the evidence, its fix the advice."""
    for c in _report(item).checks:
        if c.status not in ("WARN", "FAIL"):
            continue
        yield Finding(
            severity="bad" if c.status == "FAIL" else "warn",
            title=f"doctor check {c.name}",
            detail=c.why,
            evidence=f"{item.name}: {c.name} = {c.value} (threshold: {c.threshold})",
            recommendation=c.fix,
            rule=f"doctor.{c.name}",
        )
