"""The report's figures as PNG bytes, each carrying the identity of the run that measured it.

Owns :func:`new_figure` (a matplotlib :class:`~matplotlib.figure.Figure` of its own, Agg, no
pyplot state), :func:`to_png`, :func:`identity` (the footer lines: tool, run, when it ran, on
which host and commit: the run's own, from its result, never the report's clock or host) and
:func:`restamp` (a bench's figure, drawn by :mod:`kvferry.bench.plots`, with that footer in place
of the one the bench writes for a live run). Also the axis helpers every section uses (log
scales where values span decades, plain tick labels). matplotlib is imported only inside
functions: importing this module needs nothing beyond kvferry.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from kvferry.bench.plots import FOOTER_FONT_PT, IDENTITY_GID, stamp
from kvferry.errors import MissingDependency
from kvferry.report import fmt
from kvferry.report.inputs import LoadedResult
from kvferry.report.model import Figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure as MplFigure

__all__ = [
    "DECADE_SPAN",
    "DPI",
    "figure",
    "footer",
    "identity",
    "log_if_spread",
    "new_figure",
    "restamp",
    "size_ticks",
]

DPI = 100
"""Pixels per inch of the PNGs: a 9-inch figure is 900 px wide, sharp on a page of ~1000 px,
and small enough that a report of dozens of figures stays a few megabytes."""

_TOP_LEVEL = frozenset({"doctor", "profile", "plan", "tune"})
"""Tools that are commands of their own (``kvferry plan``), not ``kvferry bench`` benches."""

DECADE_SPAN = 10.0
"""An axis whose largest positive value is this many times its smallest goes logarithmic: on a
linear axis the small values would sit flat on the floor."""


def new_figure(width: float = 9.0, height: float = 4.6) -> MplFigure:
    """A figure of its own (inches), laid out by matplotlib's constrained layout: labels,
    titles and an outside legend fit without a second layout pass (half the time of
    ``tight_layout`` per figure, which a report of dozens of figures feels).

    Raises:
        MissingDependency: matplotlib is not installed (the ``plot`` extra).
    """
    try:
        from matplotlib.figure import Figure as MplFigure
    except ImportError as e:
        raise MissingDependency("matplotlib", "plot") from e
    return MplFigure(figsize=(width, height), layout="constrained")


def _wrapped(fig: MplFigure, lines: Sequence[str]) -> list[str]:
    """``lines`` wrapped to the figure's width at the footer's font size (as ``stamp`` does)."""
    chars = max(40, int(fig.get_figwidth() * 72 / (FOOTER_FONT_PT * 0.55)))
    return [part for line in lines for part in textwrap.wrap(line, chars) or [""]]


def footer(fig: MplFigure, lines: Sequence[str]) -> None:
    """The run's identity at the foot of a :func:`new_figure`, the axes laid out above it."""
    wrapped = _wrapped(fig, lines)
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
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    engine = fig.get_layout_engine()
    if isinstance(engine, ConstrainedLayoutEngine):
        engine.set(rect=(0, foot, 1, 1 - foot))


def identity(item: LoadedResult) -> list[str]:
    """The footer of a figure drawn from ``item``: tool and run, when, host and commit."""
    r = item.result
    env = r.environment
    commit = env.git_commit[:10] if env.git_commit else "commit not recorded"
    if env.git_commit and env.git_dirty:
        commit += " (uncommitted changes)"
    host = env.host or "host not recorded"
    started = fmt.utc(r.started_at) if r.started_at else "time not recorded"
    command = f"kvferry {r.tool}" if r.tool in _TOP_LEVEL else f"kvferry bench {r.tool}"
    return [f"{command}, run {item.name}", f"{started} on {host}, {commit}"]


def restamp(fig: MplFigure, lines: Sequence[str]) -> None:
    """Replace the footer a bench's figure carries (its live run's date and this host) with
    ``lines``: in place when they take no more lines than the old one (no second layout
    pass), else by stamping again."""
    wrapped = _wrapped(fig, lines)
    old = [t for t in fig.texts if t.get_gid() == IDENTITY_GID]
    if len(old) == 1 and len(wrapped) <= len(old[0].get_text().split("\n")):
        old[0].set_text("\n".join(wrapped))
        return
    for text in old:
        text.remove()
    stamp(fig, lines)


def to_png(fig: MplFigure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def figure(name: str, title: str, fig: MplFigure, item: LoadedResult, caption: str) -> Figure:
    """The document's figure: ``fig`` (a :func:`new_figure`) with ``item``'s identity at its
    foot, as PNG bytes."""
    footer(fig, identity(item))
    return Figure(name=name, title=title, png=to_png(fig), caption=caption)


def log_if_spread(ax: Axes, values: Iterable[float], axis: str = "y") -> bool:
    """Make ``axis`` logarithmic when the positive ``values`` span :data:`DECADE_SPAN`."""
    positive = [v for v in values if v == v and v > 0]
    if len(positive) < 2 or max(positive) / min(positive) < DECADE_SPAN:
        return False
    from matplotlib.ticker import NullFormatter

    if axis == "y":
        ax.set_yscale("log")
    else:
        ax.set_xscale("log")
    # minor ticks (and their grid lines) stay, unlabelled: a label on every minor tick crowds
    # the axis, and laying out their text is most of a log figure's drawing time; but an axis
    # with fewer than two powers of ten in range labels its 2x and 5x ticks, or it would read
    # as one lone label
    lo, hi = min(positive), max(positive)
    decades = math.floor(math.log10(hi)) - math.ceil(math.log10(lo)) + 1
    which = ax.yaxis if axis == "y" else ax.xaxis
    if decades >= 2:
        which.set_minor_formatter(NullFormatter())
    else:
        from matplotlib.ticker import FuncFormatter

        which.set_minor_formatter(FuncFormatter(_two_and_five))
        which.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))  # 100, not 10^2
    return True


def _two_and_five(value: float, _pos: object = None) -> str:
    """A minor log tick's label when it is 2 or 5 times a power of ten, else none."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if round(mantissa, 6) in (2.0, 5.0) else ""


def size_ticks(ax: Axes, sizes: Sequence[int]) -> None:
    """A log2 x axis of byte sizes, one tick per size, labelled ``4 KiB`` ... ``1 MiB``."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ticks = sorted(set(sizes))
    ax.set_xticks(ticks, [fmt.size(s) for s in ticks])
    ax.xaxis.set_minor_locator(NullLocator())  # x only: a log y keeps its minor ticks
    if len(ticks) > 6:
        for label in ax.get_xticklabels():
            label.set_rotation(30)
            label.set_horizontalalignment("right")
