"""``kvferry profile``: the SLA profiler against an OpenAI-compatible endpoint.

Parse flags -> :class:`~kvferry.bench.profile.options.ProfileOptions` ->
:func:`kvferry.bench.profile.harness.run` (a live bar with an ETA) -> print the points, the fit
and, with ``--ttft`` and ``--itl``, the plan; write ``--out DIR`` (profile.json, Dynamo's npz
files, plots when matplotlib is installed) and ``--json FILE``. With ``--candidate NAME=ARGS``
(repeatable) each candidate is profiled in turn (an engine kvferry starts and stops, or a running
URL: :mod:`kvferry.bench.profile.candidates`), written to ``--out DIR/NAME``, and the plan picks
among them. Exit status: 0; 1 when an engine went away mid-profile or a candidate did not start
(the points so far are written) or, with ``--strict``, when the SLA is infeasible; 2 for bad
input.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from rich.console import Console

from kvferry.bench.profile.report import ProfileReport
from kvferry.bench.profile.select import Plan
from kvferry.cli.common import live_progress
from kvferry.errors import ConfigError, MissingDependency
from kvferry.tables import FitTable, add_wide_option, output_console, print_table

__all__ = ["EXIT_FAILED", "add_parser", "decode_table", "prefill_table", "print_plan", "run"]

EXIT_FAILED = 1


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kvferry profile``."""
    p = subparsers.add_parser(
        "profile",
        help="profile an engine's prefill (TTFT vs ISL) and decode (ITL vs KV usage and "
        "context) for SLA planning",
        description="Sweep prefill (ISLs at concurrency 1, tiny OSL) and decode (context x "
        "concurrency, clamped to the KV capacity) on an OpenAI-compatible server with kvferry "
        "bench serve's client; fit TTFT(ISL) by a quadratic, interpolate the decode surface, "
        "and with --ttft and --itl pick what meets the SLA (as kvferry plan does). Writes "
        "profile.json, Dynamo's raw_data.npz files and plots into --out.",
    )
    p.add_argument(
        "--url", default=None, help="the server's base URL (default http://127.0.0.1:8000)"
    )
    p.add_argument(
        "--candidate",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="profile this engine instead of --url (repeatable; the plan picks among them): "
        "NAME=http://HOST:PORT (running), NAME=mock [kvferry serve mock flags] or NAME=vllm "
        "--model DIR [vLLM flags], started, profiled and stopped in turn; --out DIR gets one "
        "directory per NAME",
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds a candidate's engine may take to start (default 600)",
    )
    p.add_argument("--mode", choices=("prefill", "decode", "both"), default="both")
    p.add_argument("--model", default="", help="model name (default: the server's first)")
    p.add_argument("--tokenizer", default="", help="local HF tokenizer (default: words)")
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        metavar="N",
        help="longest prompt + output (default: the server's max_model_len)",
    )
    p.add_argument(
        "--granularity",
        type=int,
        default=12,
        metavar="N",
        help="prefill points; decode contexts are N/3 (default 12)",
    )
    p.add_argument(
        "--max-kv-tokens",
        type=int,
        default=None,
        metavar="N",
        help="KV capacity in tokens (default: /kv/stats or vLLM's /metrics)",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=64,
        metavar="N",
        help="decode concurrency cap besides the KV capacity (default 64)",
    )
    p.add_argument(
        "--concurrency-points",
        type=int,
        default=4,
        metavar="N",
        help="concurrencies per decode context (default 4)",
    )
    p.add_argument(
        "--decode-osl",
        type=int,
        default=100,
        metavar="N",
        help="output tokens of a decode request (default 100)",
    )
    p.add_argument(
        "--point-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="a point taking longer is skipped and recorded (default 120 s)",
    )
    p.add_argument(
        "--prefill-requests",
        type=int,
        default=3,
        metavar="N",
        help="requests per prefill point, one at a time; their p50 is the point's TTFT "
        "(default 3; more where the engine's TTFT is noisy)",
    )
    p.add_argument(
        "--warmup-requests",
        type=int,
        default=3,
        metavar="N",
        help="uncounted requests before each mode's first point (default 3)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", metavar="DIR", help="write the profile directory here")
    p.add_argument("--json", default="", metavar="FILE", help="write the result JSON (- stdout)")
    add_plan_options(p, required=False)
    p.add_argument("--quiet", action="store_true", help="no live progress")
    add_wide_option(p)
    p.set_defaults(func=run)


def add_plan_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    g = p.add_argument_group("SLA")
    g.add_argument(
        "--ttft", type=float, default=None, required=required, metavar="MS", help="TTFT target (ms)"
    )
    g.add_argument(
        "--itl", type=float, default=None, required=required, metavar="MS", help="ITL target (ms)"
    )
    g.add_argument(
        "--request-rate",
        type=float,
        default=None,
        metavar="R",
        help="load in requests/s: replica counts (needs --isl and --osl)",
    )
    g.add_argument("--isl", type=int, default=None, metavar="N", help="the load's ISL")
    g.add_argument("--osl", type=int, default=None, metavar="N", help="the load's OSL")
    g.add_argument("--strict", action="store_true", help="exit 1 when the SLA is infeasible")


def prefill_table(report: ProfileReport, *, wide: bool = False) -> FitTable:
    table = FitTable(f"prefill: {report.name}", wide=wide, title_justify="left")
    for header in ("ISL", "TTFT avg (ms)", "TTFT p50 (ms)", "prefill tokens/s"):
        table.add_column(header)
    for p in report.prefill:
        table.add_row(
            f"{p.isl:,}", f"{p.ttft_avg_ms:.3g}", f"{p.ttft_p50_ms:.3g}", f"{p.tokens_per_s:,.0f}"
        )
    return table


