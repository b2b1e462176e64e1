"""The endpoint bench's part of the report: one subsection per ``kvferry bench serve`` result.

Each holds the target and the load, the exact command line when the result records it, one row
per level (TTFT, ITL and request latency p50/p99, request and output-token throughput, goodput
where SLOs were given, errors), the references and ratios a comparison run recorded (aiperf on
the same server), and, when the run swept two levels or more, two figures: TTFT, ITL and
throughput against the level, and the Pareto front of throughput against latency. Also the
serve headline numbers. It reads the report class's fields; nothing is measured here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvferry.bench.endpoint.harness import LevelResult, ServeBenchReport
from kvferry.report import fmt
from kvferry.report.figures import figure, log_if_spread, new_figure
from kvferry.report.headline import Headline
from kvferry.report.inputs import LoadedResult
from kvferry.report.model import Figure, Section, Table

__all__ = ["LevelFigures", "headlines", "level_figures", "level_row", "pareto", "subsection"]

TTFT = "time_to_first_token"
ITL = "inter_token_latency"
LATENCY = "request_latency"
REQ_TPUT = "request_throughput"
TOK_TPUT = "output_token_throughput"
GOODPUT = "goodput"

LEVEL_COLUMNS = [
    "#",
    "Level",
    "Requests",
    "Errors",
    "TTFT p50 (ms)",
    "TTFT p99 (ms)",
    "ITL p50 (ms)",
    "ITL p99 (ms)",
    "Latency p50 (ms)",
    "Latency p99 (ms)",
    "Requests/s",
    "Output tokens/s",
    "Goodput (req/s)",
]


@dataclass
class LevelFigures:
    """What the figures and the findings read of one level (None: not recorded)."""

    level: float
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    latency_p50: float | None
    requests_per_s: float | None
    tokens_per_s: float | None
    goodput: float | None


def level_figures(case: LevelResult) -> LevelFigures:
    m = case.metrics
    return LevelFigures(
        level=case.level.value,
        ttft_p50=m.value(TTFT, "p50"),
        ttft_p99=m.value(TTFT, "p99"),
        itl_p50=m.value(ITL, "p50"),
        itl_p99=m.value(ITL, "p99"),
        latency_p50=m.value(LATENCY, "p50"),
        requests_per_s=m.value(REQ_TPUT),
        tokens_per_s=m.value(TOK_TPUT),
        goodput=m.value(GOODPUT),
    )


def level_row(index: int, case: LevelResult) -> list[str]:
    m = case.metrics
    f = level_figures(case)
    return [
        str(index + 1),
        case.level.label,
        fmt.count(m.request_count) if m.request_count else fmt.DASH,
        fmt.count(m.error_count),
        fmt.num(f.ttft_p50),
        fmt.num(f.ttft_p99),
        fmt.num(f.itl_p50),
        fmt.num(f.itl_p99),
        fmt.num(f.latency_p50),
        fmt.num(m.value(LATENCY, "p99")),
        fmt.num(f.requests_per_s),
        fmt.num(f.tokens_per_s),
        fmt.num(f.goodput),
    ]


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (latency, throughput) points no other point beats on both (lower latency and higher
    throughput), by latency."""
    front: list[tuple[float, float]] = []
    for lat, tput in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or tput > front[-1][1]:
            front.append((lat, tput))
    return front


def _sweep(report: ServeBenchReport) -> list[LevelFigures] | None:
    kinds = {c.level.kind for c in report.cases}
    levels = [level_figures(c) for c in report.cases]
    if len(kinds) != 1 or kinds == {"fixed_schedule"} or len({f.level for f in levels}) < 2:
        return None
    return levels


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x


