"""``kvferry trace analyze FILE``: what aiperf's analyze-trace prints, with the same definitions,
plus the block-weighted figures; no logic beyond printing (see :mod:`kvferry.bench.traces`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console

from kvferry.bench.traces import (
    DEFAULT_BLOCK_TOKENS,
    STAT_KEYS,
    Trace,
    TraceError,
    analyze_trace,
    read_trace,
)
from kvferry.tables import FitTable, add_wide_option, output_console, print_table

PROBLEMS_SHOWN = 10


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def add_trace_options(p: argparse.ArgumentParser) -> None:
    """The options every command that reads a trace takes."""
    p.add_argument(
        "--block-tokens",
        type=_positive,
        default=DEFAULT_BLOCK_TOKENS,
        help=f"tokens per hash id (default {DEFAULT_BLOCK_TOKENS})",
    )
    p.add_argument("--strict", action="store_true", help="fail on the first bad record")
    p.add_argument(
        "--keep-mismatched",
        action="store_true",
        help="keep records whose hash_ids count does not match input_length (aiperf keeps "
        "them); they are still reported",
    )


def load(args: argparse.Namespace, path: str) -> Trace:
    return read_trace(
        path,
        block_tokens=args.block_tokens,
        strict=args.strict,
        keep_mismatched=args.keep_mismatched,
    )


def print_problems(console: Console, trace: Trace) -> None:
    """Name the bad records (the first few, then a count) on the console."""
    if not trace.problems:
        return
    kept = sum(1 for p in trace.problems if p.kept)
    console.print(
        f"[yellow]{len(trace.problems)} record(s) with problems in {trace.path}: "
        f"{trace.skipped} skipped, {kept} kept[/yellow]"
    )
    for p in trace.problems[:PROBLEMS_SHOWN]:
        console.print(f"  {p}", markup=False, highlight=False)
    if len(trace.problems) > PROBLEMS_SHOWN:
        console.print(f"  ... and {len(trace.problems) - PROBLEMS_SHOWN} more")


def add_parser(subparsers: Any) -> None:
    trace = subparsers.add_parser("trace", help="request traces: analyze")
    kinds = trace.add_subparsers(title="trace commands", metavar="COMMAND")
    p = kinds.add_parser(
        "analyze",
        help="prefix statistics of a Mooncake-format trace (aiperf analyze-trace compatible)",
        description="Read a Mooncake-format JSONL trace (timestamp, input_length, output_length, "
        "hash_ids) and print request count, unique prefixes, prefix groups, ISL/OSL, context "
        "and unique-prompt length statistics and the infinite-cache hit rate, with aiperf's "
        "definitions, plus the block-weighted ideal hit rate (ratio of sums).",
    )
    p.add_argument("file", help="the JSONL trace")
    add_trace_options(p)
    p.add_argument("--json", default="", metavar="FILE", help="also write the report as JSON")
    add_wide_option(p)
    p.set_defaults(func=run_analyze)
    trace.set_defaults(func=lambda _args: (trace.print_help(), 2)[1])


def run_analyze(args: argparse.Namespace) -> int:
    console = output_console()
    trace = load(args, args.file)
    print_problems(console, trace)
    trace.require_requests()
    report = analyze_trace(trace)
    summary = FitTable(f"Trace analysis: {args.file}", wide=args.wide, show_header=False)
    summary.add_column("metric", text=True)
    summary.add_column("value")
    rows: list[tuple[str, str]] = [
        ("Total requests", f"{report['total_requests']:,}"),
        ("Unique prefixes", f"{report['unique_prefixes']:,}"),
        ("Prefix groups (shared first block)", f"{report['num_prefix_groups']:,}"),
        ("Prefix reuse ratio", f"{report['prefix_reuse_ratio']:.4f}"),
        ("Cache hit rate (aiperf: mean per request)", f"{report['cache_hit_rate']:.4f}"),
        ("Ideal hit rate, block-weighted", f"{report['block_weighted_ideal_hit_rate']:.4f}"),
        ("Prefix hit rate, token-weighted", f"{report['token_weighted_prefix_hit_rate']:.4f}"),
        ("Blocks referenced", f"{report['total_blocks']:,}"),
        ("Blocks distinct", f"{report['distinct_blocks']:,}"),
        ("Tokens per block", str(report["block_tokens"])),
    ]
    for name, value in rows:
        summary.add_row(name, value)
    print_table(console, summary)
    console.print(
        "Hit rates assume an infinite cache. Block-weighted = 1 - distinct/referenced blocks; "
        "token-weighted = leading hit tokens / input tokens (ratios of sums)."
    )
    stats = FitTable("Distributions (tokens; hit rate per request)", wide=args.wide)
    stats.add_column("metric", text=True)
    for column in ("Mean", "Std Dev", "Min", "P25", "Median", "P75", "Max"):
        stats.add_column(column, drop={"Std Dev": 3, "P25": 2, "P75": 1}.get(column, 0))
    for name, key in (
        ("ISL", "isl_stats"),
        ("OSL", "osl_stats"),
        ("Context", "context_length_stats"),
        ("Unique prompt", "unique_prompt_length_stats"),
        ("Hit rate", "hit_rate_stats"),
    ):
        s = report[key]
        if s is None:
            stats.add_row(name, *["-"] * len(STAT_KEYS))
        else:
            fmt = "{:.3f}" if key == "hit_rate_stats" else "{:,.0f}"
            stats.add_row(name, *[fmt.format(s[k]) for k in STAT_KEYS])
    print_table(console, stats)
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"schema_version": 1, "file": args.file, **report}, f, indent=1)
        except OSError as e:
            raise TraceError(
                f"cannot write the JSON report to {args.json!r}: {e.strerror or e}"
            ) from e
    return 0
