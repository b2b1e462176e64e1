"""The figures' contents, read from the Figure objects (not pixels): every figure names the run
that drew it; the hit-rate figure keeps overlapping curves apart, marks the advice and carries a
GiB axis when the KV geometry is known."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kvferry.bench.hitrate import HitRateReport, TierSpec, advise, simulate, trace_keys
from kvferry.bench.plots import IDENTITY_GID, hitrate_figure, plot_hitrate
from kvferry.bench.traces import Trace

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

pytest.importorskip("matplotlib")

KV_PER_TOKEN = 128 * 1024  # Llama-3-8B


def identity(fig: Figure) -> str:
    (text,) = [t.get_text() for t in fig.texts if t.get_gid() == IDENTITY_GID]
    return " ".join(text.split())


def today() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")


@pytest.fixture(scope="module")
def report(mooncake: Trace) -> HitRateReport:
    """LRU and length-aware over the first 800 requests (their curves overlap), with advice."""
    trace = Trace(mooncake.path, mooncake.block_tokens, mooncake.requests[:800])
    keys = trace_keys(trace)
    results = [
        simulate(trace, [TierSpec("cpu", capacity)], policy=policy, keys=keys)
        for policy in ("lru", "length-aware")
        for capacity in (200, 1000, 4000)
    ]
    advice = [
        advise(trace, [TierSpec("cpu", None)], 0.1, policy="lru", keys=keys),
        advise(trace, [TierSpec("cpu", None)], 0.99, policy="length-aware", keys=keys),
    ]
    return HitRateReport(
        source=trace.path,
        block_tokens=trace.block_tokens,
        requests=len(trace.requests),
        blocks=trace.total_blocks,
        trace_duration_s=1.0,
        kv_bytes_per_token=KV_PER_TOKEN,
        cases=results,
        advice=advice,
    )


def curves(fig: Figure) -> dict[str, Line2D]:
    """The hit-rate curves by label (not the advice, the target or matplotlib's own lines)."""
    lines = {str(line.get_label()): line for line in fig.axes[0].get_lines()}
    return {k: v for k, v in lines.items() if not k.startswith(("_", "advice", "--target"))}


def test_hitrate_figure_names_the_run(report: HitRateReport) -> None:
    text = identity(hitrate_figure(report))
    assert "kvferry bench hitrate (simulation): " in text and "mooncake_synthetic_trace" in text
    assert "800 requests" in text and f"blocks of {report.block_tokens} tokens" in text
    assert "KV 128KiB per token" in text
    assert today() in text and platform.node() in text


def test_overlapping_policies_get_their_own_marker_line_and_width(report: HitRateReport) -> None:
    lines = curves(hitrate_figure(report))
    lru = lines["lru"]
    other = next(line for label, line in lines.items() if label.startswith("length-aware"))
    assert lru.get_marker() != other.get_marker()
    assert lru.get_linestyle() != other.get_linestyle()
    # the one drawn first is wider, with the bigger hollow marker: the other shows inside it
    assert lru.get_linewidth() > other.get_linewidth()
    assert lru.get_markersize() > other.get_markersize()
    assert lru.get_markerfacecolor() == "none"


def test_a_curve_on_the_same_points_as_another_says_so(report: HitRateReport) -> None:
    twin = HitRateReport(**{**vars(report), "cases": report.cases[:3] * 2})
    twin.cases[3:] = [
        type(r)(**{**vars(r), "policy": "fifo"}) for r in report.cases[:3]
    ]  # the lru runs again, relabelled: the same points
    labels = list(curves(hitrate_figure(twin)))
    assert labels == ["lru", "fifo (same points as lru)"]


def test_the_advice_is_marked_at_its_capacity(report: HitRateReport) -> None:
    fig = hitrate_figure(report)
    ax = fig.axes[0]
    reached = report.advice[0]
    capacity = reached.tiers[-1].capacity_blocks
    assert capacity is not None
    gib = capacity * KV_PER_TOKEN * report.block_tokens / 2**30
    labels = [str(line.get_label()) for line in ax.get_lines()]
    star_label = f"advice lru: 0.1 at {capacity:,} blocks = {gib:,.2f} GiB"
    assert star_label in labels
    star = ax.get_lines()[labels.index(star_label)]
    assert star.get_marker() == "*"
    assert list(star.get_xdata()) == [capacity]
    assert list(star.get_ydata()) == [reached.block_hit_rate]
    assert "--target-hit-rate 0.1" in labels
    assert "advice length-aware: 0.99 out of reach" in " ".join(labels)
    legend = ax.get_legend()
    assert legend is not None and star_label in [t.get_text() for t in legend.get_texts()]


def test_a_gib_axis_only_with_the_kv_geometry(report: HitRateReport) -> None:
    fig = hitrate_figure(report)
    (top,) = fig.axes[0].child_axes
    assert "GiB of KV at 64MiB per block" in top.get_xlabel()
    fig.draw_without_rendering()  # the top axis takes its limits from the bottom one
    low, high = fig.axes[0].get_xlim()
    assert top.get_xlim() == pytest.approx((low / 16, high / 16))  # 16 x 64 MiB = 1 GiB
    bare = HitRateReport(**{**vars(report), "kv_bytes_per_token": None})
    assert hitrate_figure(bare).axes[0].child_axes == []


def test_plot_hitrate_writes_a_png(report: HitRateReport, tmp_path: Path) -> None:
    path = tmp_path / "h.png"
    plot_hitrate(str(path), report)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
