"""The tuner's part of the report: one subsection per ``kvferry tune`` result.

Each says what was tuned for and what is recommended (or that the defaults stay), then every
step of the search (the value, what it was measured against, the per-round ratios, adopted or
not), the final run of the pick against the defaults, and for cache tuning each policy's
answer. No headline numbers and no findings: a tuning run is itself the decision. Every cell is
read from the result.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from kvferry.bench.tune.report import TuneReport
from kvferry.report import fmt
from kvferry.report.headline import Headline
from kvferry.report.inputs import LoadedResult
from kvferry.report.model import Section, Table

__all__ = ["headlines", "subsection"]


def _report(item: LoadedResult) -> TuneReport:
    report = item.result
    if not isinstance(report, TuneReport):
        raise TypeError(f"{item.name} is a {report.tool} result, not a tune result")
    return report


def _overrides(values: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def subsection(item: LoadedResult, index: int) -> Section:
    report = _report(item)
    if report.tuned:
        verdict = f"Recommended: {_overrides(report.tuned)}."
    elif report.picked:
        verdict = (
            f"The search picked {_overrides(report.picked)}, which did not beat the defaults in "
            "every round of the final run: keep the defaults."
        )
    else:
        verdict = "Nothing beat the defaults beyond noise: keep them."
    intro = f"kvferry tune {report.what} for {report.workload}"
    if report.metric:
        better = "higher" if report.higher_better else "lower"
        intro += f", objective {report.objective} ({report.metric}, {better} is better)"
    intro += f". {verdict}"
    if report.final_rounds:
        r = report.final_rounds
        intro += (
            f" Final run, the pick against the defaults: {report.metric} "
            f"x{statistics.median(r):.3f} over {len(r)} alternating rounds "
            f"({min(r):.3f}-{max(r):.3f})."
        )
    for caveat in report.caveats:
        intro += f" Caveat: {caveat}."
    tables = []
    if report.steps:
        tables.append(
            Table(
                columns=["Knob", "Value", "Against", f"{report.metric} ratio", "Rounds", "Adopted"],
                rows=[
                    [
                        s.knob,
                        s.value,
                        _overrides(s.against) or "defaults",
                        f"{s.median:.3f}",
                        ", ".join(f"{x:.3f}" for x in s.ratios),
                        "yes" if s.adopted else "no",
                    ]
                    for s in report.steps
                ],
                title="Search steps",
                numeric=[False, False, False, True, False, False],
                note="Each value against the best so far in alternating rounds of one run, "
                "candidate over best; adopted when every round improved and the median by 5%."
                + (
                    " Not measured (budget): " + ", ".join(f"{k}={v}" for k, v in report.untried)
                    if report.untried
                    else ""
                ),
            )
        )
    if report.choices:
        tables.append(
            Table(
                columns=[
                    "Policy",
                    "Capacity (blocks)",
                    "Capacity",
                    "Block hit rate",
                    "Prefill s saved",
                    "s saved / GB",
                ],
                rows=[
                    [
                        c.policy,
                        fmt.DASH if c.capacity_blocks is None else f"{c.capacity_blocks:,}",
                        fmt.DASH if c.capacity_bytes is None else fmt.size(c.capacity_bytes),
                        fmt.pct(c.block_hit_rate),
                        fmt.DASH
                        if c.prefill_seconds_saved is None
                        else fmt.num(c.prefill_seconds_saved),
                        fmt.DASH
                        if c.seconds_saved_per_gb is None
                        else fmt.num(c.seconds_saved_per_gb),
                    ]
                    for c in report.choices
                ],
                title="Each policy's answer",
                numeric=[False, True, True, True, True, True],
                note="From the hit-rate lab's simulations (exact: the same counts every run).",
            )
        )
    return Section(title=item.name, anchor=f"tune-{index}", intro=intro, tables=tables)


def headlines(item: LoadedResult) -> Sequence[Headline]:
    _report(item)
    return []
