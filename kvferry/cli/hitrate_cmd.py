"""``kvferry bench hitrate``: hit rate versus capacity and policy, by simulation or by replay
against a real store, with capacity advice: parse the flags into
:class:`~kvferry.bench.hitrate.HitRateOptions`, :func:`~kvferry.bench.hitrate.run` them, print
the report (and write its JSON, CSV and plot)."""

from __future__ import annotations

import argparse
import math
import shlex
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvferry.bench.hitrate import (
    ENGINES,
    HitRateOptions,
    HitRateReport,
    load_trace,
    run,
    write_csv,
    write_json,
)
from kvferry.bench.plots import plot_hitrate
from kvferry.bench.traces import BUNDLED
from kvferry.cli.common import add_config_options, load_from_args
from kvferry.cli.trace_cmd import add_trace_options, print_problems
from kvferry.tables import FitTable, add_wide_option, output_console, print_table


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def add_hitrate_parser(kinds: Any) -> None:
    p = kinds.add_parser(
        "hitrate",
        help="hit rate vs cache capacity and policy: simulate or replay a trace, size the cache",
        description="Run a Mooncake-format trace (or a generated workload) through kvferry's "
        "real TieredStore: over simulated tiers of each --capacity (default), or against the "
        "configured tiers with real bytes (--replay). Reports block-weighted (headline), "
        "token-weighted and per-request-mean hit rates, per tier.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--trace",
        metavar="FILE",
        help=f"JSONL trace, or a bundled one: {', '.join(k for k in BUNDLED if 'fig' not in k)}",
    )
    src.add_argument(
        "--workload",
        metavar="NAME[:KEY=VALUE,...]",
        help="a generated workload (see `kvferry workload`), e.g. multi-turn:sessions=20,turns=8",
    )
    add_trace_options(p)
    p.add_argument(
        "--capacity",
        metavar="LIST",
        help="capacities to sweep: blocks (5000) or sizes (4GiB, with the KV geometry); "
        "default: 1%%..100%% of the trace's distinct blocks",
    )
    p.add_argument(
        "--policy", default="lru", metavar="LIST", help="eviction policies (default lru)"
    )
    p.add_argument(
        "--tiers",
        metavar="NAME:CAP,...",
        help="tier pipeline, fastest first, e.g. cpu:5000,disk:50000; leave the last capacity "
        "out to sweep it with --capacity or search it with --target-hit-rate",
    )
    geo = p.add_mutually_exclusive_group()
    geo.add_argument(
        "--kv-bytes-per-token",
        "--bytes-per-token",
        dest="kv_bytes_per_token",
        type=_positive_int,
        help="KV bytes per token (K and V, all layers)",
    )
    geo.add_argument(
        "--model-kv",
        metavar="LAYERS,KV_HEADS,HEAD_DIM,DTYPE",
        help="KV geometry, e.g. 32,8,128,bf16 (Llama-3-8B: 128 KiB per token)",
    )
    p.add_argument(
        "--evict-start-threshold",
        type=_fraction,
        default=None,
        help="simulation: fill fraction that starts eviction (default 1.0: exact capacity). "
        "A simulation evicts exactly down to capacity unless this or --evict-ratio is given; "
        "the config's store watermarks are for --replay",
    )
    p.add_argument(
        "--evict-ratio",
        type=float,
        default=None,
        help="simulation: fraction of a tier freed per eviction round (default 0: only what a "
        "put needs)",
    )
    p.add_argument("--replay", action="store_true", help="replay against the configured store")
    p.add_argument(
        "--backend",
        metavar="TIERS",
        help="replay: the store's tier pipeline, e.g. cpu or cpu,disk (store.tiers)",
    )
    p.add_argument(
        "--speedup",
        type=_positive_float,
        help="replay at the trace's timestamps divided by this (default: as fast as possible)",
    )
    p.add_argument(
        "--target-hit-rate",
        type=_fraction,
        help="find the smallest capacity (of the last tier) that reaches this block hit rate",
    )
    p.add_argument(
        "--prefill-tokens-per-s",
        type=_positive_float,
        help="prefill speed of the engine: reports prefill compute saved per second of trace",
    )
    p.add_argument("--json", default="", metavar="FILE", help="write the report as JSON")
    p.add_argument("--csv", default="", metavar="FILE", help="write one row per run as CSV")
    p.add_argument("--plot", default="", metavar="FILE.png", help="plot hit rate vs capacity")
    p.add_argument(
        "--plot-weighting",
        choices=["block", "token"],
        default="block",
        help="which hit rate the plot shows (default block)",
    )
    p.add_argument(
        "--reference",
        metavar="CSV",
        help="a published curve to draw beside (hit_rate + capacity_blocks or capacity_tokens "
        "columns); mooncake-fig9 is bundled",
    )
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=0,
        metavar="N",
        help="simulation runs at once, each in its own process (default: one per CPU; "
        "1 = one after the other in this process)",
    )
    p.add_argument(
        "--engine",
        choices=list(ENGINES),
        default="auto",
        help="simulation: how to count; auto (default): LRU over one tier with exact capacities "
        "takes a one-pass stack-distance shortcut where it equals the store loop block for "
        "block, other one-tier runs drive the store's eviction policy directly (the same calls, "
        "without the store around it), tier pipelines run the store loop; store: always the "
        "loop; stack, direct: that shortcut or an error",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_wide_option(p)
    add_config_options(p)
    p.set_defaults(func=run_hitrate)


class _Bars:
    """:class:`~kvferry.bench.hitrate.HitRateProgress` on rich progress bars."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def add(self, label: str, total: int | None) -> Any:
        return self.progress.add_task(label, total=total)

    def update(self, task: Any, done: int) -> None:
        self.progress.update(task, completed=done)

    def remove(self, task: Any) -> None:
        self.progress.remove_task(task)


def options_from_args(args: argparse.Namespace) -> HitRateOptions:
    """The run the flags ask for. Exact capacities unless a watermark flag is given
    (``--evict-start-threshold``, ``--evict-ratio``): then the store's batch eviction at those
    watermarks (:func:`config_flags` puts them in the config), the other at its exact value."""
    watermarks = args.evict_start_threshold is not None or args.evict_ratio is not None
    return HitRateOptions(
        trace=args.trace,
        workload=args.workload,
        block_tokens=args.block_tokens,
        strict=args.strict,
        keep_mismatched=args.keep_mismatched,
        policies=[p.strip() for p in args.policy.split(",") if p.strip()],
        capacities=[c for c in (args.capacity or "").split(",") if c.strip()],
        tiers=args.tiers,
        kv_bytes_per_token=args.kv_bytes_per_token,
        model_kv=args.model_kv,
        exact_capacity=args.replay or not watermarks,
        engine=args.engine,
        jobs=args.jobs or None,
        replay=args.replay,
        speedup=args.speedup,
        target_hit_rate=args.target_hit_rate,
        prefill_tokens_per_s=args.prefill_tokens_per_s,
        reference=args.reference,
    )


def config_flags(args: argparse.Namespace) -> dict[str, object]:
    """Config keys the flags set: ``--backend`` (store.tiers) and, for a simulation with a
    watermark flag, both watermarks (a flag not given takes its exact value: 1.0 or 0)."""
    flags: dict[str, object] = {}
    if args.backend:
        flags["store.tiers"] = args.backend
    if not args.replay and (args.evict_start_threshold is not None or args.evict_ratio is not None):
        threshold, ratio = args.evict_start_threshold, args.evict_ratio
        flags["store.evict_start_threshold"] = 1.0 if threshold is None else threshold
        flags["store.evict_ratio"] = 0.0 if ratio is None else ratio
    return flags


_FLAG_NAMES = {
    "store.tiers": "--backend",
    "store.evict_start_threshold": "--evict-start-threshold",
    "store.evict_ratio": "--evict-ratio",
}


def run_hitrate(args: argparse.Namespace) -> int:
    console = output_console()
    options = options_from_args(args)
    options.validate()
    trace = load_trace(options)
    print_problems(console, trace)
    loaded = load_from_args(args, config_flags(args), flag_names=_FLAG_NAMES)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=args.quiet,
        transient=True,
    )
    with progress:
        report = run(options, _Bars(progress), config=loaded, trace=trace)
    report.command = shlex.join(["kvferry", *getattr(args, "argv", [])])
    _print_report(console, report, wide=args.wide)
    if args.json:
        write_json(args.json, report)
    if args.csv:
        write_csv(args.csv, report)
    if args.plot:
        label = "reference" if not args.reference else args.reference
        plot_hitrate(args.plot, report, weighting=args.plot_weighting, reference_label=label)
        console.print(f"plot: {args.plot}")
    return 0


def _gib(blocks: int | None, block_bytes: int | None) -> str:
    if blocks is None or block_bytes is None:
        return "-"
    return f"{blocks * block_bytes / 2**30:,.2f}"


_DROP = {
    "RSS MiB": 6,
    "lookups/s": 5,
    "write": 5,
    "GB/s": 4,
    "req-mean": 3,
    "token": 2,
    "GiB": 1,
}
"""Columns of the hit-rate table a narrow terminal leaves out, the highest first."""


def _print_report(console: Console, report: HitRateReport, *, wide: bool = False) -> None:
    bb = report.block_bytes
    replay = any(r.mode == "replay" for r in report.cases)
    console.print(
        f"{report.source}: {report.requests:,} requests, {report.blocks:,} blocks "
        f"({report.distinct_blocks or 0:,} distinct) of {report.block_tokens} tokens"
        + (f", {bb:,} B per block" if bb else "")
    )
    multi = any(len(r.tiers) > 1 for r in report.cases)
    title = "kvferry bench hitrate (" + ("replay" if replay else "simulation") + ")"
    table = FitTable(title, wide=wide)
    table.add_column("policy", justify="left")
    table.add_column("tiers" if multi else "blocks", justify="left" if multi else "right")
    if bb:
        table.add_column("GiB", drop=_DROP["GiB"])
    for name in ("block", "token", "req-mean"):
        table.add_column(name, drop=_DROP.get(name, 0))
    if multi:
        table.add_column("per tier", text=True)
    if replay:
        for name in ("QPS", "p50 us", "p99 us", "GB/s", "write", "RSS MiB"):
            table.add_column(name, drop=_DROP.get(name, 0))
    else:
        table.add_column("lookups/s", drop=_DROP["lookups/s"])
    if report.prefill_tokens_per_s:
        table.add_column("prefill s/s")
    for r in report.cases:
        if multi:
            where = "+".join(f"{t.name}:{t.capacity_blocks or 'inf'}" for t in r.tiers)
        else:
            where = f"{r.capacity_blocks:,}" if r.capacity_blocks else "inf"
        row = [r.policy, where]
        if bb:
            row.append(_gib(r.capacity_blocks, bb))
        row += [
            f"{r.block_hit_rate:.4f}",
            f"{r.token_hit_rate:.4f}",
            f"{r.request_mean_hit_rate:.4f}",
        ]
        if multi:
            row.append(" ".join(f"{k}:{v:.3f}" for k, v in r.tier_hit_rates().items()))
        if r.replay is not None:
            x = r.replay
            lat = x["request_latency_us"] or {}
            row += [
                f"{x['qps']:,.0f}",
                f"{lat.get('p50', 0):,.0f}",
                f"{lat.get('p99', 0):,.0f}",
                f"{x['bandwidth_gbps']:.2f}",
                f"{x['write_ratio']:.2f}",
                f"{x['rss_start_mib']:.0f}->{x['rss_end_mib']:.0f}",
            ]
        else:
            row.append(
                f"{r.lookups_per_s / 1e6:.2f}M" + (f" ({r.engine})" if r.engine != "store" else "")
            )
        saved = report.prefill_saved(r)
        if saved is not None:
            row.append(f"{saved['prefill_seconds_saved_per_trace_second']:.3f}")
        table.add_row(*row)
    print_table(console, table)
    console.print(
        "hit rates: block = leading hit blocks / blocks looked up (headline); token = hit "
        "tokens / input tokens (ratios of sums); req-mean = mean per-request fraction (aiperf)"
        + (
            "; prefill s/s = prefill compute seconds saved per second of trace"
            if report.prefill_tokens_per_s
            else ""
        )
        + (
            "; (stack) = counted by LRU's one-pass shortcut (equal to the store loop; its "
            "lookups/s include the whole pass)"
            if any(r.engine == "stack" for r in report.cases)
            else ""
        )
        + (
            "; (direct) = the store's eviction policy driven without the store around it (equal "
            "to the store loop)"
            if any(r.engine == "direct" for r in report.cases)
            else ""
        )
        + f"; peak RSS {report.peak_rss_mib:,.0f} MiB"
    )
    for a in report.advice:
        split = " + ".join(
            f"{t.name} {t.capacity_blocks:,} blocks"
            + (f" ({t.capacity_blocks * bb / 2**30:,.2f} GiB)" if bb and t.capacity_blocks else "")
            for t in a.tiers
        )
        if a.reachable:
            console.print(
                f"advice ({a.policy}): block hit rate {a.target} needs {split} "
                f"(reaches {a.block_hit_rate:.4f}; {a.runs} simulations)"
            )
        else:
            console.print(
                f"advice ({a.policy}): block hit rate {a.target} is out of reach: even an "
                f"infinite cache gets {a.block_hit_rate:.4f} on this trace"
            )
        if a.note:
            console.print(f"  note: {a.note}")
