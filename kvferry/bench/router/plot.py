"""The router bench's figure: TTFT and hit rate of each routing policy, per load.

A prefix-ratio sweep draws lines against the prefix ratio: on the left TTFT p50 (solid) and
p99 (dashed) in ms, on the right the hit rate the workers had (solid) and the one the router
predicted (dotted). A trace (one load) draws the same as bars per policy. The run's identity is
at the foot (:func:`kvferry.bench.plots.stamp`). It draws what the report holds and computes
no result; matplotlib (the ``plot`` extra) is imported only here, on a figure of its own.
"""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING

from kvferry.bench.plots import run_date, stamp
from kvferry.bench.router.harness import RouterBenchReport
from kvferry.errors import MissingDependency

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_router", "router_figure", "router_identity"]


def router_identity(report: RouterBenchReport) -> list[str]:
    """The identity lines of a ``bench router`` run: workers, load, date, host."""
    o = report.options
    if o.worker_urls:
        workers = f"{len(o.worker_urls)} workers at {', '.join(o.worker_urls)}"
    else:
        workers = (
            f"a fresh fleet of {o.workers} kvferry serve mock per run ({o.num_blocks} blocks of "
            f"{o.block_size} tokens, speed-up {o.speedup_ratio:g})"
        )
    if o.trace:
        load = (
            f"trace {o.trace}, first {o.trace_rows} rows, blocks / {o.trace_scale}, "
            f"speedup {o.speedup:g}"
        )
    else:
        load = (
            f"prefix-ratio workload: {o.requests} requests at {o.rate:g}/s, isl {o.isl}, "
            f"osl {o.osl}, {o.groups} groups"
        )
    return [
        f"kvferry bench router: {', '.join(o.policies)} on {workers}",
        f"{load}; {run_date()} on {platform.node()}",
    ]


def router_figure(report: RouterBenchReport) -> Figure:
    """The figure (module docstring).

    Raises:
        MissingDependency: matplotlib is not installed (the ``plot`` extra).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependency("matplotlib", "plot") from e

    policies = list(dict.fromkeys(c.policy for c in report.cases))
    labels = list(dict.fromkeys(c.label for c in report.cases))
    sweep = len(labels) > 1 and all(c.prefix_ratio is not None for c in report.cases)
    basis = report.cases[0].hit_rate_basis if report.cases else "blocks"
    fig = Figure(figsize=(11, 4.6))
    left, right = fig.subplots(1, 2)
    width = 0.8 / max(1, len(policies))
    for i, policy in enumerate(policies):
        runs = [c for c in report.cases if c.policy == policy]
        p50 = [c.ttft_p50_ms if c.ttft_p50_ms is not None else float("nan") for c in runs]
        p99 = [c.ttft_p99_ms if c.ttft_p99_ms is not None else float("nan") for c in runs]
        hit = [c.hit_rate for c in runs]
        predicted = [c.predicted_hit_rate for c in runs]
        color = f"C{i}"
        if sweep:
            xs = [c.prefix_ratio for c in runs]
            left.plot(xs, p50, marker="o", color=color, label=f"{policy} p50")
            left.plot(xs, p99, marker="^", linestyle="--", color=color, label=f"{policy} p99")
            right.plot(xs, hit, marker="o", color=color, label=f"{policy} at the workers")
            right.plot(
                xs, predicted, marker="x", linestyle=":", color=color,
                label=f"{policy} predicted by the router",
            )  # fmt: skip
            continue
        at = [labels.index(c.label) + (i - (len(policies) - 1) / 2) * width for c in runs]
        left.bar(at, p50, width, color=color, label=f"{policy} p50")
        left.scatter(at, p99, marker="^", color="black", zorder=3)
        right.bar(at, hit, width, color=color, label=f"{policy} at the workers")
        right.scatter(at, predicted, marker="x", color="black", zorder=3)
    if sweep:
        ratios = sorted({c.prefix_ratio for c in report.cases if c.prefix_ratio is not None})
        for ax in (left, right):
            ax.set_xlabel("prefix ratio (shared share of each prompt)")
            ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    else:
        for ax in (left, right):
            ax.set_xticks(range(len(labels)), labels)
        left.set_title("TTFT p50 (bars), p99 (triangles)", fontsize=10)
        right.set_title("hit rate at the workers (bars), predicted (x)", fontsize=10)
    left.set_ylabel("time to first token (ms)")
    right.set_ylabel(f"prefix-cache hit rate ({basis.removesuffix('s')}-weighted, 0..1)")
    right.set_ylim(0, 1)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"routing policies: {' vs '.join(policies)}", fontsize=11)
    stamp(fig, router_identity(report))
    return fig


def plot_router(report: RouterBenchReport, path: str | os.PathLike[str]) -> None:
    """Write :func:`router_figure` to ``path`` (PNG).

    Raises:
        MissingDependency: matplotlib is not installed.
        RouterBenchError: the file cannot be written.
    """
    from kvferry.bench.router.fleet import RouterBenchError

    fig = router_figure(report)
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise RouterBenchError(f"cannot write the plot to {str(path)!r}: {e.strerror or e}") from e
