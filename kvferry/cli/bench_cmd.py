"""``kvferry bench ...``: parse flags, call the bench harness, print/write results; no logic."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kvferry.bench import references
from kvferry.bench.store import harness as store_bench
from kvferry.bench.transfer.harness import (
    COLUMNS,
    READY_PREFIX,
    Contender,
    TransferBenchOptions,
    TransferBenchReport,
    make_backend,
    row,
    run_interleaved,
    serve_target,
    spawn_local_target,
    write_csv,
)
from kvferry.cli.common import add_config_options, load_from_args
from kvferry.cli.hitrate_cmd import add_hitrate_parser
from kvferry.cli.router_bench_cmd import add_router_bench_parser
from kvferry.cli.serve_bench_cmd import add_serve_bench_parser
from kvferry.config.models import KvferryConfig
from kvferry.config.units import parse_duration, parse_size
from kvferry.errors import ConfigError
from kvferry.tables import FitTable, add_wide_option, output_console, print_table


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
    bench = subparsers.add_parser("bench", help="benchmarks: transfer, store, hitrate, serve")
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


def _options(args: argparse.Namespace, backend: str) -> TransferBenchOptions:
    options = TransferBenchOptions(
        backend=backend,
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
    )
    options.validate()
    return options


@dataclass(frozen=True)
class _Entry:
    """One ``--backend`` entry: ``NAME`` or ``NAME+SECTION.KEY=VALUE[+...]``, the name with
    config overrides of its own (``kvferry+transfer.grace_period_ns=200000``), so two configs
    of one engine can be measured side by side. ``label`` (the entry as typed) names its
    results."""

    label: str
    name: str
    config: KvferryConfig


def _entries(args: argparse.Namespace) -> list[_Entry]:
    """Parse --backend; each entry's config is the command's with the entry's overrides.

    Raises:
        ConfigError: an empty list, a repeated entry, or a malformed or invalid override.
    """
    labels = [b.strip() for b in args.backend.split(",") if b.strip()]
    if not labels:
        raise ConfigError("--backend is empty; use kvferry, mooncake or both comma-separated")
    if len(set(labels)) != len(labels):
        raise ConfigError(
            f"--backend {args.backend!r} names an entry twice; to compare two configs of one "
            "engine, give one of them overrides (kvferry,kvferry+transfer.workers=2)"
        )
    entries = []
    for label in labels:
        name, *pairs = label.split("+")
        overrides: dict[str, str] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or "." not in key.strip(".") or not value:
                raise ConfigError(
                    f"--backend entry {label!r}: {pair!r} is not SECTION.KEY=VALUE (e.g. "
                    "kvferry+transfer.grace_period_ns=200000)"
                )
            overrides[key] = value
        config = load_from_args(
            args, overrides, flag_names={k: f"--backend {label}" for k in overrides}
        ).config
        entries.append(_Entry(label, name.strip(), config))
    return entries


def run_transfer(args: argparse.Namespace) -> int:
    console = output_console()
    err = Console(stderr=True)
    entries = _entries(args)

    if args.target:
        if len(entries) != 1:
            raise ConfigError("--target serves one backend; pass a single --backend")
        options = _options(args, entries[0].name)
        backend = make_backend(entries[0].name, options, entries[0].config)

        def announce(name: str) -> None:
            print(READY_PREFIX + name, flush=True)
            if not args.quiet:
                print(
                    "To start initiators, run\n"
                    f"  kvferry bench transfer --backend {entries[0].name} --target-seg {name} "
                    + ("--seg-type VRAM " if options.seg_type == "VRAM" else "")
                    + "--op read --start-block-size 4096 --max-block-size 64MiB "
                    "--max-batch-size 128 --max-threads 4 --duration 5",
                    flush=True,
                )

        serve_target(backend, options.total_buffer_size, announce)
        return 0

    report = TransferBenchReport(options=_options(args, entries[0].name))
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} cases"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=args.quiet,
    ) as progress:
        skipped = _run_contenders(args, entries, report, progress)
        if skipped and not args.quiet:
            err.print(f"[dim]skipped {len(skipped)} case(s) larger than a buffer[/]")
        if args.reference:
            task = progress.add_task("reference: socket stream 1MiB, memcpy 16MiB", total=None)
            seconds = max(1.0, args.duration)
            report.references["socket_stream_1MiB"] = references.socket_stream(1 << 20, seconds)
            report.references["memcpy_16MiB"] = references.memcpy(16 << 20, seconds)
            progress.remove_task(task)

    _print_report(console, report, multi=len(entries) > 1, wide=args.wide)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    if args.csv:
        write_csv(args.csv, report.cases)
    return 0


def _print_round_ratios(
    console: Console, report: TransferBenchReport, *, wide: bool = False
) -> None:
    if not report.ratios:
        return
    first = report.ratios[0]
    rounds = len(first.bw)
    title = f"{first.base} / {first.other}"
    if rounds > 1:
        title += f", median of {rounds} alternating rounds"
    table = FitTable(title, wide=wide)
    columns = ["BlkSize (B)", "Batch", "Threads", "BW ratio", "P99 Tx ratio (lower better)"]
    if rounds > 1:
        columns[4:4] = ["BW ratio range"]
        columns.append("P99 ratio range")
    for column in columns:
        table.add_column(column, drop={"P99 ratio range": 2, "BW ratio range": 1}.get(column, 0))
    for r in report.ratios:
        cells = [str(r.block_size), str(r.batch_size), str(r.threads), f"{r.bw_median:.2f}x"]
        if rounds > 1:
            cells.append(f"{min(r.bw):.2f}-{max(r.bw):.2f}")
        cells.append(f"{r.p99_median:.2f}x")
        if rounds > 1:
            cells.append(f"{min(r.p99):.2f}-{max(r.p99):.2f}")
        table.add_row(*cells)
    print_table(console, table)


def _run_contenders(
    args: argparse.Namespace,
    entries: list[_Entry],
    report: TransferBenchReport,
    progress: Progress,
) -> list[Any]:
    """Every entry connected to its own target at once, cases interleaved over --rounds."""
    task = progress.add_task("sweep", total=None)

    def on_progress(i: int, n: int, case: Any) -> None:
        progress.update(
            task,
            total=n,
            completed=i,
            description=f"{case.block_size}B x{case.batch_size} t{case.threads}",
        )

    with contextlib.ExitStack() as stack:
        contenders = []
        for e in entries:
            options = _options(args, e.name)
            backend = make_backend(e.name, options, e.config)
            stack.callback(backend.close)
            if args.target_seg:
                contenders.append(Contender(e.label, backend, args.target_seg))
            else:
                segment, pid = stack.enter_context(spawn_local_target(e.name, options, e.config))
                contenders.append(Contender(e.label, backend, segment, pid))
        results, ratios, skipped = run_interleaved(
            contenders, _options(args, entries[0].name), progress=on_progress
        )
        for c in contenders:
            report.backends[c.name] = c.backend.describe()
    report.cases.extend(results)
    report.ratios.extend(ratios)
    progress.remove_task(task)
    return skipped


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
    for name, ref in report.references.items():
        console.print(f"reference {name}: {ref['gbps']:.3f} GB/s")
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
        help="server: a running store server; mooncake: a running master (default: start one)",
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
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--csv", metavar="FILE", help="write one CSV row per phase and op")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_wide_option(p)
    add_config_options(p)
    p.set_defaults(func=run_store)


def _store_flags(args: argparse.Namespace) -> tuple[dict[str, object], dict[str, str]]:
    """The store flags as dotted config keys, refusing those that do not apply to --backend."""
    backend = args.backend
    applies = {
        "--capacity": ("cpu", "disk", "server"),
        "--disk-path": ("disk",),
        "--redis-url": ("redis",),
        "--address": ("server", "mooncake"),
    }
    given = {
        "--capacity": args.capacity,
        "--disk-path": args.disk_path,
        "--redis-url": args.redis_url,
        "--address": args.address,
    }
    for flag, value in given.items():
        if value is not None and backend not in applies[flag]:
            raise ConfigError(
                f"{flag} does not apply to --backend {backend}; it is for "
                f"--backend {' or '.join(applies[flag])}"
            )
    capacity_key = "disk.capacity" if backend == "disk" else "cpu.capacity"
    flags: dict[str, object] = {
        "store.slot_size": args.slot_size,
        capacity_key: args.capacity,
        "disk.path": args.disk_path,
        "redis.url": args.redis_url,
    }
    names = {
        "store.slot_size": "--slot-size",
        capacity_key: "--capacity",
        "disk.path": "--disk-path",
        "redis.url": "--redis-url",
    }
    return flags, names


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
    )
    options.validate()
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

        report = store_bench.run_store_bench(options, config, on_progress=on_progress)
    _print_store_report(console, report, wide=args.wide)
    if args.json:
        store_bench.write_json(args.json, report)
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
    sys.stdout.flush()
