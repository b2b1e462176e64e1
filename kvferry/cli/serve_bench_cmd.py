"""``kvferry bench serve``: benchmark an OpenAI-compatible endpoint (aiperf-compatible output).

Parse flags -> :class:`~kvferry.bench.endpoint.options.ServeBenchOptions` ->
:func:`kvferry.bench.endpoint.harness.run` (with a live view) -> print the tables and write the
files. Nothing is measured or computed here."""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
from typing import Any

from rich.console import Console

from kvferry.bench.endpoint import export
from kvferry.bench.endpoint.harness import (
    ENDPOINTS,
    EndpointBenchError,
    LevelResult,
    ProgressUpdate,
    ServeBenchOptions,
    ServeBenchReport,
    load_source,
    run,
)
from kvferry.bench.endpoint.metrics import RECORD_METRICS, parse_goodput
from kvferry.bench.traces import BUNDLED, DEFAULT_BLOCK_TOKENS
from kvferry.cli.common import live_progress
from kvferry.cli.trace_cmd import print_problems
from kvferry.config.units import parse_duration
from kvferry.errors import ConfigError
from kvferry.tables import FitTable, add_wide_option, output_console, print_table

__all__ = [
    "add_serve_bench_parser",
    "default_run_name",
    "level_table",
    "options_from_args",
    "print_errors",
    "print_level",
    "print_sweep",
    "run_serve",
    "sweep_table",
]

TABLE_METRICS = (
    "time_to_first_token",
    "time_to_second_token",
    "inter_token_latency",
    "inter_chunk_latency",
    "request_latency",
    "output_token_throughput_per_user",
    "input_sequence_length",
    "output_sequence_length",
    "usage_prompt_cache_read_tokens",
)


