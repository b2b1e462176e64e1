"""Figures of a profile: TTFT vs ISL with its quadratic fit, prefill throughput vs ISL, and the
decode ITL and throughput surfaces as heatmaps over (KV usage, context length).

Owns :func:`profile_figures` (name -> matplotlib figure, each of its own, no pyplot state) and
:func:`write_plots` (PNGs into the profile directory). It draws what a report holds and
computes nothing but the interpolated grid it shows. matplotlib is the ``plot`` extra, imported
only here when drawing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kvferry.bench.plots import stamp
from kvferry.bench.profile.fit import interp_grid
from kvferry.bench.profile.report import ProfileReport
from kvferry.errors import MissingDependency

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["identity", "profile_figures", "write_plots"]

DPI = 100


def _figure(width: float = 7.0, height: float = 4.4) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependency("matplotlib", "plot") from e
    return Figure(figsize=(width, height))


def identity(report: ProfileReport) -> list[str]:
    return [
        f"kvferry profile of {report.name} at {report.url}",
        f"max context {report.max_context:,}, max KV tokens {report.max_kv_tokens:,}",
    ]


def _prefill_ttft(report: ProfileReport) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    isl = np.array([p.isl for p in report.prefill], dtype=np.float64)
    ax.plot(isl, [p.ttft_avg_ms for p in report.prefill], "o", label="measured (avg)")
    ax.plot(isl, [p.ttft_p50_ms for p in report.prefill], "x", label="measured (p50)")
    fit = report.prefill_fit()
    if fit is not None:
        xs = np.linspace(isl.min(), isl.max(), 200)
        ax.plot(xs, fit.c0 + fit.c1 * xs + fit.c2 * xs * xs, "-",
                label=f"quadratic fit, R² {fit.r2:.4f}")  # fmt: skip
    ax.set_xlabel("ISL (tokens)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("Prefill: TTFT vs ISL")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _prefill_tput(report: ProfileReport) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([p.isl for p in report.prefill], [p.tokens_per_s for p in report.prefill], "o-")
    ax.set_xlabel("ISL (tokens)")
    ax.set_ylabel("prefill tokens/s per instance")
    ax.set_title("Prefill throughput vs ISL")
    ax.grid(alpha=0.3)
    return fig


def _heatmap(report: ProfileReport, values: list[float], title: str, unit: str) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    xs = [p.kv_usage for p in report.decode]
    ys = [p.context_length for p in report.decode]
    gx, gy, gz = interp_grid(xs, ys, values)
    if len(set(xs)) > 1 and len(set(ys)) > 1:
        mesh = ax.pcolormesh(gx * 100, gy, gz, shading="auto", cmap="viridis")
        fig.colorbar(mesh, ax=ax, label=unit)
    ax.scatter(np.array(xs) * 100, ys, c="white", edgecolors="black", s=18, label="measured")
    ax.set_xlabel("KV usage (%)")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(title)
    ax.legend(loc="upper right")
    return fig


def profile_figures(report: ProfileReport) -> dict[str, Figure]:
    """The figures the profile has data for, by file stem.

    Raises:
        MissingDependency: matplotlib is not installed.
    """
    figs: dict[str, Figure] = {}
    if report.prefill:
        figs["prefill_ttft_interpolation"] = _prefill_ttft(report)
        figs["prefill_throughput_interpolation"] = _prefill_tput(report)
    if report.decode:
        itl = [p.itl_avg_ms for p in report.decode]
        tput = [p.tokens_per_s for p in report.decode]
        figs["decode_itl_interpolation"] = _heatmap(report, itl, "Decode: ITL", "ITL (ms)")
        figs["decode_throughput_interpolation"] = _heatmap(
            report, tput, "Decode: output tokens/s per instance", "tokens/s"
        )
    return figs


def write_plots(report: ProfileReport, out: str | os.PathLike[str]) -> list[Path]:
    """The figures as PNGs in ``out``; returns their paths.

    Raises:
        MissingDependency: matplotlib is not installed.
    """
    paths = []
    for name, fig in profile_figures(report).items():
        stamp(fig, identity(report))
        path = Path(out) / f"{name}.png"
        fig.savefig(path, dpi=DPI)
        paths.append(path)
    return paths
