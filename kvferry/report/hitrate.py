"""The hit-rate lab's part of the report: one subsection per ``kvferry bench hitrate`` result.

Each holds the trace's figures, every case (policy, tiers, capacity, the block-weighted hit rate
with the per-request mean beside it, the token-weighted rate, lookups/s), the trace's reuse
ceiling, the capacity advice, the reference curve's points, and the figure
(:func:`kvferry.bench.plots.hitrate_figure`: hit rate against capacity per policy with the
reference curve, here with the ceiling drawn and the run's own identity at the foot). Also the
hit-rate headline numbers. It reads the report class's fields; no hit rate is computed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvferry.bench.hitrate import HitRateReport
from kvferry.bench.hitrate.simulation import HitRateResult
from kvferry.bench.plots import hitrate_figure
from kvferry.report import fmt
from kvferry.report.figures import identity, restamp, to_png
from kvferry.report.headline import Headline
from kvferry.report.inputs import LoadedResult
from kvferry.report.model import Figure, Section, Table

__all__ = ["Ceiling", "case_row", "ceiling", "headlines", "subsection"]

CASE_COLUMNS = [
    "Mode",
    "Policy",
    "Tiers",
    "Capacity (blocks)",
    "Capacity",
    "Block hit rate",
    "Per-request mean",
    "Token hit rate",
    "Lookups/s",
    "Engine",
]


@dataclass
class Ceiling:
    """The best block hit rate the trace allows: what no capacity can beat."""

    value: float
    measured: bool
    """True: a case's capacity held every distinct block (nothing was evicted), so its rate is
    the infinite cache's. False: the bound 1 - distinct blocks / blocks (every block a hit
    after its first sight), which prefix semantics may keep a little below."""

    @property
    def text(self) -> str:
        how = "an infinite cache's, measured" if self.measured else "1 - distinct / blocks"
        return f"{fmt.pct(self.value)} ({how})"


def ceiling(report: HitRateReport) -> Ceiling | None:
    """The trace's reuse ceiling (:class:`Ceiling`), None when the result cannot tell it."""
    distinct = report.distinct_blocks
    if distinct is None or not report.blocks:
        return None
    full = [
        r.block_hit_rate
        for r in report.cases
        if r.mode == "simulate" and r.capacity_blocks is not None and r.capacity_blocks >= distinct
    ]
    if full:
        return Ceiling(max(full), True)
    return Ceiling(1.0 - distinct / report.blocks, False)


def case_row(report: HitRateReport, r: HitRateResult) -> list[str]:
    bb = report.block_bytes
    cap = r.capacity_blocks
    return [
        r.mode,
        r.policy,
        " + ".join(f"{t.name}:{fmt.count(t.capacity_blocks)}" for t in r.tiers),
        fmt.count(cap),
        fmt.size(cap * bb) if cap is not None and bb else fmt.DASH,
        fmt.pct(r.block_hit_rate),
        fmt.pct(r.request_mean_hit_rate),
        fmt.pct(r.token_hit_rate),
        fmt.num(r.lookups_per_s),
        r.engine,
    ]


def _figure(item: LoadedResult, report: HitRateReport, index: int) -> Figure | None:
    if not any(r.capacity_blocks is not None for r in report.cases):
        return None
    fig = hitrate_figure(report, reference_label=f"reference: {report.reference_name() or ''}")
    top = ceiling(report)
    ax = fig.axes[0]
    if top is not None:
        ax.axhline(top.value, color="0.45", linestyle=(0, (1, 1)), linewidth=1.0, zorder=1)
        ax.annotate(
            f"reuse ceiling {top.text}",
            (0.01, top.value),
            xycoords=("axes fraction", "data"),
            ha="left",
            va="bottom",
            fontsize=8,
            color="0.3",
        )
    restamp(fig, identity(item))
    caption = (
        "Block-weighted prefix hit rate against cache capacity (log scale), one curve per "
        "policy"
        + (", the published reference curve dashed" if report.reference_curve() else "")
        + ("; dotted grey: the trace's reuse ceiling" if top else "")
    )
    return Figure(f"hitrate-{index}-curve", "Hit rate vs capacity", to_png(fig), caption)


