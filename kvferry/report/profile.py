"""The SLA profiler's part of the report: one subsection per ``kvferry profile`` result.

Each holds the engine and its limits, the prefill points with the quadratic fit (coefficients
and R^2), the decode points, the skipped points, and the profile's figures (TTFT vs ISL with
the fit, prefill throughput, the decode ITL and throughput heatmaps:
:func:`kvferry.bench.profile.plot.profile_figures`, with the run's identity at the foot). Also
the headline numbers (peak prefill and decode tokens/s per instance). Nothing is measured here.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvferry.bench.profile.plot import profile_figures
from kvferry.bench.profile.report import ProfileReport
from kvferry.report import fmt
from kvferry.report.figures import figure
from kvferry.report.headline import Headline
from kvferry.report.inputs import LoadedResult
from kvferry.report.model import Figure, Section, Table

__all__ = ["headlines", "subsection"]

_TITLES = {
    "prefill_ttft_interpolation": "Prefill: TTFT vs ISL, with the quadratic fit",
    "prefill_throughput_interpolation": "Prefill: tokens/s per instance vs ISL",
    "decode_itl_interpolation": "Decode: ITL over KV usage and context length",
    "decode_throughput_interpolation": "Decode: output tokens/s over KV usage and context",
}


def _tables(report: ProfileReport) -> list[Table]:
    tables = []
    if report.prefill:
        fit = report.prefill_fit()
        tables.append(
            Table(
                columns=["ISL", "TTFT avg (ms)", "TTFT p50 (ms)", "Prefill tokens/s"],
                rows=[
                    [fmt.count(p.isl), fmt.num(p.ttft_avg_ms), fmt.num(p.ttft_p50_ms),
                     fmt.num(p.tokens_per_s)]
                    for p in report.prefill
                ],
                title="Prefill (concurrency 1)",
                numeric=[True] * 4,
                note=f"TTFT fit (ms): {fit.formula()}, R^2 {fit.r2:.4f}." if fit else "",
            )
        )  # fmt: skip
    if report.decode:
        tables.append(
            Table(
                columns=["ISL", "Concurrency", "KV usage", "ITL avg (ms)", "ITL p50 (ms)",
                         "Output tokens/s"],
                rows=[
                    [fmt.count(p.isl), fmt.count(p.concurrency), fmt.pct(p.kv_usage),
                     fmt.num(p.itl_avg_ms), fmt.num(p.itl_p50_ms), fmt.num(p.tokens_per_s)]
                    for p in report.decode
                ],
                title="Decode (context x concurrency, clamped to the KV capacity)",
                numeric=[True] * 6,
            )
        )  # fmt: skip
    if report.skipped:
        tables.append(
            Table(
                columns=["Stage", "Point", "Why"],
                rows=[[s.mode, s.label, s.reason] for s in report.skipped],
                title="Skipped points",
            )
        )
    return tables


def _figures(item: LoadedResult, report: ProfileReport, index: int) -> list[Figure]:
    return [
        figure(f"profile-{index}-{name}", _TITLES[name], fig, item, "")
        for name, fig in profile_figures(report).items()
    ]


def subsection(item: LoadedResult, index: int) -> Section:
    report = item.result
    assert isinstance(report, ProfileReport)
    intro = (
        f"{report.name} at {report.url}: max context {report.max_context:,} tokens, KV "
        f"capacity {report.max_kv_tokens:,} tokens ({report.kv_source or 'not asked'}). "
        "Throughputs are per instance (Dynamo's npz names say per GPU)."
    )
    if report.aborted:
        intro += f" Stopped early: {report.aborted}."
    return Section(
        title=item.name,
        anchor=f"profile-{index}",
        intro=intro,
        tables=_tables(report),
        figures=_figures(item, report, index),
    )


def headlines(item: LoadedResult) -> Sequence[Headline]:
    report = item.result
    assert isinstance(report, ProfileReport)
    out = []
    if report.prefill:
        best = max(report.prefill, key=lambda p: p.tokens_per_s)
        out.append(
            Headline("profile peak prefill tokens/s", best.tokens_per_s, "tokens/s",
                     "highest ISL / TTFT over the prefill points (per instance)", item.name,
                     f"isl {best.isl}")
        )  # fmt: skip
    if report.decode:
        best_d = max(report.decode, key=lambda p: p.tokens_per_s)
        out.append(
            Headline("profile peak decode tokens/s", best_d.tokens_per_s, "tokens/s",
                     "highest output tokens/s over the decode points (per instance)", item.name,
                     f"isl {best_d.isl} x {best_d.concurrency}")
        )  # fmt: skip
    return out