def _level_figure(item: LoadedResult, report: ServeBenchReport, index: int) -> list[Figure]:
    levels = _sweep(report)
    if levels is None:
        return []
    kind = report.cases[0].level.kind
    xlabel = (
        "concurrency (requests in flight)" if kind == "concurrency" else "request rate (requests/s)"
    )
    xs = [f.level for f in levels]
    fig = new_figure(width=12.0, height=4.4)
    ttft_ax, itl_ax, tput_ax = fig.subplots(1, 3)
    for ax, p50, p99, name in (
        (ttft_ax, [f.ttft_p50 for f in levels], [f.ttft_p99 for f in levels], "TTFT"),
        (itl_ax, [f.itl_p50 for f in levels], [f.itl_p99 for f in levels], "ITL"),
    ):
        ax.plot(xs, [_nan(v) for v in p50], marker="o", label="p50")
        ax.plot(xs, [_nan(v) for v in p99], marker="^", linestyle="--", label="p99")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name} vs load", fontsize=10)
        log_if_spread(ax, [v for v in p50 + p99 if v is not None])
        ax.legend(fontsize=8)
    tput_ax.plot(
        xs, [_nan(f.tokens_per_s) for f in levels], marker="o", color="C2", label="output tokens/s"
    )
    tput_ax.set_ylabel("output token throughput (tokens/s)")
    tput_ax.set_title("throughput vs load", fontsize=10)
    if any(f.goodput is not None for f in levels):
        req_ax = tput_ax.twinx()
        req_ax.plot(
            xs,
            [_nan(f.requests_per_s) for f in levels],
            marker="s",
            color="C4",
            linestyle=":",
            label="requests/s",
        )
        req_ax.plot(
            xs,
            [_nan(f.goodput) for f in levels],
            marker="x",
            color="C3",
            linestyle="--",
            label="goodput (requests/s meeting the SLOs)",
        )
        req_ax.set_ylabel("requests/s")
        req_ax.legend(fontsize=7, loc="lower right")
    tput_ax.legend(fontsize=8, loc="upper left")
    from matplotlib.ticker import NullLocator

    for ax in (ttft_ax, itl_ax, tput_ax):
        if log_if_spread(ax, xs, axis="x"):
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.xaxis.set_minor_locator(NullLocator())  # x only: a log y keeps its minor ticks
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"endpoint bench: {report.model} ({report.source})", fontsize=11)
    out = [
        figure(
            f"serve-{index}-levels",
            "TTFT, ITL and throughput vs load",
            fig,
            item,
            "p50 solid, p99 dashed; throughput is output tokens per second of the measured "
            "phase"
            + (
                "; goodput: requests per second meeting every SLO"
                if any(f.goodput is not None for f in levels)
                else ""
            ),
        )
    ]
    points = [(f.latency_p50, f.tokens_per_s, f.level) for f in levels]
    known = [(lat, tput, lv) for lat, tput, lv in points if lat is not None and tput is not None]
    if len(known) >= 2:
        fig = new_figure(width=7.5, height=5.0)
        ax = fig.subplots()
        ax.scatter(
            [p[0] for p in known], [p[1] for p in known], color="C0", zorder=3, label="level"
        )
        for lat, tput, lv in known:
            ax.annotate(
                f"{lv:g}", (lat, tput), textcoords="offset points", xytext=(5, 4), fontsize=8
            )
        front = pareto([(p[0], p[1]) for p in known])
        ax.plot(
            [p[0] for p in front],
            [p[1] for p in front],
            color="C3",
            linestyle="--",
            label="Pareto front (no level has both lower latency and more throughput)",
        )
        ax.set_xlabel("request latency p50 (ms)")
        ax.set_ylabel("output token throughput (tokens/s)")
        log_if_spread(ax, [p[0] for p in known], axis="x")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(
            f"throughput vs latency, points labelled by {kind.replace('_', ' ')}", fontsize=10
        )
        out.append(
            figure(
                f"serve-{index}-pareto",
                "Pareto front: throughput vs latency",
                fig,
                item,
                "Each level's output token throughput against its request latency p50; the "
                "dashed line joins the levels no other level beats on both.",
            )
        )
    return out


def subsection(item: LoadedResult, index: int) -> Section:
    report = item.result
    assert isinstance(report, ServeBenchReport)
    o = report.options
    target = f"{report.model or 'model not recorded'} at {report.url or o.url}"
    intro = (
        f"{target}, {o.endpoint} endpoint; input: {report.source or 'not recorded'}; "
        f"{len(report.cases)} level(s)."
    )
    if o.goodput:
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in o.goodput.items())
        intro += f" Goodput SLOs: {slos}."
    tables = [
        Table(
            columns=LEVEL_COLUMNS,
            rows=[level_row(i, c) for i, c in enumerate(report.cases)],
            title="Levels",
            numeric=[True, False] + [True] * (len(LEVEL_COLUMNS) - 2),
            note="Latencies in ms (percentiles over the level's requests); ITL = (latency - "
            "TTFT) / (output tokens - 1); throughputs over the measured phase's window.",
        )
    ]
    if report.references:
        tables.append(
            Table(
                columns=["Reference", "Value", "Unit"],
                rows=[[r.name, fmt.num(r.value), r.unit or fmt.DASH] for r in report.references],
                title="References measured in the same run",
                numeric=[False, True, False],
            )
        )
    if report.ratios:
        rows = []
        for r in report.ratios:
            lo, hi = r.spread
            rows.append(
                [
                    r.metric,
                    f"{r.subject} / {r.reference}",
                    fmt.ratio(r.value),
                    f"{fmt.ratio(lo)} - {fmt.ratio(hi)}",
                    str(len(r.rounds) or 1),
                ]
            )
        tables.append(
            Table(
                columns=["Metric", "Ratio", "Value", "Rounds min - max", "Rounds"],
                rows=rows,
                title="Ratios",
                numeric=[False, False, True, True, True],
            )
        )
    figures = _level_figure(item, report, index)
    if not figures and report.cases:
        intro += " One load level: no curve against load to draw."
    return Section(
        title=item.name,
        anchor=f"serve-{index}",
        intro=intro,
        tables=tables,
        figures=figures,
    )


def headlines(item: LoadedResult) -> Sequence[Headline]:
    report = item.result
    assert isinstance(report, ServeBenchReport)
    levels = [(c, level_figures(c)) for c in report.cases]
    with_tput = [(c, f) for c, f in levels if f.tokens_per_s is not None]
    out = []
    if with_tput:
        case, f = max(with_tput, key=lambda cf: cf[1].tokens_per_s or 0.0)
        out.append(
            Headline(
                "serve peak output throughput",
                f.tokens_per_s or 0.0,
                "tokens/s",
                "output tokens / seconds of the level's measured phase; the best level",
                item.name,
                case.level.label,
            )
        )
    with_ttft = [(c, f) for c, f in levels if f.ttft_p50 is not None]
    if with_ttft:
        case, f = min(with_ttft, key=lambda cf: cf[0].level.value)
        out.append(
            Headline(
                "serve TTFT p50 at the lightest load",
                f.ttft_p50 or 0.0,
                "ms",
                "median time to first token",
                item.name,
                case.level.label,
            )
        )
    return out