def decode_table(report: ProfileReport, *, wide: bool = False) -> FitTable:
    table = FitTable(f"decode: {report.name}", wide=wide, title_justify="left")
    cols = ("ISL", "concurrency", "KV usage", "ITL avg (ms)", "ITL p50 (ms)", "output tokens/s")
    for i, header in enumerate(cols):
        table.add_column(header, drop=1 if i == 4 else 0)
    for p in report.decode:
        table.add_row(
            f"{p.isl:,}",
            str(p.concurrency),
            f"{100 * p.kv_usage:.1f}%",
            f"{p.itl_avg_ms:.3g}",
            f"{p.itl_p50_ms:.3g}",
            f"{p.tokens_per_s:,.0f}",
        )
    return table


def print_plan(console: Console, plan: Plan) -> None:
    for line in plan.lines():
        console.print(line, soft_wrap=True, markup=False)


def plan_from_args(
    reports: list[ProfileReport], args: argparse.Namespace, names: list[str] | None = None
) -> Plan:
    from kvferry.bench.profile.select import plan

    return plan(
        reports,
        ttft_ms=args.ttft,
        itl_ms=args.itl,
        names=names,
        request_rate=args.request_rate,
        isl=args.isl,
        osl=args.osl,
    )


def run(args: argparse.Namespace) -> int:
    from kvferry.bench.profile.candidates import parse_candidates, profile_candidates
    from kvferry.bench.profile.harness import ProfileProgress
    from kvferry.bench.profile.harness import run as run_profile
    from kvferry.bench.profile.options import ProfileOptions

    if (args.ttft is None) != (args.itl is None):
        raise ConfigError("give --ttft and --itl together (the SLA), or neither")
    candidates = parse_candidates(args.candidate)
    if candidates and args.url is not None:
        raise ConfigError(
            "give --url or --candidate, not both (a running engine is --candidate NAME=URL)"
        )
    if len(candidates) > 1 and args.json:
        raise ConfigError(
            "--json writes one profile; with several --candidate use --out DIR (DIR/NAME/"
            "profile.json per candidate)"
        )
    if not (args.startup_timeout > 0):
        raise ConfigError(f"--startup-timeout must be > 0 s, got {args.startup_timeout!r}")
    options = ProfileOptions(
        url=args.url or "http://127.0.0.1:8000",
        mode=args.mode,
        model=args.model,
        tokenizer=args.tokenizer,
        max_context=args.max_context,
        granularity=args.granularity,
        max_kv_tokens=args.max_kv_tokens,
        max_concurrency=args.max_concurrency,
        concurrency_points=args.concurrency_points,
        decode_osl=args.decode_osl,
        point_timeout_s=args.point_timeout,
        warmup_requests=args.warmup_requests,
        prefill_requests=args.prefill_requests,
        seed=args.seed,
    )
    options.validate()
    console = output_console()
    with live_progress(console, args.quiet or args.json == "-", eta=True) as bar:
        task = bar.add_task("profile", total=None, stats="")

        def progress(p: ProfileProgress) -> None:
            bar.update(task, total=p.total or None, completed=p.done, description=p.label)

        if candidates:
            reports = profile_candidates(
                options, candidates, progress, startup_timeout_s=args.startup_timeout
            )
        else:
            reports = [run_profile(options, progress)]
    command = shlex.join(["kvferry", *getattr(args, "argv", [])])
    for report in reports:
        report.command = command
    names = [c.name for c in candidates] if candidates else None
    plan = None
    if args.ttft is not None and any(r.prefill or r.decode for r in reports):
        plan = plan_from_args(reports, args, names)
    if args.json == "-":
        reports[0].write("-")
    else:
        for i, report in enumerate(reports):
            if names is not None:
                print(f"candidate {names[i]}: {report.candidate}")
            _print_profile(console, report, args.wide)
        if plan is not None:
            print_plan(console, plan)
    for i, report in enumerate(reports):
        if args.out:
            out = f"{args.out}/{names[i]}" if names is not None else args.out
            _write_out(report, out, quiet=args.json == "-")
    if args.json and args.json != "-":
        reports[0].write(args.json)
        print(f"json: {args.json}")
    failed = [r.aborted for r in reports if r.aborted]
    for reason in failed:
        print(f"error: {reason}", file=sys.stderr)
    if failed:
        return EXIT_FAILED
    if plan is not None and args.strict and not plan.feasible:
        return EXIT_FAILED
    return 0


def _print_profile(console: Console, report: ProfileReport, wide: bool) -> None:
    if report.prefill:
        print_table(console, prefill_table(report, wide=wide))
        fit = report.prefill_fit()
        if fit is not None:
            print(f"TTFT fit (ms): {fit.formula()}  R^2 {fit.r2:.4f}")
    if report.decode:
        print_table(console, decode_table(report, wide=wide))
    for s in report.skipped:
        print(f"skipped {s.mode} {s.label}: {s.reason}")
    for note in report.notes:
        print(f"note: {note}")
    print(
        f"{len(report.prefill)} prefill + {len(report.decode)} decode points in "
        f"{report.seconds:.1f} s"
    )


def _write_out(report: ProfileReport, out: str, *, quiet: bool) -> None:
    from kvferry.bench.profile.npz import write_profile

    paths = write_profile(report, out)
    try:
        from kvferry.bench.profile.plot import write_plots

        paths += write_plots(report, out)
    except MissingDependency as e:
        print(f"no plots: {e}")
    if not quiet:
        print(f"out: {out} ({', '.join(str(p.relative_to(out)) for p in paths)})")
