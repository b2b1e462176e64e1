"""``kvferry plan``: SLA selection and replica counts from profiles written by ``kvferry
profile --out``.

Parse flags -> read each ``--profile DIR`` -> :func:`kvferry.bench.profile.select.plan` -> print
the choice per stage (or ``infeasible`` with the closest candidate and its miss) and the replica
counts. Exit status: 0; 1 with ``--strict`` when the SLA is infeasible; 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvferry.bench.result import encode
from kvferry.cli.profile_cmd import EXIT_FAILED, add_plan_options, plan_from_args, print_plan
from kvferry.tables import output_console

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
    p.add_argument("--json", default="", metavar="FILE", help="write the plan as JSON (- stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvferry.bench.profile.npz import read_profile

    reports = [read_profile(d) for d in args.profile]
    names = [Path(d).name or d for d in args.profile]
    if len(set(names)) < len(names):
        names = list(args.profile)
    plan = plan_from_args(reports, args, names)
    text = json.dumps({**encode(plan), "feasible": plan.feasible}, indent=2) + "\n"
    if args.json == "-":
        print(text, end="")
    else:
        print_plan(output_console(), plan)
        if args.json:
            Path(args.json).write_text(text)
            print(f"json: {args.json}")
    return EXIT_FAILED if args.strict and not plan.feasible else 0
