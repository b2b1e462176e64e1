"""``kvferry tune transfer|store|cache``: tuned config files from measurements on this machine.

Owns the flags, the progress line per measurement, the tables (each step: the change, what it
was measured against, the per-round ratios, adopted or not; the before/after of the final
interleaved run; the cache choices per policy) and writing ``-o tuned.yaml`` (a config file
``--config`` reads) and ``--json``. The searches are :mod:`kvferry.bench.tune`. When nothing
beats the defaults beyond noise, it says so and the file holds the defaults of the knobs it
tried.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import Console
from rich.status import Status

from kvferry.config.units import format_size, format_size_approx, parse_size
from kvferry.errors import ConfigError
from kvferry.tables import FitTable, output_console, print_table

if TYPE_CHECKING:
    from kvferry.bench.tune.report import TuneReport
    from kvferry.bench.tune.search import Step


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kvferry tune`` and its ``transfer`` and ``cache`` subcommands."""
    p = subparsers.add_parser(
        "tune",
        help="search knobs by same-run measurements and write a tuned config file",
        description="Search the knobs of a part of kvferry on this machine. Every candidate "
        "is measured against the best so far in alternating rounds of one run and adopted only "
        "when it wins every round by a margin; the result is a config file for --config.",
    )
    sub = p.add_subparsers(dest="tune_what", required=True, metavar="transfer|store|cache")

    t = sub.add_parser("transfer", help="the transfer engine's knobs for one workload")
    t.add_argument("--block-size", type=_size, default=1 << 20, metavar="SIZE")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--transport", default="tcp", choices=("tcp", "shm"))
    t.add_argument("--op", default="read", choices=("read", "write"))
    t.add_argument("--objective", default="throughput", help="throughput or latency")
    t.add_argument("--budget", type=float, default=120.0, metavar="SECONDS")
    t.add_argument("--rounds", type=int, default=3, help="alternating rounds per candidate (3)")
    t.add_argument("--duration", type=float, default=1.0, metavar="SECONDS")
    t.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="search only these knobs and values (repeatable); default: the built-in space",
    )
    t.add_argument("-o", "--output", default="", metavar="FILE", help="write the tuned YAML")
    t.add_argument("--json", default="", metavar="FILE")
    t.set_defaults(func=run_transfer)

    st = sub.add_parser("store", help="the store's knobs for one store-bench workload")
    st.add_argument("--backend", default="cpu", help="cpu, disk or server")
    st.add_argument("--op", default="batch-get")
    st.add_argument("--value-size", type=_size, default=64 << 10, metavar="SIZE")
    st.add_argument("--batch-size", type=int, default=32)
    st.add_argument("--num-keys", type=int, default=2048)
    st.add_argument("--capacity", type=_size, default=256 << 20, metavar="SIZE")
    st.add_argument(
        "--overfill",
        action="store_true",
        help="more keys than fit: the store evicts as it runs, and the eviction watermark and "
        "ratio are searched too",
    )
    st.add_argument("--objective", default="throughput", help="throughput or latency")
    st.add_argument("--budget", type=float, default=120.0, metavar="SECONDS")
    st.add_argument("--rounds", type=int, default=3, help="alternating pairs per candidate (3)")
    st.add_argument("--duration", type=float, default=1.0, metavar="SECONDS")
    st.add_argument("--knob", action="append", default=[], metavar="KEY=V1,V2")
    st.add_argument("-o", "--output", default="", metavar="FILE", help="write the tuned YAML")
    st.add_argument("--json", default="", metavar="FILE")
    st.set_defaults(func=run_store)

    c = sub.add_parser("cache", help="capacity and eviction policy for a trace")
    c.add_argument("--trace", default=None)
    c.add_argument("--workload", default=None)
    c.add_argument("--model-kv", default=None, metavar="LAYERS,KV_HEADS,HEAD_DIM,DTYPE")
    c.add_argument("--kv-bytes-per-token", type=int, default=None)
    c.add_argument("--target-hit-rate", type=float, default=None)
    c.add_argument("--memory-budget", type=_size, default=None, metavar="SIZE")
    c.add_argument("--prefill-tokens-per-s", type=float, default=None)
    c.add_argument("--policy", default="lru,lfu,fifo,length-aware", metavar="LIST")
    c.add_argument("-o", "--output", default="", metavar="FILE", help="write the tuned YAML")
    c.add_argument("--json", default="", metavar="FILE")
    c.set_defaults(func=run_cache)


