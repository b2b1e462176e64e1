"""The store bench's part of the report: one subsection per ``kvferry bench store`` result.

Each holds the run's shape (backend, op, value size, batch, clients x threads), the backend's
facts, one row per phase and op (ops/s, blocks/s, GB/s, latency mean and percentiles, hit rate
or stored count), the verify verdict and the store's own counters, and a figure: ops/s and
GB/s, and latency p50/p99 per phase and op. Also the store headline numbers (the timed phase's).
It reads the report class's fields; nothing is measured here.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvferry.bench.store.client import TIMED
from kvferry.bench.store.report import PhaseResult, StoreBenchReport
from kvferry.report import fmt
from kvferry.report.figures import figure, log_if_spread, new_figure
from kvferry.report.headline import Headline
from kvferry.report.inputs import LoadedResult
from kvferry.report.model import Figure, Section, Table

__all__ = ["headlines", "phase_row", "subsection", "timed_phase"]

PHASE_COLUMNS = [
    "Phase",
    "Op",
    "Batch",
    "Ops",
    "Ops/s",
    "Blocks/s",
    "GB/s",
    "Mean (us)",
    "P50 (us)",
    "P90 (us)",
    "P99 (us)",
    "P999 (us)",
    "Hit rate / stored",
]


def phase_row(p: PhaseResult) -> list[str]:
    t = p.latency_us
    outcome = fmt.pct(p.hit_rate) + " hit" if p.op == "get" else f"{p.stored:,}/{p.blocks:,}"
    return [
        p.phase,
        p.op,
        str(p.batch_size),
        fmt.count(p.ops),
        fmt.num(p.ops_per_s),
        fmt.num(p.blocks_per_s),
        fmt.num(p.gbps, 4),
        fmt.num(t.avg),
        fmt.num(t.p50),
        fmt.num(t.p90),
        fmt.num(t.p99),
        fmt.num(t.p999),
        outcome,
    ]


def timed_phase(report: StoreBenchReport) -> list[PhaseResult]:
    """The rows of the timed phase (write_perf, read_perf or mixed): what the run measures;
    fill and verify only set it up and check it."""
    return [p for p in report.phases if p.phase in TIMED]


def _figure(item: LoadedResult, report: StoreBenchReport, index: int) -> Figure | None:
    phases = [p for p in report.phases if p.ops]
    if not phases:
        return None
    labels = [f"{p.phase}\n{p.op} x{p.batch_size}" for p in phases]
    xs = list(range(len(phases)))
    fig = new_figure(width=10.0, height=4.6)
    ops_ax, lat_ax = fig.subplots(1, 2)
    bars = ops_ax.bar(xs, [p.ops_per_s for p in phases], color="C0", label="ops/s")
    for bar, p in zip(bars, phases, strict=True):
        ops_ax.annotate(
            f"{fmt.num(p.gbps)} GB/s",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ops_ax.set_ylabel("operations per second (calls, each of one batch)")
    ops_ax.set_title("throughput per phase (labels: GB/s, 1 GB = 1e9 B)", fontsize=10)
    width = 0.38
    lat_ax.bar(
        [x - width / 2 for x in xs],
        [p.latency_us.p50 for p in phases],
        width,
        color="C1",
        label="p50",
    )
    lat_ax.bar(
        [x + width / 2 for x in xs],
        [p.latency_us.p99 for p in phases],
        width,
        color="C3",
        label="p99",
    )
    log_if_spread(lat_ax, [v for p in phases for v in (p.latency_us.p50, p.latency_us.p99)])
    lat_ax.set_ylabel("latency per call (us)")
    lat_ax.set_title("latency per phase", fontsize=10)
    lat_ax.legend(fontsize=8)
    for ax in (ops_ax, lat_ax):
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_xlabel("phase, op and keys per call")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    o = report.options
    fig.suptitle(
        f"store bench: {o.backend}, {o.op}, {fmt.size(o.value_size)} values, "
        f"{o.clients} client(s) x {o.threads} thread(s)",
        fontsize=11,
    )
    return figure(
        f"store-{index}-phases",
        "Throughput and latency per phase",
        fig,
        item,
        "Ops/s (bars, GB/s on top) and latency p50/p99 of each phase and op; fill and verify "
        "set the run up and check it, the timed phase is what the run measures.",
    )


def _fact(key: str, value: object) -> str:
    """A backend fact as a reader wants it: byte counts with their unit, lists unbracketed."""
    if isinstance(value, int) and not isinstance(value, bool) and key.endswith(("size", "bytes")):
        return fmt.size(value)
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def subsection(item: LoadedResult, index: int) -> Section:
    report = item.result
    assert isinstance(report, StoreBenchReport)
    o = report.options
    intro = (
        f"Backend {o.backend}, op {o.op}, {fmt.size(o.value_size)} values, {o.batch} keys per "
        f"call, {o.clients} client(s) x {o.threads} thread(s), {fmt.num(o.duration)} s timed "
        f"after {fmt.num(o.warmup)} s warm-up, {o.num_keys:,} keys."
    )
    v = report.verify
    if v is not None:
        intro += (
            f" Verify: {v.keys:,} keys read back, {v.mismatched} differ, {v.missing} missing "
            f"({v.evictions} evicted, {v.refused} refused): {'OK' if v.ok else 'FAILED'}."
        )
    tables = []
    if report.backend:
        tables.append(
            Table(
                columns=["Backend fact", "Value"],
                rows=[[k, _fact(k, val)] for k, val in report.backend.items()],
                title="Backend",
            )
        )
    tables.append(
        Table(
            columns=PHASE_COLUMNS,
            rows=[phase_row(p) for p in report.phases],
            title="Phases",
            numeric=[False, False] + [True] * (len(PHASE_COLUMNS) - 3) + [False],
            note="One row per phase and op over every thread of every client. Ops are calls "
            "(each of one batch of keys); latency is per call; GB = 1e9 bytes.",
        )
    )
    if report.store:
        tables.append(
            Table(
                columns=["Store counter", "Value"],
                rows=[[k, f"{n:,}"] for k, n in report.store.items()],
                title="The store's own counters over the run",
                numeric=[False, True],
            )
        )
    fig = _figure(item, report, index)
    return Section(
        title=item.name,
        anchor=f"store-{index}",
        intro=intro,
        tables=tables,
        figures=[fig] if fig else [],
    )


def headlines(item: LoadedResult) -> Sequence[Headline]:
    report = item.result
    assert isinstance(report, StoreBenchReport)
    out = []
    for p in timed_phase(report):
        case = f"{p.phase} {p.op} x{p.batch_size}"
        out.append(
            Headline(
                f"store {report.options.backend} {p.op} ops/s",
                p.ops_per_s,
                "ops/s",
                "calls per second of the timed phase, each call one batch of keys",
                item.name,
                case,
            )
        )
        out.append(
            Headline(
                f"store {report.options.backend} {p.op} throughput",
                p.gbps,
                "GB/s",
                "value bytes moved / 1e9 / seconds of the timed phase",
                item.name,
                case,
            )
        )
        out.append(
            Headline(
                f"store {report.options.backend} {p.op} p99 latency",
                p.latency_us.p99,
                "us",
                "99th percentile of the time per call",
                item.name,
                case,
            )
        )
    return out