def subsection(item: LoadedResult, index: int) -> Section:
    report = item.result
    assert isinstance(report, HitRateReport)
    top = ceiling(report)
    distinct = f", {report.distinct_blocks:,} distinct" if report.distinct_blocks else ""
    kv = f", {fmt.size(report.block_bytes)} of KV per block" if report.block_bytes else ""
    intro = (
        f"Trace {report.source}: {report.requests:,} requests over "
        f"{fmt.num(report.trace_duration_s)} s, {report.blocks:,} blocks looked up{distinct}, "
        f"{report.block_tokens} tokens per block{kv}."
        + (f" Reuse ceiling: {top.text}." if top else "")
    )
    tables = [
        Table(
            columns=CASE_COLUMNS,
            rows=[case_row(report, r) for r in report.cases],
            title="Cases",
            numeric=[False, False, False, True, True, True, True, True, True, False],
            note="Block hit rate: leading hit blocks / blocks looked up (block-weighted); "
            "per-request mean: the mean of each request's hit fraction; token hit rate: hit "
            "tokens / input tokens.",
        )
    ]
    if report.advice:
        bb = report.block_bytes
        rows = []
        for a in report.advice:
            cap = sum(t.capacity_blocks or 0 for t in a.tiers)
            rows.append(
                [
                    a.policy,
                    fmt.pct(a.target),
                    "yes" if a.reachable else "no",
                    f"{cap:,}",
                    fmt.size(cap * bb) if bb else fmt.DASH,
                    fmt.pct(a.block_hit_rate),
                    str(a.runs),
                    a.note,
                ]
            )
        tables.append(
            Table(
                columns=[
                    "Policy",
                    "Target",
                    "Reachable",
                    "Capacity (blocks)",
                    "Capacity",
                    "Block hit rate there",
                    "Simulations",
                    "Note",
                ],
                rows=rows,
                title="Capacity advice: the smallest capacity reaching the target",
                numeric=[False, True, False, True, True, True, True, False],
            )
        )
    curve = report.reference_curve()
    if curve:
        tables.append(
            Table(
                columns=["Capacity (blocks)", "Reference hit rate"],
                rows=[[fmt.num(int(c) if c.is_integer() else c), fmt.pct(v, 2)] for c, v in curve],
                title=f"Reference curve: {report.reference_name()}",
                numeric=[True, True],
                note="Points of a published curve, read in with --reference; not measured here.",
            )
        )
    fig = _figure(item, report, index)
    return Section(
        title=item.name,
        anchor=f"hitrate-{index}",
        intro=intro,
        tables=tables,
        figures=[fig] if fig else [],
    )


def headlines(item: LoadedResult) -> Sequence[Headline]:
    report = item.result
    assert isinstance(report, HitRateReport)
    sized = [r for r in report.cases if r.capacity_blocks is not None]
    if not sized:
        return []
    first = sized[0].policy
    top = max((r for r in sized if r.policy == first), key=lambda r: r.capacity_blocks or 0)
    case = f"{top.policy} at {top.capacity_blocks:,} blocks"
    out = [
        Headline(
            "hit rate at the largest capacity (block-weighted)",
            top.block_hit_rate,
            "%",
            "leading hit blocks / blocks looked up",
            item.name,
            case,
        ),
        Headline(
            "hit rate at the largest capacity (per-request mean)",
            top.request_mean_hit_rate,
            "%",
            "mean of each request's hit fraction",
            item.name,
            case,
        ),
    ]
    bound = ceiling(report)
    if bound is not None:
        out.append(
            Headline(
                "trace reuse ceiling (block-weighted)",
                bound.value,
                "%",
                "the best hit rate any capacity can reach on this trace",
                item.name,
                "measured" if bound.measured else "1 - distinct / blocks",
            )
        )
    return out
