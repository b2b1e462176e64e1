"""``kvferry bench all`` (``make run``): the whole lab on the embedded default, then one report.

Parse the flags into :class:`~kvferry.bench.suite.SuiteOptions`, run
:func:`kvferry.bench.suite.run` under a live view, print what each step wrote, then build the
report from the results (``DIR/report.html`` and ``DIR/report.md``) and print its path and
headline numbers. The report is built here, not in the lab: :mod:`kvferry.report` sits above
:mod:`kvferry.bench`. Nothing is measured or computed here.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from kvferry.bench.suite import STEPS, SuiteOptions, SuiteProgress, SuiteResult, run
from kvferry.errors import KvferryError
from kvferry.tables import FitTable, output_console, print_table

__all__ = ["add_suite_parser", "build_report_files", "run_suite"]


def add_suite_parser(kinds: Any) -> None:
    p = kinds.add_parser(
        "all",
        help="the whole lab on the embedded default (doctor, transfer, store, hitrate, serve, "
        "router), then one HTML report",
        description="Check the machine (kvferry doctor), then run every bench, small, on the "
        "embedded default: a transfer sweep over "
        "loopback TCP with the same-run socket and memcpy references (and Mooncake's engine "
        "beside kvferry when it is installed), the store bench (cpu, server), the hit-rate lab "
        "on the bundled trace, a mock engine with an endpoint concurrency sweep, and a router "
        "comparison. Each writes its result JSON and figures into --out; then the report is "
        "built there (report.html, report.md).",
    )
    p.add_argument(
        "--out", default=".kvferry-run", metavar="DIR", help="run directory (%(default)s)"
    )
    p.add_argument(
        "--quick", action="store_true", help="every step as small as it goes (seconds, for tests)"
    )
    p.add_argument(
        "--only",
        metavar="STEP[,STEP...]",
        help=f"run only these steps: {', '.join(STEPS)}",
    )
    mooncake = p.add_mutually_exclusive_group()
    mooncake.add_argument(
        "--mooncake",
        dest="mooncake",
        action="store_true",
        default=None,
        help="measure Mooncake's transfer engine beside kvferry (default: when it imports)",
    )
    mooncake.add_argument(
        "--no-mooncake", dest="mooncake", action="store_false", help="measure kvferry alone"
    )
    p.add_argument("--quiet", action="store_true", help="no live view")
    p.set_defaults(func=run_suite)


class _Live:
    """The run on two bars: the steps, and the running step's own progress."""

    def __init__(self, console: Console, quiet: bool) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=quiet,
        )
        self.steps: TaskID | None = None
        self.step: tuple[str, TaskID] | None = None

    def __call__(self, u: SuiteProgress) -> None:
        p = self.progress
        if self.steps is None:
            self.steps = p.add_task("lab", total=u.steps, detail="")
        p.update(self.steps, completed=u.index, description=f"lab {u.index + 1}/{u.steps}")
        if self.step is None or self.step[0] != u.step:
            if self.step is not None:
                p.remove_task(self.step[1])
            self.step = (u.step, p.add_task(u.step, total=None, detail=""))
        p.update(self.step[1], completed=u.done, total=u.total, detail=u.detail)


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _print_steps(console: Console, result: SuiteResult) -> None:
    table = FitTable(f"kvferry bench all: {_relative(result.out)}")
    table.add_column("Step", justify="left")
    table.add_column("Time (s)")
    table.add_column("Wrote", text=True)
    for step in result.steps:
        wrote = ", ".join(str(p.relative_to(result.out)) for p in step.files) or "-"
        if step.error is not None:
            wrote = f"FAILED: {step.error}" + ("" if not step.files else f" (kept {wrote})")
        table.add_row(step.name, f"{step.seconds:.1f}", wrote)
    print_table(console, table)
    for note in result.notes:
        console.print(f"note: {note}")


def build_report_files(paths: list[Path], out: Path) -> tuple[Path, Path, list[tuple[str, str]]]:
    """Build the report of ``paths`` and write ``out/report.html`` and ``out/report.md``;
    returns both paths and the headline (label, value) pairs.

    Raises:
        KvferryError: a result cannot be read or the report cannot be written.
    """
    from kvferry.report.build import build_report
    from kvferry.report.html import write_html
    from kvferry.report.markdown import write_markdown

    doc = build_report([str(p) for p in paths], title=f"kvferry lab run: {out.name}")
    html, md = out / "report.html", out / "report.md"
    write_html(doc, html)
    write_markdown(doc, md)
    return html, md, [(str(label).strip(), str(value).strip()) for label, value in doc.headline]


def run_suite(args: argparse.Namespace) -> int:
    console = output_console()
    err = Console(stderr=True, highlight=False)
    steps = STEPS if not args.only else tuple(s.strip() for s in args.only.split(",") if s.strip())
    options = SuiteOptions(
        out=Path(args.out),
        quick=args.quick,
        steps=steps,
        mooncake=args.mooncake,
        command=shlex.join(["kvferry", *getattr(args, "argv", [])]),
    )
    live = _Live(err, args.quiet)
    with live.progress:
        result = run(options, live)
    _print_steps(console, result)
    if result.results:
        started = time.monotonic()
        html, md, headline = build_report_files(result.results, result.out)
        seconds = time.monotonic() - started
        console.print(f"report: {_relative(html)} (and {_relative(md)}, {seconds:.1f} s)")
        for label, value in headline:
            console.print(f"  {label}: {value}")
    if result.failed:
        names = ", ".join(s.name for s in result.failed)
        raise KvferryError(f"{len(result.failed)} step(s) failed: {names} (see the table above)")
    return 0