def add_serve_bench_parser(kinds: Any) -> None:
    p = kinds.add_parser(
        "serve",
        help="benchmark an OpenAI-compatible endpoint: TTFT, ITL, throughput, goodput (aiperf "
        "definitions and export files)",
        description="Send streamed /v1/completions or /v1/chat/completions requests to a "
        "server at a sweep of concurrencies (closed loop) or request rates (open loop), or "
        "replay a Mooncake-format trace at its timestamps with its prefix sharing. Reports "
        "aiperf's per-request metrics and aggregates and writes aiperf-compatible files "
        "(profile_export.jsonl, profile_export_aiperf.json/.csv) into --artifact-dir.",
    )
    target = p.add_argument_group("target")
    target.add_argument(
        "--url", default="http://127.0.0.1:8000", help="server base URL (default %(default)s)"
    )
    target.add_argument(
        "--endpoint",
        "--endpoint-type",
        dest="endpoint",
        choices=list(ENDPOINTS),
        default="completions",
        help="completions (/v1/completions, default) or chat (/v1/chat/completions)",
    )
    target.add_argument("--model", default="", help="model name (default: the server's first)")
    target.add_argument(
        "--tokenizer",
        default="",
        metavar="DIR",
        help="local Hugging Face tokenizer to count tokens and size prompts (default: one "
        "token per word, as kvferry serve mock)",
    )
    target.add_argument(
        "--auth-token", default=None, metavar="TOKEN", help="sent as Authorization: Bearer"
    )
    target.add_argument(
        "--use-server-token-count",
        action="store_true",
        help="ISL/OSL from the server's usage instead of the client's counts",
    )
    target.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not send ignore_eos/min_tokens (outputs may end before --osl)",
    )
    target.add_argument(
        "--extra-body", default="", metavar="JSON", help="JSON object merged into every request"
    )
    target.add_argument(
        "--request-timeout",
        default="600",
        metavar="SECONDS",
        help="per request (default 600)",
    )
    load = p.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        default="",
        metavar="LIST",
        help="closed-loop levels, e.g. 1,2,4,8 (one run each); with --request-rate: the cap "
        "of requests in flight",
    )
    load.add_argument(
        "--request-rate", default="", metavar="LIST", help="open-loop levels, requests/s"
    )
    load.add_argument("--arrival", choices=["poisson", "constant"], default="poisson")
    load.add_argument(
        "--request-count",
        type=int,
        default=None,
        metavar="N",
        help="requests measured per level (default max(100, 10 x level); a trace: all rows)",
    )
    load.add_argument("--duration", default=None, metavar="SECONDS", help="seconds per level")
    load.add_argument(
        "--warmup-requests",
        "--warmup-request-count",
        dest="warmup_requests",
        type=int,
        default=0,
        metavar="N",
        help="requests sent before each level and not measured",
    )
    load.add_argument(
        "--workers", type=int, default=1, metavar="N", help="load-generating processes (default 1)"
    )
    load.add_argument("--seed", type=int, default=0, metavar="N", help="prompts, lengths, arrivals")
    inputs = p.add_argument_group("inputs")
    inputs.add_argument("--isl", type=int, default=550, metavar="TOKENS", help="input tokens (550)")
    inputs.add_argument("--isl-stddev", type=float, default=0.0, metavar="TOKENS")
    inputs.add_argument(
        "--osl", type=int, default=128, metavar="TOKENS", help="output tokens (128)"
    )
    inputs.add_argument("--osl-stddev", type=float, default=0.0, metavar="TOKENS")
    src = inputs.add_mutually_exclusive_group()
    src.add_argument(
        "--workload",
        default="",
        metavar="NAME[:K=V,...]",
        help="a generated trace: prefix-ratio, multi-turn, long-doc-qa, agent (kvferry workload)",
    )
    src.add_argument(
        "--input-file",
        default="",
        metavar="FILE",
        help='fixed prompts, aiperf single_turn JSONL: {"text": ..., "output_length": N} a '
        "line, sent in order (wrapping); with timestamps (ms) on every line, at their schedule",
    )
    src.add_argument(
        "--trace",
        default="",
        metavar="FILE",
        help="Mooncake-format trace (or a bundled one: "
        f"{', '.join(k for k in BUNDLED if 'fig' not in k)}); replayed at its timestamps",
    )
    inputs.add_argument(
        "--speedup",
        type=float,
        default=1.0,
        metavar="X",
        help="trace timestamps are divided by this",
    )
    inputs.add_argument(
        "--trace-block-size",
        "--block-tokens",
        dest="trace_block_size",
        type=int,
        default=DEFAULT_BLOCK_TOKENS,
        metavar="TOKENS",
        help=f"tokens per hash_id (default {DEFAULT_BLOCK_TOKENS})",
    )
    out = p.add_argument_group("results")
    out.add_argument(
        "--goodput",
        default="",
        metavar="SLOS",
        help="e.g. 'ttft:500 itl:50' (ms): requests meeting every SLO count as good",
    )
    out.add_argument(
        "--artifact-dir", default="", metavar="DIR", help="default ./artifacts/<run name>"
    )
    out.add_argument("--run-name", default="", metavar="NAME", help="the artifact dir's name")
    out.add_argument("--json", default="", metavar="FILE", help="write the summary as JSON")
    out.add_argument("--plot", action="store_true", help="write PNG plots (needs matplotlib)")
    out.add_argument("--quiet", action="store_true", help="no live view")
    add_wide_option(out)
    p.set_defaults(func=run_serve)


def _list(text: str, flag: str, kind: type[int] | type[float]) -> tuple[Any, ...]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if text.strip() and not items:
        raise ConfigError(f"{flag} is empty; give a comma-separated list, e.g. 1,2,4")
    values: list[Any] = []
    for item in items:
        try:
            value = kind(item)
        except ValueError:
            value = None
        if value is None or (kind is int and value < 1) or (kind is float and not value > 0):
            what = "whole numbers >= 1" if kind is int else "numbers > 0"
            raise ConfigError(f"{flag} values must be {what}, got {item!r} in {text!r}")
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"{flag} values must be finite, got {item!r}")
        values.append(value)
    return tuple(values)


def _duration(text: str | None, flag: str) -> float | None:
    if text is None:
        return None
    try:
        value = parse_duration(text)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from e
    if value <= 0:
        raise ConfigError(f"{flag} must be more than 0 seconds, got {text!r}")
    return value


