"""``kvferry doctor``: the production checklist, run against this machine and a config.

Owns the command's flags and what it prints: one table row per check (Check, Status, Value,
Threshold), a ``fix NAME: ...`` line under it for each WARN or FAIL (whole, so the command can be
copied; ``--wide`` puts Fix and Why in the table instead), then the summary line
(``N OK, N WARN, N FAIL, N SKIP``).
The checks are :func:`kvferry.bench.doctor.run`'s. Exit status: 0 when no check FAILs (WARN
included: a warning is advice, not a broken host), 1 when one does (after the table and the
``--json`` file are written), 2 for bad input (an unknown ``--only`` name, a bad config value:
one ``error:`` line from the CLI's boundary). Root is never needed.
"""

from __future__ import annotations

import argparse
import shlex
from typing import TYPE_CHECKING

from rich.text import Text

from kvferry.cli.common import add_config_options, live_progress, load_from_args
from kvferry.tables import FitTable, add_wide_option, output_console, print_table

if TYPE_CHECKING:
    from kvferry.bench.doctor import DoctorReport

__all__ = ["EXIT_FAILED", "add_parser", "doctor_table", "run"]

EXIT_FAILED = 1

_STYLES = {"OK": "green", "WARN": "yellow", "FAIL": "bold red", "SKIP": "dim"}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kvferry doctor``."""
    p = subparsers.add_parser(
        "doctor",
        help="check this machine and the config against kvferry's production checklist",
        description="Check this machine and the effective config against kvferry's production "
        "checklist: memlock, huge pages and THP, NUMA, file and map limits, /dev/shm, TCP "
        "buffers, ports and backlog, MTU, O_DIRECT and space in the disk tier's directory, "
        "io_uring, Redis and Mooncake reachability, GPU H2D speed, RDMA ports, a sleeping "
        "thread's wake-up cost (and the transfer.grace_period_ns it suggests), and where each "
        "config value came from. Each check is OK, WARN, FAIL or SKIP (not applicable) with "
        "the value measured, the threshold and the fix. Exit 1 when a check FAILs. Needs no "
        "root.",
    )
    add_config_options(p)
    p.add_argument(
        "--only",
        metavar="NAME,...",
        default=None,
        help="run only these checks (comma-separated; kvferry doctor lists every name)",
    )
    p.add_argument(
        "--json",
        metavar="FILE",
        default=None,
        help='write {"checks": [{"name", "status", "value", "threshold", "why", "fix"}, ...], '
        "...} with the machine and the config's sources ('-': stdout)",
    )
    p.add_argument(
        "--wakeup-samples",
        type=int,
        default=300,
        metavar="N",
        help="wake-up latency samples, one per millisecond (default 300)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_wide_option(p)
    p.set_defaults(func=run)


def doctor_table(report: DoctorReport, *, wide: bool = False) -> FitTable:
    """One row per check: Check, Status, Value, Threshold (``wide``: and Fix, Why)."""
    table = FitTable("kvferry doctor", wide=wide, title_justify="left")
    table.add_column("Check", justify="left", style="cyan")
    table.add_column("Status", justify="left")
    table.add_column("Value", text=True)
    table.add_column("Threshold", text=True, drop=1)
    if wide:
        table.add_column("Fix", text=True)
        table.add_column("Why", text=True)
    for c in report.checks:
        cells: list[str | Text] = [c.name, Text(c.status, style=_STYLES[c.status]), c.value]
        cells.append(c.threshold)
        table.add_row(*cells, *([c.fix, c.why] if wide else []))
    return table


def run(args: argparse.Namespace) -> int:
    from kvferry.bench.doctor import DoctorOptions
    from kvferry.bench.doctor import run as run_doctor

    only = tuple(n.strip() for n in (args.only or "").split(",") if n.strip())
    options = DoctorOptions(only=only, wakeup_samples=args.wakeup_samples)
    loaded = load_from_args(args)
    console = output_console()
    with live_progress(console, args.quiet or args.json == "-") as bar:
        task = bar.add_task("doctor", total=len(options.names), stats="")

        def progress(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, description=f"doctor: {name}")

        report: DoctorReport = run_doctor(
            options, progress, config=loaded.config, sources=loaded.sources
        )
    report.command = shlex.join(["kvferry", *getattr(args, "argv", [])])
    if args.json == "-":
        report.write("-")
        return EXIT_FAILED if report.failed else 0
    table = doctor_table(report, wide=args.wide)
    print_table(console, table)
    if not args.wide:
        # fixes are commands: a line each, whole, so they can be copied (a narrow column would
        # break them mid-word)
        for c in report.checks:
            if c.fix and c.status in ("WARN", "FAIL"):
                console.print(Text(f"fix {c.name}: {c.fix}"), soft_wrap=True)
    print(report.summary())
    if args.json:
        report.write(args.json)
        print(f"json: {args.json}")
    return EXIT_FAILED if report.failed else 0
