"""``kvferry workload NAME [options] [-o FILE]``: write a synthetic Mooncake-format trace.

Owns the flags of each workload, built from its options class in
:data:`kvferry.bench.workloads.WORKLOADS` (one ``--kebab-case`` flag per field), and where the
trace goes. Stdout carries the trace and nothing else, so ``kvferry workload ... > t.jsonl``
works; the one-line summary goes to stderr. No generation logic lives here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from kvferry.bench.workloads import (
    WORKLOADS,
    OptionInfo,
    Record,
    Tally,
    WorkloadSpec,
    write_jsonl,
)
from kvferry.errors import ConfigError

# Exit status of a writer whose reader closed the pipe (128 + SIGPIPE), as `cat | head` gives.
EXIT_BROKEN_PIPE = 141


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_option(parser: argparse._ActionsContainer, info: OptionInfo) -> None:
    parser.add_argument(
        _flag(info.name),
        dest=info.name,
        type=type(info.default),
        default=info.default,
        choices=info.choices or None,
        metavar=None if info.choices else info.metavar,
        help=f"{info.help} (default: %(default)s)",
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kvferry workload`` and one subcommand per workload."""
    workload = subparsers.add_parser(
        "workload",
        help="write a synthetic trace (prefix-ratio, multi-turn, agent, long-doc-qa)",
        description="Write a seeded synthetic request trace in the Mooncake format (JSONL: "
        "timestamp, input_length, output_length, hash_ids) to stdout or -o FILE, and a "
        "one-line summary to stderr. Without a workload name, list the workloads.",
    )
    workload.set_defaults(func=run_list)
    names = workload.add_subparsers(title="workloads", metavar="NAME")
    for spec in WORKLOADS.values():
        p = names.add_parser(
            spec.name,
            help=spec.summary,
            description=f"{spec.description} Writes JSONL to stdout (or -o FILE) and a "
            "one-line summary to stderr.",
        )
        infos = spec.option_infos()
        for info in infos:
            if not info.common:
                _add_option(p, info)
        trace = p.add_argument_group("trace options")
        for info in infos:
            if info.common:
                _add_option(trace, info)
        trace.add_argument(
            "-o",
            "--output",
            metavar="FILE",
            default="-",
            help="write the trace here (default: stdout)",
        )
        p.set_defaults(func=run_workload, spec=spec)


def run_list(args: argparse.Namespace) -> int:
    """``kvferry workload``: each workload's name and one-line description."""
    width = max(len(name) for name in WORKLOADS)
    for name, spec in WORKLOADS.items():
        print(f"{name:<{width}}  {spec.summary}")
    print("\nkvferry workload NAME --help shows a workload's options.")
    return 0


def run_workload(args: argparse.Namespace) -> int:
    """``kvferry workload NAME``: write the trace, then its summary to stderr."""
    spec: WorkloadSpec[Any] = args.spec
    # Validate before opening -o, so a bad flag does not truncate an existing file.
    options = spec.options(**{info.name: getattr(args, info.name) for info in spec.option_infos()})
    tally = Tally()
    records = tally.count(spec.generator(options))
    where = "stdout" if args.output == "-" else args.output
    if args.output == "-":
        try:
            _write(records, sys.stdout)
        except BrokenPipeError:
            # The reader (head, a closed pager) stopped early: end quietly, like cat. Point
            # stdout at /dev/null so the interpreter's final flush does not fail again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
    else:
        try:
            f = open(args.output, "w", encoding="utf-8")  # noqa: SIM115 (closed just below)
        except OSError as e:
            raise ConfigError(
                f"cannot write the trace to --output {args.output!r}: {e.strerror or e}"
            ) from e
        with f:
            _write(records, f)
    print(
        f"{spec.name}: {tally.requests} requests, {tally.blocks} blocks, {tally.distinct} "
        f"distinct ids, block-weighted ideal hit rate {tally.ideal_hit_rate:.4f} "
        f"({options.block_tokens} tokens per block, seed {options.seed}) -> {where}",
        file=sys.stderr,
    )
    return 0


def _write(records: Iterable[Record], file: TextIO) -> None:
    write_jsonl(records, file)
    file.flush()
