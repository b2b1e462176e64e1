"""``kvferry report RUN [RUN ...]``: the benches' results as one HTML page (and Markdown).

Owns the command's flags and what it prints: where it wrote, then the headline numbers, then
(with ``--compare``) the count of each verdict and each regression on one line. The report
itself is built by :func:`kvferry.report.build.build_from` and drawn by
:mod:`kvferry.report.html` and :mod:`kvferry.report.markdown`; the comparison is
:func:`kvferry.report.compare.compare_results`, imported only when ``--compare`` is given. Bad
input (a missing file, another tool's JSON, a result of a newer schema) is a
:class:`~kvferry.bench.result.ResultError`: one ``error:`` line and exit status 2 at the CLI's
boundary. Exit status 1: ``--fail-on-regression`` and a case worse beyond noise (after the
report is written).
"""

from __future__ import annotations

import argparse
import math

from kvferry.errors import ConfigError
from kvferry.report.compare import DEFAULT_BAND

EXIT_REGRESSION = 1


def _band(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value < 1):
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), e.g. 0.05, got {text!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kvferry report``."""
    p = subparsers.add_parser(
        "report",
        help="build one HTML page (and Markdown) from bench results",
        description="Read result files or run directories of any kvferry bench (transfer, "
        "store, hitrate, serve, router, doctor, profile, plan) and write one self-contained HTML "
        "page: the setup, headline metrics with their definitions, a section per bench with "
        "its tables and figures, and findings with the evidence they follow from. In a "
        "directory, JSON files that are not kvferry results are skipped and listed. --compare "
        "sets a base run beside them, case by case, with a verdict per case.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="a result file or a run directory")
    p.add_argument(
        "-o",
        "--output",
        default="report.html",
        metavar="FILE",
        help="the HTML page to write (default: report.html)",
    )
    p.add_argument(
        "--md",
        default="",
        metavar="FILE",
        help="also write the report as Markdown, its figures in FILE_STEM_files/",
    )
    p.add_argument("--title", default=None, help="the page's title")
    p.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="BASE_RUN",
        help="base results (files or directories) to compare the RUNs against",
    )
    p.add_argument(
        "--fail-on-regression",
        action="store_true",
        help="with --compare: exit 1 when a case is worse beyond noise",
    )
    p.add_argument(
        "--noise-band",
        type=_band,
        default=DEFAULT_BAND,
        metavar="FRACTION",
        help="with --compare: the noise band where a case has no per-round spread (default "
        f"{DEFAULT_BAND:g}, i.e. +-{round(DEFAULT_BAND * 100)}%%, from A/A runs on a shared "
        "2-core VM; record yours with benchmarks/aa_noise.py)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvferry.report.build import add_section, build_from
    from kvferry.report.html import write_html
    from kvferry.report.inputs import collect
    from kvferry.report.markdown import write_markdown

    if args.fail_on_regression and not args.compare:
        raise ConfigError("--fail-on-regression needs --compare BASE_RUN")
    head = collect(args.runs)
    base = collect(args.compare) if args.compare else None
    doc = build_from(head, title=args.title)
    comparison = None
    if base is not None:
        from kvferry.report.compare import compare_results

        comparison = compare_results(
            [r.result for r in base.results],
            [r.result for r in head.results],
            default_band=args.noise_band,
            base_sources=[str(r.path) for r in base.results],
            head_sources=[str(r.path) for r in head.results],
        )
        add_section(doc, comparison.section())
    write_html(doc, args.output)
    print(f"report: {args.output}")
    if args.md:
        write_markdown(doc, args.md)
        print(f"markdown: {args.md}")
    for label, value in doc.headline:
        print(f"  {label}: {value}")
    if comparison is not None:
        counts = comparison.counts()
        told = ", ".join(f"{n} {verdict}" for verdict, n in counts.items() if n)
        print(f"compare: {len(comparison.verdicts)} metric(s) of matched cases: {told or 'none'}")
        regressions = comparison.regressions()
        for r in regressions:
            print(f"regression: {r.evidence}")
        if regressions and args.fail_on_regression:
            return EXIT_REGRESSION
    return 0
