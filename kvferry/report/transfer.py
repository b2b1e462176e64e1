"""The transfer bench's part of the report: one subsection per ``kvferry bench transfer`` result.

Each holds the contenders (engine, transport, version, overrides), every case (BW, latency,
P99/avg, initiator CPU seconds per GB), the references measured in the same run and the ratios
between contenders with their per-round spread, and a figure: BW and P99 against block size
(log2 axis), one line per contender and batch size, one column per thread count, the same-run
GB/s references as horizontal lines. Also the transfer headline numbers. It reads the report
class's fields and computes only what derives from them (P99/avg).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvferry.bench.result import Ratio
from kvferry.bench.transfer.cases import CaseResult
from kvferry.bench.transfer.report import BW, P99, TransferBenchReport
from kvferry.report import fmt
from kvferry.report.figures import figure, log_if_spread, new_figure, size_ticks
from kvferry.report.headline import Headline
from kvferry.report.inputs import LoadedResult
from kvferry.report.model import Figure, Section, Table

__all__ = ["MAX_PANELS", "best_case", "headlines", "subsection", "tail_ratio"]

MAX_PANELS = 4
"""Thread counts drawn side by side at most (the largest ones beyond it are in the table only):
five panels or more make each too narrow to read."""

REF_COLORS = ("black", "tab:purple", "tab:brown")
REF_STYLES = ("--", ":", "-.")
"""The same-run references: dark lines of their own style, apart from the batch colours."""

CASE_COLUMNS = [
    "Contender",
    "Block",
    "Batch",
    "Threads",
    "BW (GB/s)",
    "Avg Lat (us)",
    "Avg Tx (us)",
    "P99 Tx (us)",
    "P999 Tx (us)",
    "P99/avg",
    "CPU s/GB",
]


def tail_ratio(case: CaseResult) -> float:
    """P99 over the mean of the per-batch time: how far the tail sits from the typical batch."""
    t = case.transfer_us
    return t.p99 / t.avg if t.avg > 0 else float("nan")


def case_row(case: CaseResult) -> list[str]:
    t = case.transfer_us
    return [
        case.backend,
        fmt.size(case.block_size),
        str(case.batch_size),
        str(case.threads),
        fmt.num(case.bw_gbps, 4),
        fmt.num(case.avg_lat_us),
        fmt.num(t.avg),
        fmt.num(t.p99),
        fmt.num(t.p999),
        fmt.ratio(tail_ratio(case)),
        fmt.num(case.cpu_s_per_gb),
    ]


def best_case(report: TransferBenchReport, contender: str | None = None) -> CaseResult | None:
    """The case of highest BW (of ``contender``; None: the first contender's)."""
    if not report.cases:
        return None
    label = contender or report.cases[0].backend
    cases = [c for c in report.cases if c.backend == label]
    return max(cases, key=lambda c: c.bw_gbps) if cases else None


def _label(case: CaseResult) -> str:
    return f"{case.backend} {fmt.size(case.block_size)} x {case.batch_size} x {case.threads}"


def _contenders(report: TransferBenchReport) -> Table:
    rows = []
    for c in report.contenders:
        engine = c.engine
        version = engine.get("version") or engine.get("mooncake_version") or fmt.DASH
        overrides = ", ".join(f"{k}={v}" for k, v in c.overrides.items()) or "none"
        rows.append(
            [c.label, c.backend, str(engine.get("transport", fmt.DASH)), str(version), overrides]
        )
    return Table(
        columns=["Contender", "Engine", "Transport", "Version", "Config overrides"],
        rows=rows,
        title="Contenders",
    )


def _references(report: TransferBenchReport) -> Table:
    rows = []
    for r in report.references:
        detail = ", ".join(
            f"{k} {fmt.num(v) if isinstance(v, float) else v}" for k, v in r.detail.items()
        )
        rows.append([r.name, fmt.num(r.value, 4), r.unit, detail])
    return Table(
        columns=["Reference", "Value", "Unit", "Detail"],
        rows=rows,
        title="References measured in the same run",
        numeric=[False, True, False, False],
        note="socket_stream: a plain Python TCP stream over loopback between two processes "
        "(the wire's practical limit for Python code); memcpy: numpy copies between two "
        "buffers (the limit of a same-host shared-memory transfer).",
    )


def _case_label(case: str) -> str:
    """``"4096x1x1"`` (block x batch x threads, as ratios name a case) as ``4 KiB x 1 x 1``."""
    parts = case.split("x")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return f"{fmt.size(int(parts[0]))} x {parts[1]} x {parts[2]}"
    return case


def _ratios(report: TransferBenchReport) -> Table:
    """One row per case and pair of contenders: the BW and P99 ratios side by side, with
    the per-round range when the run had more than one round."""
    rows: dict[tuple[str, str], dict[str, object]] = {}
    for r in report.ratios:
        row = rows.setdefault((r.case, f"{r.subject} / {r.reference}"), {})
        row[r.metric] = r
    rounds = max((len(r.rounds) for r in report.ratios), default=0)

    def cells(r: object) -> list[str]:
        if not isinstance(r, Ratio):
            return [fmt.DASH] * (2 if rounds > 1 else 1)
        value = [fmt.ratio(r.value)]
        return value + [f"{fmt.ratio(r.spread[0])} - {fmt.ratio(r.spread[1])}"] * (rounds > 1)

    columns = ["Case (block x batch x threads)", "Contenders", "BW ratio (higher better)"]
    columns += ["BW range"] * (rounds > 1) + ["P99 Tx ratio (lower better)"]
    columns += ["P99 range"] * (rounds > 1)
    body = [
        [_case_label(case), pair, *cells(metrics.get(BW)), *cells(metrics.get(P99))]
        for (case, pair), metrics in rows.items()
    ]
    note = (
        f"Median of {rounds} alternating rounds per case, with the range of the per-round ratios."
        if rounds > 1
        else "One round: both contenders ran each case seconds apart (--rounds N gives a "
        "median and a range)."
    )
    return Table(
        columns=columns,
        rows=body,
        title="Ratios between contenders, per case",
        numeric=[False, False] + [True] * (len(columns) - 2),
        note=note,
    )


def _figure(item: LoadedResult, report: TransferBenchReport, index: int) -> Figure | None:
    cases = report.cases
    blocks = sorted({c.block_size for c in cases})
    if len(blocks) < 2:
        return None
    threads = sorted({c.threads for c in cases})[:MAX_PANELS]
    contenders = list(dict.fromkeys(c.backend for c in cases))
    batches = sorted({c.batch_size for c in cases})
    # no figure title: beside one narrow panel the outside legend would run into it; each
    # panel's title says what was measured
    o = report.options
    fig = new_figure(width=4.2 * len(threads) + 3.2, height=7.0)
    axes = fig.subplots(2, len(threads), squeeze=False, sharex=True)
    refs = [r for r in report.references if r.unit == "GB/s"]
    for col, nthreads in enumerate(threads):
        bw_ax, p99_ax = axes[0][col], axes[1][col]
        for ci, contender in enumerate(contenders):
            for bi, batch in enumerate(batches):
                points = sorted(
                    (c.block_size, c.bw_gbps, c.transfer_us.p99)
                    for c in cases
                    if c.backend == contender and c.batch_size == batch and c.threads == nthreads
                )
                if not points:
                    continue
                style = {
                    "color": f"C{bi}",
                    "linestyle": ("-", "--", ":", "-.")[ci % 4],
                    "marker": ("o", "s", "^", "D")[ci % 4],
                    "markersize": 4,
                    "label": f"{contender}, batch {batch}"
                    if len(contenders) > 1
                    else f"batch {batch}",
                }
                xs = [p[0] for p in points]
                bw_ax.plot(xs, [p[1] for p in points], **style)
                p99_ax.plot(xs, [p[2] for p in points], **style)
        for ri, ref in enumerate(refs):
            bw_ax.axhline(
                ref.value,
                color=REF_COLORS[ri % len(REF_COLORS)],
                linestyle=REF_STYLES[ri % len(REF_STYLES)],
                linewidth=1.2,
                label=f"{ref.name} (same run) {fmt.num(ref.value)} GB/s",
            )
        bw_ax.set_title(
            f"{o.op} over {o.transport}, {o.seg_type}: {nthreads} thread{'s' * (nthreads > 1)}",
            fontsize=10,
        )
        log_if_spread(bw_ax, [c.bw_gbps for c in cases] + [r.value for r in refs])
        log_if_spread(p99_ax, [c.transfer_us.p99 for c in cases])
        bw_ax.set_ylabel("bandwidth (GB/s, 1 GB = 1e9 B)")
        p99_ax.set_ylabel("P99 per-batch time (us)")
        p99_ax.set_xlabel("block size (bytes, log2 scale)")
        size_ticks(p99_ax, blocks)
        for ax in (bw_ax, p99_ax):
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    caption = (
        "Bandwidth (top) and P99 of the per-batch time (bottom) against block size, one line "
        "per batch size" + (" and contender" if len(contenders) > 1 else "") + ", one column per "
        "thread count"
        + ("; black and purple lines: the GB/s references of the same run" if refs else "")
    )
    return figure(f"transfer-{index}-bw-p99", "Bandwidth and P99 vs block size", fig, item, caption)


def subsection(item: LoadedResult, index: int) -> Section:
    report = item.result
    assert isinstance(report, TransferBenchReport)
    o = report.options
    skipped = (
        f" {len(report.skipped)} cases did not fit the buffer and were not run."
        if report.skipped
        else ""
    )
    intro = (
        f"{len(report.cases)} cases, {o.op} of {o.seg_type} over {o.transport} transport, "
        f"{fmt.num(o.duration)} s per case after {fmt.num(o.warmup)} s warm-up, "
        f"{o.rounds} round{'s' if o.rounds > 1 else ''}.{skipped}"
    )
    verdict = report.consistency_verdict()
    if verdict:
        intro += f" {verdict[0].upper()}{verdict[1:]}."
    tables = [_contenders(report)] if report.contenders else []
    tables.append(
        Table(
            columns=CASE_COLUMNS,
            rows=[case_row(c) for c in report.cases],
            title="Cases",
            numeric=[False] + [True] * (len(CASE_COLUMNS) - 1),
            note="BW = bytes / 1e9 / wall seconds; Avg Lat = duration x threads / batches; "
            "Tx = per-batch submit-to-completion time; CPU s/GB = initiator CPU seconds "
            "(user + system) per GB moved.",
        )
    )
    if report.references:
        tables.append(_references(report))
    if report.ratios:
        tables.append(_ratios(report))
    fig = _figure(item, report, index)
    if fig is None and report.cases:
        intro += " One block size only: no curve against block size to draw."
    return Section(
        title=f"{item.name}",
        anchor=f"transfer-{index}",
        intro=intro,
        tables=tables,
        figures=[fig] if fig else [],
    )


def headlines(item: LoadedResult) -> Sequence[Headline]:
    report = item.result
    assert isinstance(report, TransferBenchReport)
    best = best_case(report)
    if best is None:
        return []
    out = [
        Headline(
            f"transfer peak bandwidth ({best.backend})",
            best.bw_gbps,
            "GB/s",
            "the highest BW of any case of the run's first contender",
            item.name,
            _label(best),
        ),
        Headline(
            "transfer P99 per-batch time at that case",
            best.transfer_us.p99,
            "us",
            "99th percentile of the per-batch submit-to-completion time",
            item.name,
            _label(best),
        ),
    ]
    socket = next((r for r in report.references if r.name.startswith("socket_stream")), None)
    if socket is not None and socket.value > 0:
        out.append(
            Headline(
                f"transfer peak bandwidth / {socket.name}",
                best.bw_gbps / socket.value,
                "x",
                "the peak BW over the loopback socket stream measured in the same run",
                item.name,
                _label(best),
            )
        )
    return out