def options_from_args(args: argparse.Namespace) -> ServeBenchOptions:
    """The options of ``args`` (validated).

    Raises:
        ConfigError: a bad flag.
    """
    extra: dict[str, Any] = {}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except ValueError as e:
            raise ConfigError(f"--extra-body is not valid JSON: {e}") from e
        except RecursionError:
            raise ConfigError(
                "--extra-body is nested too deeply; give a flat JSON object"
            ) from None
        if not isinstance(extra, dict):
            raise ConfigError(f"--extra-body must be a JSON object, got {args.extra_body!r}")
    options = ServeBenchOptions(
        url=args.url,
        endpoint=args.endpoint,
        model=args.model,
        tokenizer=args.tokenizer,
        auth_token=args.auth_token,
        use_server_token_count=args.use_server_token_count,
        concurrency=_list(args.concurrency, "--concurrency", int),
        request_rate=_list(args.request_rate, "--request-rate", float),
        arrival=args.arrival,
        seed=args.seed,
        request_count=args.request_count,
        duration_s=_duration(args.duration, "--duration"),
        warmup_requests=args.warmup_requests,
        isl=args.isl,
        isl_stddev=args.isl_stddev,
        osl=args.osl,
        osl_stddev=args.osl_stddev,
        workload=args.workload,
        trace=args.trace,
        input_file=args.input_file,
        speedup=args.speedup,
        trace_block_size=args.trace_block_size,
        goodput=parse_goodput(args.goodput) if args.goodput.strip() else {},
        ignore_eos=not args.no_ignore_eos,
        extra_body=extra,
        workers=args.workers,
        request_timeout_s=_duration(args.request_timeout, "--request-timeout") or 600.0,
    )
    options.validate()
    return options


def default_run_name(report: ServeBenchReport) -> str:
    """``<model>-openai-<endpoint>-<levels>``, as aiperf names its artifact directories."""
    levels = [r.level for r in report.cases] or report.options.levels()
    kind = levels[0].kind
    if kind == "fixed_schedule":
        load = "fixed_schedule"
    else:
        load = kind.replace("_", "") + "-".join(f"{lv.value:g}" for lv in levels)
    name = f"{report.model}-openai-{report.options.endpoint}-{load}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


class _Live:
    """The live view: one progress bar per level, with running p50 TTFT/ITL."""

    def __init__(self, console: Console, quiet: bool) -> None:
        self.progress = live_progress(console, quiet)
        self.tasks: dict[str, Any] = {}

    def __call__(self, update: ProgressUpdate) -> None:
        name = update.level.label
        task = self.tasks.get(name)
        if task is None:
            task = self.tasks[name] = self.progress.add_task(name, total=update.total, stats="")
        if update.phase == "warmup":
            self.progress.update(task, stats="warming up")
            return
        parts = []
        if update.ttft_p50_ms is not None:
            parts.append(f"TTFT p50 {update.ttft_p50_ms:,.1f} ms")
        if update.itl_p50_ms is not None:
            parts.append(f"ITL p50 {update.itl_p50_ms:,.2f} ms")
        if update.elapsed_s > 0:
            parts.append(f"{update.done / update.elapsed_s:,.0f} req/s")
        if update.errors:
            parts.append(f"[red]{update.errors} errors[/]")
        if update.total is None and update.duration_s:
            parts.append(f"{min(update.elapsed_s, update.duration_s):.0f}/{update.duration_s:g} s")
        self.progress.update(task, completed=update.done, stats="  ".join(parts))


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


SWEEP_DROP = {
    "tok/s/user": 6,
    "latency p50": 5,
    "requests": 4,
    "errors": 3,  # failed requests are also printed in red under the table
    "ITL p50": 2,
    "TTFT p50": 1,
}
"""Columns of the sweep table a narrow terminal leaves out, the highest first."""

LEVEL_DROP = {"std": 3, "min": 2, "max": 2, "p90": 1}
"""Columns of the per-level table a narrow terminal leaves out, the highest first."""


def sweep_table(report: ServeBenchReport, *, wide: bool = False) -> FitTable:
    """One row per level: the headline figures."""
    goodput = bool(report.options.goodput)
    table = FitTable(f"kvferry bench serve: {report.model} at {report.url}", wide=wide)
    for name in (
        "level",
        "requests",
        "errors",
        "req/s",
        "out tok/s",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "latency p50",
        "tok/s/user",
    ):
        table.add_column(
            name, justify="left" if name == "level" else "right", drop=SWEEP_DROP.get(name, 0)
        )
    if goodput:
        table.add_column("goodput")
    for result in report.cases:
        m = result.metrics
        row = [
            result.level.label,
            f"{m.request_count:,}",
            f"{m.error_count:,}",
            _f(m.value("request_throughput")),
            _f(m.value("output_token_throughput"), 1),
            _f(m.value("time_to_first_token", "p50")),
            _f(m.value("time_to_first_token", "p99")),
            _f(m.value("inter_token_latency", "p50"), 3),
            _f(m.value("inter_token_latency", "p99"), 3),
            _f(m.value("request_latency", "p50")),
            _f(m.value("output_token_throughput_per_user", "p50"), 1),
        ]
        if goodput:
            row.append(_f(m.value("goodput")))
        table.add_row(*row)
    return table


