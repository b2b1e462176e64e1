"""The router bench's part of the report: one subsection per ``kvferry bench router`` result.

Each holds the workers and the load, the command line when recorded, one row per (load,
policy): TTFT p50/p99, ITL p50, throughput, the hit rate the workers had and the one the router
predicted, preemptions and requests per worker; each policy over round-robin per load (the
run's own ratios); and the figure (:func:`kvferry.bench.router.plot.router_figure`, with the
run's identity at the foot). Also the router headline numbers. Nothing is measured here.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from kvferry.bench.router.harness import RouterBenchReport, RouterRun
from kvferry.bench.router.plot import router_figure
from kvferry.report import fmt
from kvferry.report.figures import identity, restamp, to_png
from kvferry.report.headline import Headline
from kvferry.report.inputs import LoadedResult
from kvferry.report.model import Figure, Section, Table

__all__ = ["TTFT_RATIO", "headlines", "run_row", "subsection"]

TTFT_RATIO = "time_to_first_token p50"
"""The metric name of the run's TTFT ratios (:func:`kvferry.bench.router.harness._ratios`)."""

RUN_COLUMNS = [
    "Load",
    "Policy",
    "Requests",
    "Errors",
    "TTFT p50 (ms)",
    "TTFT p99 (ms)",
    "ITL p50 (ms)",
    "Requests/s",
    "Output tokens/s",
    "Hit rate (workers)",
    "Hit rate (router predicted)",
    "Preemptions",
    "Requests per worker",
]


def run_row(r: RouterRun) -> list[str]:
    return [
        r.label,
        r.policy,
        fmt.count(r.requests),
        fmt.count(r.errors),
        fmt.num(r.ttft_p50_ms),
        fmt.num(r.ttft_p99_ms),
        fmt.num(r.itl_p50_ms),
        fmt.num(r.request_throughput),
        fmt.num(r.output_token_throughput),
        fmt.pct(r.hit_rate),
        fmt.pct(r.predicted_hit_rate),
        fmt.num(r.preemptions),
        ", ".join(str(n) for n in r.requests_per_worker) or fmt.DASH,
    ]


def _figure(item: LoadedResult, report: RouterBenchReport, index: int) -> Figure | None:
    if not report.cases:
        return None
    fig = router_figure(report)
    restamp(fig, identity(item))
    return Figure(
        f"router-{index}-policies",
        "Routing policies: TTFT and hit rate",
        to_png(fig),
        "Left: TTFT p50 (and p99) per policy and load; right: the hit rate the workers had "
        "and the one the router predicted.",
    )


def subsection(item: LoadedResult, index: int) -> Section:
    report = item.result
    assert isinstance(report, RouterBenchReport)
    o = report.options
    workers = (
        f"{len(o.worker_urls)} running workers"
        if o.worker_urls
        else f"a fresh fleet of {o.workers} mock engines per run ({o.num_blocks:,} blocks of "
        f"{o.block_size} tokens)"
    )
    load = (
        f"trace {o.trace}, first {o.trace_rows:,} rows"
        if o.trace
        else f"prefix-ratio workload, {o.requests} requests at {o.rate:g}/s, isl {o.isl}, "
        f"osl {o.osl}, {o.groups} groups"
    )
    intro = f"Policies {', '.join(o.policies)} on {workers}; load: {load}."
    tables = [
        Table(
            columns=RUN_COLUMNS,
            rows=[run_row(r) for r in report.cases],
            title="Runs (one per load and policy)",
            numeric=[False, False] + [True] * (len(RUN_COLUMNS) - 3) + [False],
            note="Hit rate at the workers: their own counters (blocks for mocks, tokens for "
            "vLLM), hits / lookups over the run.",
        )
    ]
    if report.ratios:
        tables.append(
            Table(
                columns=["Load", "Metric", "Ratio", "Value", "Reading"],
                rows=[
                    [
                        r.case,
                        r.metric,
                        f"{r.subject} / {r.reference}",
                        fmt.ratio(r.value),
                        "lower is better" if r.metric == TTFT_RATIO else "higher is better",
                    ]
                    for r in report.ratios
                ],
                title="Each policy over round-robin, per load",
                numeric=[False, False, False, True, False],
            )
        )
    fig = _figure(item, report, index)
    return Section(
        title=item.name,
        anchor=f"router-{index}",
        intro=intro,
        tables=tables,
        figures=[fig] if fig else [],
    )


def headlines(item: LoadedResult) -> Sequence[Headline]:
    report = item.result
    assert isinstance(report, RouterBenchReport)
    kv = [r for r in report.ratios if r.subject == "kv" and r.metric == TTFT_RATIO]
    if not kv:
        return []
    value = statistics.median(r.value for r in kv)
    loads = ", ".join(r.case for r in kv)
    return [
        Headline(
            "router kv / round-robin TTFT p50",
            value,
            "x",
            "median over loads of kv routing's TTFT p50 over round-robin's (below 1: kv "
            "routing is faster)",
            item.name,
            f"loads {loads}",
        )
    ]
