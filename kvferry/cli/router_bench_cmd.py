"""``kvferry bench router``: KV-aware routing against round-robin and random (Dynamo's router
benchmark) on mock or real workers.

Parse flags -> :class:`~kvferry.bench.router.harness.RouterBenchOptions` ->
:func:`kvferry.bench.router.harness.run` (with a live view) -> print the table and write the
JSON and the plot. Nothing is measured or computed here."""

from __future__ import annotations

import argparse
import math
import shlex
from typing import Any

from rich.console import Console

from kvferry.bench.router.harness import (
    POLICIES,
    RouterBenchError,
    RouterBenchOptions,
    RouterBenchReport,
    RouterProgress,
    run,
)
from kvferry.cli.common import live_progress
from kvferry.errors import ConfigError
from kvferry.tables import FitTable, add_wide_option, output_console, print_table

__all__ = ["add_router_bench_parser", "options_from_args", "print_report", "router_table"]

DROP = {"per worker": 5, "ITL p50": 4, "preempted": 3, "errors": 2, "TTFT p99": 1}
"""Columns a narrow terminal leaves out, the highest first."""


def add_router_bench_parser(kinds: Any) -> None:
    p = kinds.add_parser(
        "router",
        help="KV-aware routing vs round-robin and random: TTFT, throughput, hit rate "
        "(Dynamo's router benchmark)",
        description="For each load (a prefix-ratio sweep, or a trace) and each routing policy, "
        "start a fresh kvferry serve router in front of the workers and run kvferry bench "
        "serve through it. Workers: a fresh fleet of kvferry serve mock engines per run, or "
        "--worker URLs of running vLLM or mock servers (shared by every run, so each run "
        "sends other prompt texts). Reports TTFT p50/p99, ITL p50, throughput, the hit rate "
        "the workers had and the one the router predicted, preemptions and requests per "
        "worker.",
    )
    workers = p.add_argument_group("workers")
    workers.add_argument(
        "--worker",
        dest="worker_urls",
        action="append",
        default=[],
        metavar="URL",
        help="a running worker (repeatable); none: a fresh mock fleet per run",
    )
    workers.add_argument("--workers", type=int, default=4, metavar="N", help="mock engines (4)")
    workers.add_argument(
        "--num-blocks", type=int, default=1024, metavar="N", help="KV blocks per mock (1024)"
    )
    workers.add_argument(
        "--speedup-ratio", type=float, default=10.0, metavar="X", help="mock speed-up (10)"
    )
    workers.add_argument(
        "--block-size", type=int, default=16, metavar="TOKENS", help="tokens per KV block (16)"
    )
    workers.add_argument(
        "--tokenizer",
        default="",
        metavar="DIR",
        help="the model's tokenizer, for the router and the client (vLLM workers)",
    )
    workers.add_argument(
        "--vllm-events",
        action="append",
        default=[],
        metavar="URL=PUB[,REPLAY]",
        help="a vLLM worker's ZeroMQ KV events, passed to the router (repeatable)",
    )
    load = p.add_argument_group("load")
    load.add_argument(
        "--policies",
        default=",".join(POLICIES),
        metavar="LIST",
        help=f"routing policies compared (default {','.join(POLICIES)})",
    )
    load.add_argument(
        "--ratios", default="0.1,0.3,0.5,0.7,0.9", metavar="LIST", help="prefix ratios swept"
    )
    load.add_argument("--groups", type=int, default=16, metavar="N", help="prefix groups (16)")
    load.add_argument("--isl", type=int, default=2048, metavar="TOKENS", help="input tokens")
    load.add_argument("--osl", type=int, default=64, metavar="TOKENS", help="output tokens")
    load.add_argument("--requests", type=int, default=400, metavar="N", help="per run (400)")
    load.add_argument("--rate", type=float, default=40.0, metavar="R", help="requests/s (40)")
    load.add_argument("--seed", type=int, default=0, metavar="N")
    load.add_argument(
        "--trace", default="", metavar="FILE", help="a Mooncake-format trace instead of the sweep"
    )
    load.add_argument("--trace-rows", type=int, default=1000, metavar="N", help="rows replayed")
    load.add_argument(
        "--trace-scale", type=int, default=32, metavar="K", help="hash blocks cut K times (32)"
    )
    load.add_argument(
        "--speedup", type=float, default=1.0, metavar="X", help="trace timestamps divided by"
    )
    out = p.add_argument_group("results")
    out.add_argument("--json", default="", metavar="FILE", help="write the report as JSON")
    out.add_argument(
        "--plot", default="", metavar="FILE", help="write the figure as PNG (needs matplotlib)"
    )
    out.add_argument("--quiet", action="store_true", help="no live view")
    add_wide_option(out)
    p.set_defaults(func=run_router_bench)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    values = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"{flag}: {item!r} is not a number (in {text!r})") from None
        if not math.isfinite(value):
            raise ConfigError(f"{flag} values must be finite, got {item!r}")
        values.append(value)
    return tuple(values)