def print_sweep(console: Console, report: ServeBenchReport, *, wide: bool = False) -> None:
    """The sweep table (:func:`sweep_table`) and what its figures mean."""
    goodput = bool(report.options.goodput)
    print_table(console, sweep_table(report, wide=wide))
    console.print(
        f"{report.source}; times in ms; ITL = (latency - TTFT) / (OSL - 1); tok/s/user = 1/ITL "
        "(aiperf's definitions)" + ("; goodput in good requests/s" if goodput else "")
    )


def level_table(result: LevelResult, *, wide: bool = False) -> FitTable:
    """aiperf's console table for one level: a row per metric, its statistics."""
    m = result.metrics
    table = FitTable(f"{result.level.label}: per-request metrics", wide=wide)
    table.add_column("Metric", text=True)
    for name in ("avg", "min", "max", "p99", "p90", "p50", "std"):
        table.add_column(name, drop=LEVEL_DROP.get(name, 0))
    for tag in TABLE_METRICS:
        metric = m.metrics.get(tag)
        if metric is None:
            continue
        info = RECORD_METRICS[tag]
        row = [f"{info.header} ({info.unit})"]
        row += [_f(metric.avg), _f(metric.min), _f(metric.max)]
        row += [_f(metric.p(99)), _f(metric.p(90)), _f(metric.p(50)), _f(metric.std)]
        table.add_row(*row)
    return table


def print_level(console: Console, result: LevelResult, *, wide: bool = False) -> None:
    """The level's table (:func:`level_table`) and its totals in a line."""
    m = result.metrics
    print_table(console, level_table(result, wide=wide))
    line = (
        f"{m.request_count:,} requests ({m.error_count:,} errors) in {m.duration_s:,.2f} s: "
        f"{_f(m.value('request_throughput'))} requests/s, "
        f"{_f(m.value('output_token_throughput'))} output tokens/s"
    )
    if "goodput" in m.metrics:
        good = int(m.value("good_request_count") or 0)
        line += f", goodput {_f(m.value('goodput'))} requests/s ({good:,} good)"
    console.print(line)


def print_errors(console: Console, report: ServeBenchReport) -> None:
    for result in report.cases:
        for error, count in result.metrics.errors[:5]:
            code = f"HTTP {error.code} " if error.code is not None else ""
            console.print(
                f"[red]{result.level.label}: {count} x {code}{error.type}: {error.message}[/]",
                highlight=False,
            )
        if result.warmup_errors:
            console.print(
                f"[yellow]{result.level.label}: {result.warmup_errors} warm-up request(s) failed[/]"
            )


def run_serve(args: argparse.Namespace) -> int:
    console = output_console()
    err = Console(stderr=True, highlight=False)
    options = options_from_args(args)
    if args.plot:
        export.require_matplotlib()  # fail before the run, not after it
    source, what, trace = load_source(options)
    if trace is not None:
        print_problems(err, trace)
    live = _Live(err, args.quiet)
    with live.progress:
        report = run(options, live, source=(source, what))
    report.command = shlex.join(["kvferry", *getattr(args, "argv", [])])
    print_sweep(console, report, wide=args.wide)
    if len(report.cases) == 1:
        print_level(console, report.cases[0], wide=args.wide)
    print_errors(console, report)
    directory = args.artifact_dir or f"artifacts/{args.run_name or default_run_name(report)}"
    export.write_artifacts(report, directory)
    console.print(f"artifacts: {directory}")
    if args.plot:
        for path in export.plot_sweep(report, directory):
            console.print(f"plot: {path}")
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(export.summary_json(report), f, indent=2)
        except OSError as e:
            raise EndpointBenchError(f"cannot write {args.json!r}: {e.strerror or e}") from e
    if all(r.metrics.request_count == 0 for r in report.cases):
        first = next((r.metrics.errors[0] for r in report.cases if r.metrics.errors), None)
        cause = "" if first is None else f"; most frequent: {first[0].type}: {first[0].message}"
        raise EndpointBenchError(f"every request failed{cause}")
    return 0
