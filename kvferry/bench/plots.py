"""Figures of the benches: the run identity every figure carries, and the hit-rate figure.

Owns :func:`stamp` (a footer naming the tool, the target or trace, the load, the date and the
host, so a PNG found later says which run drew it), the identity lines of ``bench serve`` and
``bench hitrate`` runs, and the hit-rate-versus-capacity figure. It draws what a report holds and
computes no result. matplotlib (the ``plot`` extra) is imported only by the functions that draw,
and the figures are :class:`matplotlib.figure.Figure` objects of their own (no pyplot state).
"""

from __future__ import annotations

import datetime
import os
import platform
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from kvferry.config.units import format_size_approx

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

    from kvferry.bench.endpoint.harness import ServeBenchReport
    from kvferry.bench.hitrate import HitRateReport

IDENTITY_GID = "run-identity"
"""The gid of the footer text :func:`stamp` adds (tests find it by it)."""

FOOTER_FONT_PT = 7.5

LEGEND_INSIDE = 4
"""A legend of more entries goes beside the axes."""

MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", "-.", ":")


def run_date() -> str:
    """Now, as figures print it: minutes, UTC."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def stamp(fig: Figure, lines: Sequence[str]) -> None:
    """Write ``lines`` (the run's identity) small at the foot of ``fig``, wrapped to its width,
    and lay the axes out above them. Call it last, before saving."""
    width_pt = fig.get_figwidth() * 72
    chars = max(40, int(width_pt / (FOOTER_FONT_PT * 0.55)))
    wrapped = [part for line in lines for part in textwrap.wrap(line, chars) or [""]]
    fig.text(
        0.01,
        0.01,
        "\n".join(wrapped),
        ha="left",
        va="bottom",
        fontsize=FOOTER_FONT_PT,
        color="0.3",
        gid=IDENTITY_GID,
    )
    foot = (len(wrapped) * FOOTER_FONT_PT * 1.3 + 6) / 72 / fig.get_figheight()
    fig.tight_layout(rect=(0, foot, 1, 1))


def serve_identity(report: ServeBenchReport, run_name: str) -> list[str]:
    """The identity lines of a ``bench serve`` run: run name, target, load, date, host."""
    levels = report.cases
    if levels and levels[0].level.kind == "fixed_schedule":
        load = "the source's own schedule"
    elif levels:
        kind = levels[0].level.label.rsplit(" ", 1)[0]
        load = f"{kind} {', '.join(f'{r.level.value:g}' for r in levels)}"
    else:
        load = "no level ran"
    return [
        f"kvferry bench serve, run {run_name}: {report.model} at {report.url}",
        f"{report.source}; {load}; {run_date()} on {platform.node()}",
    ]


def hitrate_identity(report: HitRateReport) -> list[str]:
    """The identity lines of a ``bench hitrate`` run: trace, geometry, mode, date, host."""
    replay = any(r.mode == "replay" for r in report.cases)
    kv = report.kv_bytes_per_token
    geometry = f"; KV {format_size_approx(kv)} per token" if kv else ""
    return [
        f"kvferry bench hitrate ({'replay' if replay else 'simulation'}): {report.source}",
        f"{report.requests:,} requests, {report.blocks:,} blocks of {report.block_tokens} "
        f"tokens{geometry}; {run_date()} on {platform.node()}",
    ]


def _same(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return len(a) == len(b) and all(
        x == u and abs(y - v) < 1e-9 for (x, y), (u, v) in zip(a, b, strict=True)
    )


def hitrate_figure(
    report: HitRateReport,
    *,
    weighting: Literal["block", "token"] = "block",
    reference_label: str = "reference",
) -> Figure:
    """Hit rate versus capacity: one curve per policy (and tier pipeline shape), each with its
    own marker and line style, a curve equal to an earlier one labelled so; the reference curve
    dashed black; each ``--target-hit-rate`` advice marked at its capacity; a GiB axis on top
    when the KV geometry is known; the run's identity at the foot.

    Raises:
        ModuleNotFoundError: matplotlib is missing.
    """
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    curves: dict[str, list[tuple[int, float]]] = {}
    for r in report.cases:
        if r.capacity_blocks is None:
            continue
        label = (
            r.policy if len(r.tiers) == 1 else f"{r.policy} ({'+'.join(t.name for t in r.tiers)})"
        )
        rate = r.block_hit_rate if weighting == "block" else r.token_hit_rate
        curves.setdefault(label, []).append((r.capacity_blocks, rate))
    fig = Figure(figsize=(7.5, 5.2))
    ax = fig.subplots()
    drawn: dict[str, list[tuple[int, float]]] = {}
    colors: dict[str, str] = {}  # policy -> the color of its (first) curve
    for i, (label, points) in enumerate(curves.items()):
        points.sort()
        twin = next((name for name, other in drawn.items() if _same(points, other)), None)
        # Each curve is drawn thinner, with smaller markers, than the one before, over it: two
        # curves on the same points (LRU and length-aware often are) stay visible as a thin
        # line on a thick one and a marker inside a hollow marker.
        (line,) = ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker=MARKERS[i % len(MARKERS)],
            linestyle=LINESTYLES[i % len(LINESTYLES)],
            markersize=max(3.5, 11.0 - 3.0 * i),
            markerfacecolor="none" if i == 0 else None,
            markeredgewidth=1.6,
            linewidth=max(1.0, 3.2 - 0.9 * i),
            zorder=2 + i,
            label=label + (f" (same points as {twin})" if twin else ""),
        )
        colors.setdefault(label.split(" ")[0], to_hex(line.get_color()))
        drawn[label] = points
    curve = report.reference_curve()
    if curve:
        ax.plot(
            [p[0] for p in curve],
            [p[1] for p in curve],
            linestyle="--",
            color="black",
            linewidth=1.0,
            label=reference_label,
        )
    _mark_advice(ax, report, weighting, colors)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_xlabel(f"cache capacity (blocks of {report.block_tokens} tokens)")
    ax.set_ylabel(f"prefix hit rate ({weighting}-weighted)")
    ax.set_ylim(0, 1)
    ax.grid(True, which="both", alpha=0.3)
    bb = report.block_bytes
    if bb:
        gib = bb / 2**30

        def to_gib(blocks: ArrayLike) -> NDArray[np.float64]:
            return np.asarray(blocks, dtype=np.float64) * gib

        def to_blocks(size: ArrayLike) -> NDArray[np.float64]:
            return np.asarray(size, dtype=np.float64) / gib

        top = ax.secondary_xaxis("top", functions=(to_gib, to_blocks))
        _plain_log_ticks(top.xaxis)
        top.set_xlabel(f"cache capacity (GiB of KV at {format_size_approx(bb)} per block)")
    if len(ax.get_legend_handles_labels()[1]) > LEGEND_INSIDE:
        # beside the axes: a long legend inside would hide the curves
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8)
        fig.set_figwidth(fig.get_figwidth() + 3.5)
    else:  # hit rates rise with capacity: the upper left is empty
        ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"hit rate vs capacity: {os.path.basename(report.source)}", fontsize=11)
    stamp(fig, hitrate_identity(report))
    return fig


def _plain(x: float, _pos: object = None) -> str:
    """A tick label: 20,000 (whole), 0.5 (fractional)."""
    if x >= 1 and abs(x - round(x)) <= 1e-9 * x:
        return f"{round(x):,}"
    return f"{x:.3g}"


def _plain_log_ticks(axis: Axis) -> None:
    """Numbers on a log axis as numbers (2,000, not 2x10^3); minor ticks named on a short
    range only."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    axis.set_major_formatter(FuncFormatter(_plain))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))


def _mark_advice(ax: Axes, report: HitRateReport, weighting: str, colors: dict[str, str]) -> None:
    """Each ``--target-hit-rate`` advice in its policy's color: a dotted line at its capacity,
    a star where it reaches the target (block-weighted plots), a legend entry with the numbers;
    the target a dotted line across; an unreachable target named in the legend."""
    bb = report.block_bytes
    for target in sorted({a.target for a in report.advice}):
        if weighting == "block":
            ax.axhline(
                target, color="0.3", linestyle=":", linewidth=1.0, zorder=1,
                label=f"--target-hit-rate {target:g}",
            )  # fmt: skip
    for i, a in enumerate(report.advice):
        color = colors.get(a.policy, "0.3")
        if not a.reachable:
            ax.plot(
                [], [], linestyle="none", label=f"advice {a.policy}: {a.target:g} out of reach "
                f"(an infinite cache gets {a.block_hit_rate:.3f})",
            )  # fmt: skip
            continue
        capacity = sum(t.capacity_blocks or 0 for t in a.tiers)
        size = f" = {capacity * bb / 2**30:,.2f} GiB" if bb else ""
        text = f"advice {a.policy}: {a.target:g} at {capacity:,} blocks{size}"
        ax.axvline(capacity, color=color, linestyle=":", linewidth=1.2, zorder=1)
        if weighting == "block":
            # each star smaller than the one before: advice at close capacities stays seen
            ax.plot(
                [capacity], [a.block_hit_rate], marker="*", markersize=max(8, 17 - 3 * i),
                color=color, markeredgecolor="black", markeredgewidth=0.8, linestyle="none",
                zorder=20 + i, label=text,
            )  # fmt: skip
        else:  # the advice is block-weighted: mark its capacity only
            ax.plot([], [], color=color, linestyle=":", label=f"{text} (block-weighted)")


def plot_hitrate(
    path: str,
    report: HitRateReport,
    *,
    weighting: Literal["block", "token"] = "block",
    reference_label: str = "reference",
) -> None:
    """Write :func:`hitrate_figure` to ``path`` (PNG).

    Raises:
        HitRateError: matplotlib is missing (``pip install 'kvferry[plot]'``), or the file
            cannot be written.
    """
    from kvferry.bench.hitrate import HitRateError

    try:
        fig = hitrate_figure(report, weighting=weighting, reference_label=reference_label)
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("matplotlib"):
            raise
        raise HitRateError(
            "plots need matplotlib: pip install 'kvferry[plot]' (or pip install matplotlib)"
        ) from e
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise HitRateError(f"cannot write the plot to {path!r}: {e.strerror or e}") from e