def options_from_args(args: argparse.Namespace) -> RouterBenchOptions:
    """The options of ``args`` (validated).

    Raises:
        ConfigError: a bad flag.
    """
    router_args: list[str] = []
    for source in args.vllm_events:
        router_args += ["--vllm-events", source]
    options = RouterBenchOptions(
        worker_urls=tuple(args.worker_urls),
        workers=args.workers,
        num_blocks=args.num_blocks,
        speedup_ratio=args.speedup_ratio,
        block_size=args.block_size,
        tokenizer=args.tokenizer,
        router_args=tuple(router_args),
        policies=tuple(s.strip() for s in args.policies.split(",") if s.strip()),
        prefix_ratios=_floats(args.ratios, "--ratios"),
        groups=args.groups,
        isl=args.isl,
        osl=args.osl,
        requests=args.requests,
        rate=args.rate,
        seed=args.seed,
        trace=args.trace,
        trace_rows=args.trace_rows,
        trace_scale=args.trace_scale,
        speedup=args.speedup,
    )
    options.validate()
    return options


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def router_table(report: RouterBenchReport, *, wide: bool = False) -> FitTable:
    """One row per run: the load, the policy and its figures."""
    o = report.options
    fleet = f"{len(o.worker_urls)} workers" if o.worker_urls else f"{o.workers} mock workers"
    table = FitTable(f"kvferry bench router: {', '.join(o.policies)} on {fleet}", wide=wide)
    for name in ("load", "policy"):
        table.add_column(name, justify="left")
    for name in ("requests", "errors", "TTFT p50", "TTFT p99", "ITL p50", "req/s", "hit rate",
                 "predicted", "preempted", "per worker"):  # fmt: skip
        table.add_column(name, drop=DROP.get(name, 0))
    for c in report.cases:
        table.add_row(
            c.label,
            c.policy,
            f"{c.requests:,}",
            f"{c.errors:,}",
            _f(c.ttft_p50_ms),
            _f(c.ttft_p99_ms),
            _f(c.itl_p50_ms, 3),
            _f(c.request_throughput),
            f"{c.hit_rate:.3f}",
            f"{c.predicted_hit_rate:.3f}",
            f"{c.preemptions:g}",
            "/".join(str(n) for n in c.requests_per_worker),
        )
    return table


def print_report(console: Console, report: RouterBenchReport, *, wide: bool = False) -> None:
    """The table, what its figures mean, and each policy against round-robin per load."""
    print_table(console, router_table(report, wide=wide))
    basis = report.cases[0].hit_rate_basis if report.cases else "blocks"
    console.print(
        f"times in ms; hit rate: the workers' own prefix-cache counters "
        f"({basis.removesuffix('s')}-weighted); predicted: the router's; per worker: requests "
        "routed to each (the bench's test request too)"
    )
    names = {"time_to_first_token p50": "TTFT p50"}
    lines: dict[str, dict[tuple[str, str], list[str]]] = {}
    for r in report.ratios:
        key = (names.get(r.metric, r.metric), r.reference)
        lines.setdefault(r.case, {}).setdefault(key, []).append(f"{r.subject} {r.value:.2f}x")
    for load, metrics in lines.items():
        parts = [f"{metric} / {ref}: {', '.join(v)}" for (metric, ref), v in metrics.items()]
        console.print(f"{load}: " + "; ".join(parts), highlight=False)
    for note in report.notes:
        console.print(f"[red]{note}[/]", highlight=False)


class _Live:
    """One progress bar over the runs, with the running run's requests."""

    def __init__(self, console: Console, quiet: bool) -> None:
        self.progress = live_progress(console, quiet)
        self.task: Any = None

    def __call__(self, update: RouterProgress) -> None:
        if self.task is None:
            self.task = self.progress.add_task("router bench", total=update.total, stats="")
        what = f"{update.label}, {update.policy}"
        if update.phase == "starting":
            self.progress.update(self.task, description=what, stats="starting the fleet")
        elif update.phase == "done":
            self.progress.update(self.task, completed=update.index + 1, stats="")
        elif update.serve is not None and update.serve.phase == "profiling":
            s = update.serve
            ttft = "" if s.ttft_p50_ms is None else f"  TTFT p50 {s.ttft_p50_ms:,.1f} ms"
            total = f"/{s.total}" if s.total is not None else ""
            self.progress.update(self.task, stats=f"{s.done}{total} requests{ttft}")


def run_router_bench(args: argparse.Namespace) -> int:
    console = output_console()
    err = Console(stderr=True, highlight=False)
    options = options_from_args(args)
    if args.plot:
        from kvferry.bench.endpoint.export import require_matplotlib

        require_matplotlib()  # fail before the run, not after it
    live = _Live(err, args.quiet)
    with live.progress:
        report = run(options, live)
    report.command = shlex.join(["kvferry", *getattr(args, "argv", [])])
    print_report(console, report, wide=args.wide)
    if args.json:
        report.write(args.json)
        console.print(f"report: {args.json}")
    if args.plot:
        from kvferry.bench.router.plot import plot_router

        plot_router(report, args.plot)
        console.print(f"plot: {args.plot}")
    failed = [c for c in report.cases if c.requests == 0]
    if failed:
        raise RouterBenchError(
            f"every request failed in {len(failed)} run(s), first: {failed[0].label}, "
            f"{failed[0].policy}"
        )
    return 0
