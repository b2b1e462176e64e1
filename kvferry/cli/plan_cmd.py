"""``kvferry plan``: SLA selection and replica counts from profiles written by ``kvferry
profile --out``.

Parse flags -> read each ``--profile DIR`` -> :func:`kvferry.bench.profile.select.plan` -> print
the choice per stage (or ``infeasible`` with the closest candidate and its miss) and the replica
counts. With ``--simulate``: then :func:`kvferry.bench.profile.simulate.run` (fleets of mocks
calibrated from the profile behind the router, with a live bar) -> the table of runs and the
smallest fleet per routing mode. ``--json`` writes either as a result of tool ``plan`` (a
:class:`~kvferry.bench.profile.simulate.SimulationReport`, without options or runs for the plain
plan), which ``kvferry report`` gives its own section. Exit status: 0; 1 with ``--strict`` when
the SLA is infeasible (with ``--simulate``: when no fleet of any mode meets it); 2 for bad input.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kvferry.cli.common import live_progress
from kvferry.cli.profile_cmd import EXIT_FAILED, add_plan_options, plan_from_args, print_plan
from kvferry.errors import ConfigError
from kvferry.tables import FitTable, add_wide_option, output_console, print_table

if TYPE_CHECKING:
    from kvferry.bench.profile.simulate import SimulationReport

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kvferry plan``."""
    p = subparsers.add_parser(
        "plan",
        help="pick the engine configuration and replica counts that meet a TTFT and ITL SLA "
        "from kvferry profile results",
        description="Among the candidates (one --profile DIR each), pick the highest prefill "
        "throughput per instance whose TTFT meets --ttft (at --isl, interpolated) and the "
        "highest decode throughput whose ITL meets --itl (at context ISL + OSL/2); say "
        "'infeasible' with the closest candidate and its miss when none does; with "
        "--request-rate, --isl and --osl, count the prefill and decode instances for the load.",
    )
    p.add_argument(
        "--profile",
        action="append",
        required=True,
        metavar="DIR",
        help="a kvferry profile --out directory (repeatable: one per candidate)",
    )
    add_plan_options(p, required=True)
    p.add_argument(
        "--json",
        default="",
        metavar="FILE",
        help="write the result (tool plan: the plan, with --simulate the simulated fleets "
        "too; kvferry report reads it) as JSON (- stdout)",
    )
    sim = p.add_argument_group("simulation (--simulate)")
    sim.add_argument(
        "--simulate",
        action="store_true",
        help="check the plan on fleets of 1..--max-instances mocks calibrated from the profile "
        "behind kvferry serve router at the load (needs --request-rate, --isl, --osl)",
    )
    sim.add_argument(
        "--max-instances", type=int, default=4, metavar="N", help="largest fleet tried (4)"
    )
    sim.add_argument(
        "--router-modes",
        default="kv,round-robin",
        metavar="LIST",
        help="routing modes, comma-separated: kv, round-robin, random (kv,round-robin)",
    )
    sim.add_argument(
        "--speedup-ratio",
        type=float,
        default=None,
        metavar="X",
        help="the mocks run X times faster; times are scaled back (default: up to 10, as the "
        "load allows: the router and the client are not sped up)",
    )
    sim.add_argument(
        "--sim-requests", type=int, default=100, metavar="N", help="requests per fleet (100)"
    )
    sim.add_argument(
        "--all-fleets",
        action="store_true",
        help="run every fleet size up to --max-instances, not only up to the first that meets "
        "the SLA",
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--quiet", action="store_true", help="no live progress")
    add_wide_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvferry.bench.profile.npz import read_profile

    if args.simulate:
        return _simulate(args)
    from kvferry.bench.profile.simulate import SimulationReport

    started = time.time()
    reports = [read_profile(d) for d in args.profile]
    names = [Path(d).name or d for d in args.profile]
    if len(set(names)) < len(names):
        names = list(args.profile)
    plan = plan_from_args(reports, args, names)
    # the same result model as --simulate's (no options, no runs), so kvferry report reads it
    result = SimulationReport(
        plan=plan,
        profiles=list(args.profile),
        profile_name=", ".join(names),
        max_kv_tokens=reports[0].max_kv_tokens if len(reports) == 1 else 0,
        max_context=reports[0].max_context if len(reports) == 1 else 0,
        started_at=started,
        ended_at=time.time(),
        command=shlex.join(["kvferry", *getattr(args, "argv", [])]),
    )
    if args.json == "-":
        result.write("-")
    else:
        print_plan(output_console(), plan)
        if args.json:
            result.write(args.json)
            print(f"json: {args.json}")
    return EXIT_FAILED if args.strict and not plan.feasible else 0


def _simulate(args: argparse.Namespace) -> int:
    from kvferry.bench.profile.npz import read_profile
    from kvferry.bench.profile.simulate import SimProgress, SimulateOptions
    from kvferry.bench.profile.simulate import run as run_simulation

    if len(args.profile) != 1:
        raise ConfigError(
            "--simulate runs one profiled engine: give one --profile DIR (run kvferry plan "
            "--simulate once per candidate)"
        )
    if args.request_rate is None or args.isl is None or args.osl is None:
        raise ConfigError("--simulate needs the load: --request-rate R --isl N --osl M")
    options = SimulateOptions(
        profile=args.profile[0],
        ttft_ms=args.ttft,
        itl_ms=args.itl,
        request_rate=args.request_rate,
        isl=args.isl,
        osl=args.osl,
        max_instances=args.max_instances,
        modes=tuple(m.strip() for m in args.router_modes.split(",") if m.strip()),
        speedup_ratio=args.speedup_ratio,
        requests=args.sim_requests,
        seed=args.seed,
        all_fleets=args.all_fleets,
    )
    options.validate()
    plan = plan_from_args([read_profile(args.profile[0])], args, [Path(args.profile[0]).name])
    console = output_console()
    with live_progress(console, args.quiet or args.json == "-", eta=True) as bar:
        task = bar.add_task("simulate", total=None, stats="")

        def progress(p: SimProgress) -> None:
            what = "probe" if p.mode == "probe" else f"{p.mode} x {p.instances}"
            stats = ""
            if p.serve is not None and p.serve.total:
                stats = f"{p.serve.done}/{p.serve.total} requests"
            bar.update(task, total=p.total, completed=p.index, description=what, stats=stats)

        report = run_simulation(options, progress, plan=plan)
    report.command = shlex.join(["kvferry", *getattr(args, "argv", [])])
    if args.json == "-":
        report.write("-")
    else:
        print_plan(console, plan)
        print_table(console, simulation_table(report, wide=args.wide))
        for line in report.lines():
            console.print(line, soft_wrap=True, markup=False)
        for note in report.notes:
            console.print(f"note: {note}", soft_wrap=True, markup=False)
        if args.json:
            report.write(args.json)
            print(f"json: {args.json}")
    met = any(report.smallest(m) is not None for m in options.modes)
    return EXIT_FAILED if args.strict and not met else 0


def simulation_table(report: SimulationReport, *, wide: bool = False) -> FitTable:
    """One row per fleet run: its mode, size, the profiled engine's TTFT and ITL p50/p99
    (scaled back) and whether it met the SLA."""
    from kvferry.bench.profile.simulate import num

    o = report.options
    if o is None:
        raise ValueError("simulation_table needs a simulated result (options is None)")
    table = FitTable(
        f"simulated fleets: {report.profile_name} at {o.request_rate:g} requests/s, ISL "
        f"{o.isl}, OSL {o.osl} ({report.speedup_ratio:g}x, {o.requests} requests each)",
        wide=wide,
        title_justify="left",
    )
    cols = ("routing", "instances", "TTFT p50 (ms)", "TTFT p99 (ms)", "ITL p50 (ms)",
            "ITL p99 (ms)", "failed", "SLA")  # fmt: skip
    drop = {"TTFT p99 (ms)": 2, "ITL p99 (ms)": 1, "failed": 3}
    for header in cols:
        table.add_column(header, drop=drop.get(header, 0))
    for r in report.runs:
        table.add_row(
            r.mode,
            str(r.instances),
            *(num(v) if v is not None else "-" for v in (
                r.ttft_p50_ms, r.ttft_p99_ms, r.itl_p50_ms, r.itl_p99_ms)),
            str(r.errors),
            "met" if r.meets else "missed",
        )  # fmt: skip
    return table