def _knobs(given: list[str]) -> dict[str, tuple[str, ...]] | None:
    if not given:
        return None
    out = {}
    for text in given:
        key, sep, values = text.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--knob {text!r} is not KEY=V1,V2 (e.g. transfer.workers=2,4)")
        out[key.strip()] = tuple(v.strip() for v in values.split(",") if v.strip())
    return out


def _write_yaml(path: str, overrides: Mapping[str, Any], header: str) -> None:
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = value
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(
        nested, sort_keys=True
    )
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise ConfigError(f"-o {path!r}: cannot write: {e.strerror}") from e


def _write_report(args: argparse.Namespace, report: TuneReport) -> None:
    """``--json``: the run as a lab result (tool ``tune``), which ``kvferry report`` reads."""
    if not args.json:
        return
    report.command = shlex.join(["kvferry", *getattr(args, "argv", [])])
    report.write(args.json)
    output_console().print(f"json: {args.json}")


def _reporter(status: Status, metric: str) -> Callable[[Step, int, int], None]:
    """The live line of a search: which candidate, its ratio, adopted or not."""

    def on_step(step: Step, index: int, total: int) -> None:
        status.update(
            f"{index + 1}/{total}: {step.knob}={step.value} {metric} x{step.median:.3f}"
            + (" adopted" if step.adopted else "")
        )

    return on_step


def _search(
    args: argparse.Namespace,
    what: str,
    metric: str,
    run: Callable[[Callable[[Step, int, int], None]], TuneReport],
    tried: list[str],
) -> int:
    """Run a search with a live line, then print and write what it found (:func:`_finish`)."""
    err = Console(stderr=True, highlight=False)
    with err.status(f"tuning {what}") as status:
        report = run(_reporter(status, metric))
    report.command = shlex.join(["kvferry", *getattr(args, "argv", [])])
    _finish(output_console(), args, report, tried)
    return 0


def _finish(
    console: Console, args: argparse.Namespace, report: TuneReport, tried: list[str]
) -> None:
    """Every step as a table row, the final run against the defaults, the caveats, ``-o`` YAML
    (the tuned overrides when the final run confirmed them, else the defaults of what was
    tried) and ``--json`` (the report)."""
    import statistics

    from kvferry.config.models import KvferryConfig

    metric, final = report.metric, report.final_rounds
    table = FitTable(
        f"kvferry tune {report.what}: {report.workload}, {report.objective} ({metric})"
    )
    table.add_column("Knob", justify="left")
    table.add_column("Value", justify="left")
    table.add_column("Against", justify="left", drop=1)
    table.add_column(f"{metric} ratio")
    table.add_column("Rounds")
    table.add_column("Adopted", justify="left")
    for step in report.steps:
        against = ", ".join(f"{k}={v}" for k, v in step.against.items()) or "defaults"
        rounds = ", ".join(f"{r:.3f}" for r in step.ratios)
        table.add_row(step.knob, step.value, against, f"{step.median:.3f}", rounds,
                      "yes" if step.adopted else "no")  # fmt: skip
    print_table(console, table)
    if report.untried:
        untried = ", ".join(f"{k}={v}" for k, v in report.untried)
        console.print(f"budget spent ({report.search_seconds:.0f} s): not measured: {untried}")
    if final:
        picked = ", ".join(f"{k}={v}" for k, v in report.picked.items())
        console.print(
            f"search picked {picked}; against the defaults, {len(final)} alternating rounds: "
            f"{metric} x{statistics.median(final):.3f} (rounds {min(final):.3f}-{max(final):.3f})"
        )
    if report.tuned:
        written: dict[str, Any] = dict(report.tuned)
        header = f"{report.command}\ntuned vs defaults, same run: {metric} "
        header += f"x{statistics.median(final):.3f}"
        console.print("tuned: " + ", ".join(f"{k}={v}" for k, v in report.tuned.items()))
    else:
        console.print(
            "the pick did not beat the defaults in every final round: keep the defaults"
            if final
            else "nothing beat the defaults beyond noise: keep them"
        )
        defaults = KvferryConfig().model_dump(mode="json")
        written = {k: defaults[k.split(".")[0]][k.split(".")[1]] for k in tried}
        header = f"{report.command}\nnothing beat the defaults beyond noise (defaults below)"
    if args.output:
        _write_yaml(args.output, written, header)
        console.print(f"wrote {args.output}")
    for caveat in report.caveats:
        console.print(f"caveat: {caveat}")
    if args.json:
        report.write(args.json)
        console.print(f"json: {args.json}")


