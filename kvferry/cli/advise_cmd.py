"""``kvferry advise RESULT [RESULT ...] [--verify]``: what the results say to change, and, with
``--verify``, each suggested change measured here before it is recommended.

Owns the command's flags and what it prints: one row per finding (rule, severity, what, the
evidence, the changes worth measuring), then with ``--verify`` one row per measured change
(kept / dropped / not measured, the ratio, its rounds, why) and a summary line. The rules are
:mod:`kvferry.report.findings` (the same ones ``kvferry report`` shows); measuring is
:func:`kvferry.report.advise.verify`. ``--json FILE`` writes every finding and measurement.
Exit status 0 whatever the advice; 2 with one ``error:`` line on bad input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.status import Status

from kvferry.errors import ConfigError
from kvferry.tables import FitTable, output_console, print_table


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kvferry advise``."""
    p = subparsers.add_parser(
        "advise",
        help="what the results say to change (and --verify: measured here first)",
        description="Run the report's rules over result files or run directories of any "
        "kvferry bench and print each finding with its evidence and the config changes worth "
        "measuring. --verify measures each change against the config the result ran with, in "
        "alternating rounds on this machine, and keeps only the changes that helped in every "
        "round.",
    )
    p.add_argument("runs", nargs="+", metavar="RESULT", help="a result file or a run directory")
    p.add_argument(
        "--verify", action="store_true", help="measure every suggested change before advising it"
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="with --verify: alternating rounds per change (3)"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="with --verify: seconds per bench case and round (1)",
    )
    p.add_argument("--only", default="", metavar="RULE,...", help="only these rules (prefixes)")
    p.add_argument("--json", default="", metavar="FILE", help="write the advice as JSON")
    p.add_argument("--wide", action="store_true", help="print every column")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvferry.report.advise import KEPT, NOT_MEASURED, advise, verify
    from kvferry.report.inputs import collect

    if args.rounds < 1:
        raise ConfigError(f"--rounds {args.rounds} is invalid: must be at least 1")
    if not args.duration > 0:
        raise ConfigError(f"--duration {args.duration} is invalid: must be above 0 seconds")
    loaded = collect(args.runs)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    advice = [
        a for a in advise(loaded.results) if not wanted or a.finding.rule.startswith(tuple(wanted))
    ]
    console = output_console()
    err = Console(stderr=True, highlight=False)
    console.print(f"kvferry advise: {len(advice)} finding(s) over {len(loaded.results)} result(s)")
    for a in advice:
        f = a.finding
        head = f"{f.rule or '-'}: {f.title}"
        console.print(f"\n[bold]{f.severity.upper()}[/] {escape(head)}", markup=True)
        for label, text in (("evidence", f.evidence), ("try", f.recommendation)):
            if text:
                console.print(f"  {label}: {text}", markup=False, highlight=False)
        for c in f.candidates:
            console.print(f"  measure {c.label}: {c.command}", markup=False, highlight=False)
    if args.verify:
        results = {str(i.path): i.result for i in loaded.results}
        measured = 0
        for a in advice:
            for c in a.finding.candidates:
                measured += 1
                with err.status(f"measuring {c.label} ({a.finding.rule})") as status:

                    def tell(what: str, status: Status = status) -> None:
                        status.update(f"measuring {what}")

                    a.measured.append(
                        verify(
                            c,
                            results[a.source],
                            rounds=args.rounds,
                            duration=args.duration,
                            progress=tell,
                        )
                    )
        done = FitTable(f"measured on this machine: {measured} change(s)", wide=args.wide)
        done.add_column("Rule", justify="left")
        done.add_column("Change", justify="left")
        done.add_column("Verdict", justify="left")
        done.add_column("Ratio")
        done.add_column("Rounds", drop=1)
        done.add_column("Why", text=True)
        for a in advice:
            for m in a.measured:
                rounds = ", ".join(f"{r:.3f}" for r in m.rounds) or "-"
                ratio = "-" if m.ratio is None else f"{m.ratio:.3f}"
                done.add_row(a.finding.rule, m.candidate.label, m.verdict, ratio, rounds, m.reason)
        print_table(console, done)
        every = [m for a in advice for m in a.measured]
        kept = [m for m in every if m.verdict == KEPT]
        unmeasured = sum(m.verdict == NOT_MEASURED for m in every)
        console.print(
            f"advise: {len(kept)} of {len(every)} change(s) helped here"
            + (f" ({unmeasured} could not be measured)" if unmeasured else "")
            + (": " + "; ".join(m.candidate.label for m in kept) if kept else ": keep the config")
        )
    if args.json:
        out = Path(args.json)
        try:
            out.write_text(json.dumps({"advice": [a.to_json() for a in advice]}, indent=2) + "\n")
        except OSError as e:
            raise ConfigError(f"--json {args.json!r}: cannot write: {e.strerror}") from e
        console.print(f"json: {out}")
    return 0
