"""``kvferry bench transfer`` and ``kvferry bench store``: flags -> options -> ``run`` -> print.

Owns the flags, turning them into each bench's options (``TransferBenchOptions``,
``StoreBenchOptions``) and the config they load, the progress bar, and the printed tables; the
JSON and CSV are the reports' own. Everything a
Python user needs (validation, case expansion, the contender grammar, targets, references,
report assembly) lives in the bench packages, not here.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kvferry.bench.store import harness as store_bench
from kvferry.bench.store.backends import BACKENDS, backend_settings
from kvferry.bench.transfer.harness import (
    COLUMNS,
    READY_PREFIX,
    TransferBenchOptions,
    TransferBenchReport,
    row,
    run,
    serve,
    write_csv,
)
from kvferry.cli.common import add_config_options, load_from_args
from kvferry.cli.hitrate_cmd import add_hitrate_parser
from kvferry.cli.router_bench_cmd import add_router_bench_parser
from kvferry.cli.serve_bench_cmd import add_serve_bench_parser
from kvferry.cli.suite_cmd import add_suite_parser
from kvferry.config.units import parse_duration, parse_size
from kvferry.tables import FitTable, add_wide_option, output_console, print_table

__all__ = ["add_parser", "run_store", "run_transfer"]


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _seconds(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_parser(subparsers: Any) -> None:
    bench = subparsers.add_parser(
        "bench", help="benchmarks: transfer, store, hitrate, serve, router, all"
    )
    kinds = bench.add_subparsers(title="benchmarks", metavar="BENCH")
    p = kinds.add_parser(
        "transfer",
        help="transfer engine sweep (the tebench of kvferry)",
        description="Sweep block size x batch size x threads and report bandwidth and latency. "
        "Modes: --target (serve), --target-seg HOST:PORT (initiator), --local (default: spawn a "
        "target process on loopback and run against it).",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--target", action="store_true", help="allocate, register and serve")
    mode.add_argument("--target-seg", metavar="HOST:PORT", help="run as initiator against it")
    mode.add_argument("--local", action="store_true", help="spawn a local target (default)")
    p.add_argument(
        "--backend",
        default="kvferry",
        help="kvferry, mooncake, or both comma-separated (default: kvferry); an entry may carry "
        "config overrides of its own, NAME+SECTION.KEY=VALUE[+...], to compare two configs of "
        "one engine (kvferry,kvferry+transfer.grace_period_ns=200000)",
    )
    p.add_argument(
        "--transport",
        default="auto",
        choices=["auto", "tcp", "shm", "local", "rdma"],
        help="transport (kvferry: auto|tcp|shm|local; mooncake: tcp|rdma)",
    )
    p.add_argument("--seg-type", default="DRAM", choices=["DRAM", "VRAM"])
    p.add_argument(
        "--total-buffer-size",
        type=_size,
        default=1 << 30,
        metavar="SIZE",
        help="buffer per side (default 1GiB)",
    )
    p.add_argument("--start-block-size", type=_size, default=4096, metavar="SIZE")
    p.add_argument("--max-block-size", type=_size, default=1 << 26, metavar="SIZE")
    p.add_argument("--start-batch-size", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=1)
    p.add_argument("--max-threads", type=int, default=1)
    p.add_argument("--duration", type=_seconds, default=5.0, help="seconds per case (default 5)")
    p.add_argument("--warmup", type=_seconds, default=1.0, help="warm-up seconds per case")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each case N times, alternating the backends round by round (their targets "
        "are all up at once, every case alternates them even with N=1); results pool the "
        "rounds, and the ratio table gives the median of the per-round ratios, which a "
        "machine's drift over minutes does not skew (default 1)",
    )
    p.add_argument("--op", default="read", choices=["read", "write", "mix"])
    p.add_argument(
        "--check-consistency",
        action="store_true",
        help="after each case write a pattern, read it back, verify every byte",
    )
    p.add_argument("--no-pin", action="store_true", help="do not bind bench threads to NUMA CPUs")
    p.add_argument(
        "--reference",
        action="store_true",
        help="also measure a plain socket stream and memcpy in the same run",
    )
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--csv", metavar="FILE", help="write one CSV row per case")
    p.add_argument("--quiet", action="store_true", help="print only results (and the ready line)")
    add_wide_option(p)
    add_config_options(p)
    p.set_defaults(func=run_transfer)
    _add_store_parser(kinds)
    add_hitrate_parser(kinds)
    add_serve_bench_parser(kinds)
    add_router_bench_parser(kinds)
    add_suite_parser(kinds)


def _transfer_options(args: argparse.Namespace) -> TransferBenchOptions:
    return TransferBenchOptions(
        backend=args.backend,
        seg_type=args.seg_type,
        total_buffer_size=args.total_buffer_size,
        start_block_size=args.start_block_size,
        max_block_size=args.max_block_size,
        start_batch_size=args.start_batch_size,
        max_batch_size=args.max_batch_size,
        max_threads=args.max_threads,
        duration=args.duration,
        warmup=args.warmup,
        op=args.op,
        check_consistency=args.check_consistency,
        transport=args.transport,
        pin_threads=not args.no_pin,
        rounds=args.rounds,
        target_seg=args.target_seg,
        reference=args.reference,
    )


def run_transfer(args: argparse.Namespace) -> int:
    console = output_console()
    err = Console(stderr=True)
    options = _transfer_options(args)
    loaded = load_from_args(args)

    if args.target:

        def announce(name: str) -> None:
            print(READY_PREFIX + name, flush=True)
            if not args.quiet:
                print(
                    "To start initiators, run\n"
                    f"  kvferry bench transfer --backend {options.contenders()[0].name} "
                    f"--target-seg {name} "
                    + ("--seg-type VRAM " if options.seg_type == "VRAM" else "")
                    + "--op read --start-block-size 4096 --max-block-size 64MiB "
                    "--max-batch-size 128 --max-threads 4 --duration 5",
                    flush=True,
                )

        serve(options, announce, config=loaded.config)
        return 0

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} cases"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=args.quiet,
    ) as bar:
        task = bar.add_task("sweep", total=None)

        def on_progress(done: int, total: int, what: str) -> None:
            bar.update(task, total=total or None, completed=done, description=what)

        report = run(options, on_progress, config=loaded.config, sources=loaded.sources)
    report.command = shlex.join(["kvferry", *getattr(args, "argv", [])])
    if report.skipped and not args.quiet:
        err.print(f"[dim]skipped {len(report.skipped)} case(s) larger than a buffer[/]")
    _print_report(console, report, multi=len(report.contenders) > 1, wide=args.wide)
    if args.json:
        report.write(args.json)
    if args.csv:
        write_csv(args.csv, report.cases)
    return 0


def _print_round_ratios(
    console: Console, report: TransferBenchReport, *, wide: bool = False
) -> None:
    rows = report.ratio_rows()
    if not rows:
        return
    first = rows[0][1]
    rounds = len(first.rounds)
    title = f"{first.subject} / {first.reference}"
    if rounds > 1:
        title += f", median of {rounds} alternating rounds"
    table = FitTable(title, wide=wide)
    columns = ["BlkSize (B)", "Batch", "Threads", "BW ratio", "P99 Tx ratio (lower better)"]
    if rounds > 1:
        columns[4:4] = ["BW ratio range"]
        columns.append("P99 ratio range")
    for column in columns:
        table.add_column(column, drop={"P99 ratio range": 2, "BW ratio range": 1}.get(column, 0))
    for case, bw, p99 in rows:
        cells = [str(case.block_size), str(case.batch_size), str(case.threads), f"{bw.value:.2f}x"]
        if rounds > 1:
            cells.append("{:.2f}-{:.2f}".format(*bw.spread))
        cells.append(f"{p99.value:.2f}x" if p99 else "")
        if rounds > 1:
            cells.append("{:.2f}-{:.2f}".format(*p99.spread) if p99 else "")
        table.add_row(*cells)
    print_table(console, table)


_TRANSFER_DROP = {"Avg Tx (us)": 4, "P999 Tx (us)": 3, "Avg Lat (us)": 2, "Transport": 1}
"""Columns of the transfer table a narrow terminal leaves out, the highest first."""


def _print_report(
    console: Console, report: TransferBenchReport, *, multi: bool, wide: bool = False
) -> None:
    table = FitTable(f"kvferry bench transfer ({report.options.op})", wide=wide)
    if multi:
        table.add_column("Backend", text=True)  # a label with overrides may be long
    table.add_column("Transport", justify="left", drop=_TRANSFER_DROP["Transport"])
    for column in COLUMNS:
        table.add_column(column, drop=_TRANSFER_DROP.get(column, 0))
    for result in report.cases:
        transport = str(report.backends.get(result.backend, {}).get("transport", ""))
        cells = ([result.backend] if multi else []) + [transport] + row(result)
        table.add_row(*cells)
    print_table(console, table)
    if multi:
        _print_round_ratios(console, report, wide=wide)
    verdict = report.consistency_verdict()
    if verdict:
        console.print(verdict)
    for ref in report.references:
        console.print(f"reference {ref.name}: {ref.value:.3f} {ref.unit}")
    sys.stdout.flush()


# -- kvferry bench store ---------------------------------------------------------------------
_OP_ALIASES = {
    "put": "put",
    "get": "get",
    "batchput": "batch-put",
    "batchget": "batch-get",
    "mixed": "mixed",
    "mix": "mixed",
}


def _store_op(text: str) -> str:
    """--op in kvferry's spelling (batch-get) or master_bench's (BatchGet, batch_get)."""
    op = _OP_ALIASES.get(text.lower().replace("-", "").replace("_", ""))
    if op is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an op; valid: {', '.join(store_bench.OPS)} "
            "(or master_bench's Put, Get, BatchPut, BatchGet)"
        )
    return op


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from e
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _add_store_parser(kinds: Any) -> None:
    p = kinds.add_parser(
        "store",
        help="store benchmark: put/get/batch-put/batch-get/mixed (the master_bench of kvferry)",
        description="Fill a store with --num-keys keys, run --op for --duration seconds on "
        "--clients processes x --threads threads, then read every key written back and compare "
        "its bytes. Every backend is driven through TieredStore.put/get, the calls a user makes.",
    )
    p.add_argument("--backend", default="cpu", choices=list(store_bench.BACKENDS))
    p.add_argument(
        "--op",
        "--operation",
        dest="op",
        type=_store_op,
        default="batch-get",
        metavar="OP",
        help=f"{', '.join(store_bench.OPS)} (default batch-get); BatchGet etc. also accepted",
    )
    p.add_argument("--value-size", type=_size, default=4096, metavar="SIZE", help="default 4KiB")
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="keys per call of batch-put/batch-get/mixed (default 128 for batch ops, else 1)",
    )
    p.add_argument("--clients", "--num-clients", dest="clients", type=int, default=1)
    p.add_argument(
        "--threads", "--num-threads", dest="threads", type=int, default=1, help="per client"
    )
    p.add_argument("--duration", type=_seconds, default=5.0, help="seconds measured (default 5)")
    p.add_argument("--warmup", type=_seconds, default=1.0, help="seconds before measuring")
    p.add_argument("--num-keys", type=int, default=10_000, help="keys filled (default 10000)")
    p.add_argument(
        "--read-ratio", type=_ratio, default=0.9, help="fraction of gets in --op mixed (0.9)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of values and read positions")
    p.add_argument("--no-verify", action="store_true", help="skip reading every key back")
    p.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="server: running store servers, comma-separated; mooncake: a running master "
        "(default: start one)",
    )
    p.add_argument(
        "--membership-url",
        metavar="REDIS_URL",
        help="server: the servers registered there (kvferry serve store --register)",
    )
    p.add_argument(
        "--slot-size",
        type=_size,
        metavar="SIZE",
        help="store.slot_size (default: --value-size rounded up to 4KiB or a power of two)",
    )
    p.add_argument(
        "--capacity",
        type=_size,
        metavar="SIZE",
        help="cpu.capacity (cpu, and the server a run starts) or disk.capacity (disk)",
    )
    p.add_argument(
        "--disk-path",
        metavar="DIR",
        help="disk.path: the run uses a fresh subdir (default: files of the run's own, freed "
        "when it exits)",
    )
    p.add_argument("--redis-url", metavar="URL", help="redis.url")
    p.add_argument(
        "--overfill",
        action="store_true",
        help="allow --num-keys beyond the capacity: the store evicts as it fills (churn)",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="disk: also run fio on the tier's directory (same block size, direction, jobs, "
        "direct I/O) for the timed phase's duration",
    )
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--csv", metavar="FILE", help="write one CSV row per phase and op")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_wide_option(p)
    add_config_options(p)
    p.set_defaults(func=run_store)


def _store_flags(args: argparse.Namespace) -> tuple[dict[str, object], dict[str, str]]:
    """The store flags as dotted config keys, refusing those that do not apply to --backend."""
    given = {
        "--capacity": args.capacity,
        "--disk-path": args.disk_path,
        "--redis-url": args.redis_url,
        "--address": args.address,
        "--membership-url": args.membership_url,
    }
    keys = backend_settings(args.backend, given)
    names = {key: flag for flag, key in BACKENDS[args.backend].settings.items() if key}
    flags: dict[str, object] = {"store.slot_size": args.slot_size, **keys}
    return flags, {"store.slot_size": "--slot-size", **names}


def run_store(args: argparse.Namespace) -> int:
    console = output_console()
    err = Console(stderr=True)
    flags, names = _store_flags(args)
    loaded = load_from_args(args, flags, flag_names=names)
    config = loaded.config
    # --slot-size, or a slot size the config sets, wins over the one derived from --value-size.
    slot = config.store.slot_size if loaded.sources["store.slot_size"] != "default" else 0
    # A mooncake master address the config sets means "use that master", like --address.
    address = args.address
    configured = loaded.sources["mooncake.master_address"] != "default"
    if address is None and args.backend == "mooncake" and configured:
        address = config.mooncake.master_address
    options = store_bench.StoreBenchOptions(
        backend=args.backend,
        op=args.op,
        value_size=args.value_size,
        batch_size=args.batch_size,
        clients=args.clients,
        threads=args.threads,
        duration=args.duration,
        warmup=args.warmup,
        num_keys=args.num_keys,
        read_ratio=args.read_ratio,
        seed=args.seed,
        verify=not args.no_verify,
        slot_size=slot,
        address=address,
        reference=args.reference,
        overfill=args.overfill,
    )
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=args.quiet,
    ) as progress:
        task = progress.add_task(f"{options.backend}: starting", total=None, detail="")

        def on_progress(phase: str, done: float, total: float, unit: str) -> None:
            detail = (
                f"{done:.0f}/{total:.0f} keys" if unit == "keys" else f"{done:.1f}/{total:.1f} s"
            )
            progress.update(
                task,
                description=f"{options.backend} {phase}",
                completed=done,
                total=total,
                detail=detail,
            )

        report = store_bench.run(options, on_progress, config=config, sources=loaded.sources)
    report.command = shlex.join(["kvferry", *getattr(args, "argv", [])])
    _print_store_report(console, report, wide=args.wide)
    if args.json:
        report.write(args.json)
    if args.csv:
        store_bench.write_csv(args.csv, report)
    report.raise_for_failures()
    return 0


_STORE_DROP = {
    "P90 (us)": 6,
    "Mean (us)": 5,
    "Blocks/s": 4,
    "P999 (us)": 3,
    "Ops": 2,
    "Batch": 1,
}
"""Columns of the store table a narrow terminal leaves out, the highest first."""


def _print_store_report(
    console: Console, report: store_bench.StoreBenchReport, *, wide: bool = False
) -> None:
    o = report.options
    title = (
        f"kvferry bench store ({o.backend}, {o.op}, value {o.value_size} B, "
        f"{o.clients} client(s) x {o.threads} thread(s))"
    )
    table = FitTable(title, wide=wide)
    for i, column in enumerate(store_bench.COLUMNS):
        table.add_column(
            column, justify="left" if i < 2 else "right", drop=_STORE_DROP.get(column, 0)
        )
    for result in report.phases:
        table.add_row(*store_bench.row(result))
    print_table(console, table)
    v = report.verify
    if v is not None:
        verdict = "OK" if v.ok else "FAILED"
        evicted = (
            f" (the store evicted {v.evictions} blocks and refused {v.refused})"
            if v.missing and (v.evictions or v.refused)
            else ""
        )
        console.print(
            f"verify: {v.keys} keys read back, {v.mismatched} differ, "
            f"{v.missing} missing{evicted}: {verdict}"
        )
    for note in report.notes:
        console.print(f"note: {note}")
    timed = [p for p in report.phases if p.phase != "fill" and p.phase != "verify"]
    for ref in report.references:
        against = f" (timed phase: {timed[0].gbps:.3f} GB/s)" if timed else ""
        console.print(f"reference {ref.name}: {ref.value:.3f} {ref.unit}{against}")
    sys.stdout.flush()