def run_transfer(args: argparse.Namespace) -> int:
    from kvferry.bench.tune.report import from_transfer
    from kvferry.bench.tune.transfer import SPACE, TransferTuneOptions, tune

    space = _knobs(args.knob)
    options = TransferTuneOptions(
        block_size=args.block_size,
        batch_size=args.batch_size,
        threads=args.threads,
        transport=args.transport,
        op=args.op,
        objective=args.objective,
        budget_s=args.budget,
        rounds=args.rounds,
        duration=args.duration,
        space=space if space is not None else dict(SPACE),
    )
    return _search(
        args,
        f"transfer for {format_size(options.block_size)} x {options.batch_size} over "
        f"{options.transport}",
        "BW" if options.higher_better else "P99",
        lambda on_step: from_transfer(tune(options, on_step)),
        list(options.space),
    )


def run_store(args: argparse.Namespace) -> int:
    from kvferry.bench.store import StoreBenchOptions
    from kvferry.bench.tune.report import from_store
    from kvferry.bench.tune.store import StoreTuneOptions, tune

    bench = StoreBenchOptions(
        backend=args.backend,
        op=args.op,
        value_size=args.value_size,
        batch_size=args.batch_size,
        num_keys=args.num_keys,
        duration=args.duration,
        warmup=min(0.3, args.duration),
        overfill=args.overfill,
    )
    options = StoreTuneOptions(
        bench=bench,
        capacity=args.capacity,
        objective=args.objective,
        budget_s=args.budget,
        rounds=args.rounds,
        space=_knobs(args.knob),
    )
    return _search(
        args,
        f"the store for {bench.backend} {bench.op}",
        "ops/s" if options.higher_better else "P99",
        lambda on_step: from_store(tune(options, on_step)),
        list(options.knobs),
    )


def run_cache(args: argparse.Namespace) -> int:
    from kvferry.bench.tune.cache import CacheTuneOptions, tune
    from kvferry.bench.tune.report import from_cache

    options = CacheTuneOptions(
        trace=args.trace,
        workload=args.workload,
        model_kv=args.model_kv,
        kv_bytes_per_token=args.kv_bytes_per_token,
        target_hit_rate=args.target_hit_rate,
        memory_budget=args.memory_budget,
        prefill_tokens_per_s=args.prefill_tokens_per_s,
        policies=tuple(p.strip() for p in args.policy.split(",") if p.strip()),
    )
    console = output_console()
    err = Console(stderr=True, highlight=False)
    with err.status("simulating the trace per policy"):
        result = tune(options)
    question = (
        f"smallest capacity reaching a block hit rate of {options.target_hit_rate:g}"
        if options.target_hit_rate is not None
        else f"best policy within {format_size(options.memory_budget or 0)}"
    )
    table = FitTable(f"kvferry tune cache: {question}")
    table.add_column("Policy", justify="left")
    table.add_column("Capacity (blocks)")
    table.add_column("Capacity")
    table.add_column("Block hit rate")
    table.add_column("Prefill s saved")
    table.add_column("s saved / GB")
    for c in result.choices:
        table.add_row(
            c.policy,
            "unreachable" if c.capacity_blocks is None else f"{c.capacity_blocks:,}",
            "-" if c.capacity_bytes is None else format_size_approx(c.capacity_bytes),
            f"{c.block_hit_rate:.4f}",
            "-" if c.prefill_seconds_saved is None else f"{c.prefill_seconds_saved:,.1f}",
            "-" if c.seconds_saved_per_gb is None else f"{c.seconds_saved_per_gb:.3f}",
        )
    print_table(console, table)
    best = result.best
    if best is None or best.capacity_blocks is None:
        console.print("no policy reaches the target on this trace: lower --target-hit-rate")
        return 0
    size = "" if best.capacity_bytes is None else f" ({format_size_approx(best.capacity_bytes)})"
    console.print(f"choice: {best.policy} at {best.capacity_blocks:,} blocks{size}")
    overrides: dict[str, Any] = {"store.eviction_policy": best.policy}
    if best.capacity_bytes is not None:
        overrides["cpu.capacity"] = format_size(best.capacity_bytes)
    if args.output:
        _write_yaml(args.output, overrides, f"kvferry tune cache: {question}")
        console.print(f"wrote {args.output}")
    _write_report(args, from_cache(result, question))
    return 0
