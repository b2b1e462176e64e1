"""``kvferry monitor URL | --store-server HOST:PORT``: a live view of a running store's metrics.

Parses the options, opens the source (:func:`kvferry.telemetry.sources.open_source`), samples it
with :class:`~kvferry.telemetry.monitor.StatsMonitor` every ``--interval`` and shows each report:
a rich Live table on a terminal, one table per sample otherwise (a pipe, a log file), and one
JSON object per sample in ``--json-lines FILE`` (``-``: stdout, no table), flushed line by line.

A source that cannot be read at the first sample is an error (one line, exit 2); one that stops
answering later gets a warning row (and a JSON line with ``error``) per failed sample and is
tried again at the next interval, until ``--count`` samples were taken or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import IO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from kvferry.cli.common import add_config_options, load_from_args
from kvferry.config.units import parse_duration, parse_size
from kvferry.errors import ConfigError, KvferryError
from kvferry.telemetry.monitor import Sample, StatsMonitor, Thresholds, format_sample
from kvferry.telemetry.sources import open_source


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "monitor",
        help="live view of a running store server's, router's or vLLM server's kvferry metrics",
        description="Sample a running store server (--store-server HOST:PORT, its STATS call) "
        "or a Prometheus endpoint (URL: a store server's --metrics-port, the router's or a vLLM "
        "server's /metrics) every --interval and show per interval and cumulative hit rate "
        "(block-weighted), load/save GB/s per tier, pool usage, evictions and errors, with "
        "warnings at thresholds.",
    )
    p.add_argument(
        "url",
        nargs="?",
        metavar="URL",
        help="Prometheus endpoint, e.g. http://127.0.0.1:9100/metrics",
    )
    p.add_argument("--store-server", metavar="HOST:PORT", help="a store server (kvferry protocol)")
    p.add_argument(
        "--auth-token",
        metavar="TOKEN",
        help="the source's token (default: server.auth_token of the config for --store-server, "
        "listen.auth_token for a URL)",
    )
    p.add_argument(
        "--interval", default="1s", help="time between samples: 1s, 500ms, 2 (default 1s)"
    )
    p.add_argument("--count", type=str, default=None, help="stop after N samples (default: never)")
    p.add_argument("--once", action="store_true", help="one sample (totals so far), then exit")
    p.add_argument(
        "--json-lines",
        metavar="FILE",
        help="append one JSON object per sample to FILE, flushed each line ('-': stdout only)",
    )
    p.add_argument("--timeout", default="5s", help="seconds to wait for the source (default 5s)")
    p.add_argument("--warn-hit-rate", default="0.2", help="warn below this interval hit rate")
    p.add_argument("--warn-pool", default="0.9", help="warn when a tier's pool is this full")
    p.add_argument("--warn-error-rate", default="0.01", help="warn above these errors/request")
    p.add_argument(
        "--prefill-tokens-per-s",
        help="the engine's prefill speed; with --kv-bytes-per-token, warns when a tier loads "
        "slower than recompute",
    )
    p.add_argument("--kv-bytes-per-token", help="KV bytes of one token, e.g. 131072 or 128KiB")
    p.add_argument("--wide", action="store_true", help="print every column")
    add_config_options(p)
    p.set_defaults(func=run)


def _number(text: str, flag: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a number; expected {what}") from None


def _thresholds(args: argparse.Namespace) -> Thresholds:
    kv_bytes = None
    if args.kv_bytes_per_token is not None:
        try:
            kv_bytes = parse_size(args.kv_bytes_per_token)
        except ValueError as e:
            raise ConfigError(f"--kv-bytes-per-token: {e}") from None
    prefill = None
    if args.prefill_tokens_per_s is not None:
        prefill = _number(
            args.prefill_tokens_per_s, "--prefill-tokens-per-s", "tokens/s, e.g. 8000"
        )
    return Thresholds(
        hit_rate=_number(args.warn_hit_rate, "--warn-hit-rate", "a fraction, e.g. 0.2"),
        pool=_number(args.warn_pool, "--warn-pool", "a fraction, e.g. 0.9"),
        error_rate=_number(args.warn_error_rate, "--warn-error-rate", "a fraction, e.g. 0.01"),
        prefill_tokens_per_s=prefill,
        kv_bytes_per_token=kv_bytes,
    )


def _seconds(text: str, flag: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None
    if seconds <= 0:
        raise ConfigError(f"{flag} {text!r} is invalid; it must be > 0, e.g. 1s or 500ms")
    return seconds


def _count(args: argparse.Namespace) -> int | None:
    if args.once:
        return 1
    if args.count is None:
        return None
    try:
        n = int(args.count)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--count {args.count!r} is invalid; expected a whole number >= 1")
    return n


def run(args: argparse.Namespace) -> int:
    interval = _seconds(args.interval, "--interval")
    timeout = _seconds(args.timeout, "--timeout")
    count = _count(args)
    thresholds = _thresholds(args)
    token = args.auth_token
    if token is None:
        config = load_from_args(args).config
        secret = config.server.auth_token if args.store_server else config.listen.auth_token
        token = secret.get_secret_value() if secret is not None else None
    source = open_source(
        args.url, store_server=args.store_server, auth_token=token, timeout_s=timeout
    )
    console = Console(stderr=False)
    to_stdout = args.json_lines == "-"
    try:
        monitor = StatsMonitor(source, interval, history=1, thresholds=thresholds)
        first = monitor.sample()  # an unreachable source fails here: error line, exit 2
        if thresholds.recompute_gbps is None:
            print(
                "note: the 'loads slower than recompute' warning is off; give "
                "--prefill-tokens-per-s and --kv-bytes-per-token to turn it on",
                file=sys.stderr,
            )
        with contextlib.ExitStack() as stack:
            lines: IO[str] | None = None
            if to_stdout:
                lines = sys.stdout
            elif args.json_lines:
                try:
                    lines = stack.enter_context(open(args.json_lines, "a", encoding="utf-8"))
                except OSError as e:
                    raise ConfigError(
                        f"--json-lines {args.json_lines!r}: cannot open it for writing: "
                        f"{e.strerror or e}"
                    ) from e
            view = _View(console, source.name, args.wide, quiet=to_stdout)
            stack.enter_context(view)
            return _loop(monitor, first, interval, count, view, lines, source.name)
    finally:
        source.close()


def _loop(
    monitor: StatsMonitor,
    first: Sample,
    interval: float,
    count: int | None,
    view: _View,
    lines: IO[str] | None,
    name: str,
) -> int:
    taken = 1
    report: Sample | None = first
    error: str | None = None
    start = time.monotonic()
    try:
        while True:
            record: Sample = {"source": name, "unix_time": time.time()}
            if report is not None:
                record.update(report)
            else:
                record["error"] = error
            if lines is not None:
                lines.write(json.dumps(record) + "\n")
                lines.flush()
            view.show(report, error, taken)
            if count is not None and taken >= count:
                return 0
            # Keep to the grid start + k * interval: a slow read does not shift later samples.
            time.sleep(max(0.0, start + taken * interval - time.monotonic()))
            taken += 1
            try:
                report, error = monitor.sample(), None
            except KvferryError as e:
                report, error = None, str(e)
    except KeyboardInterrupt:
        return 0


class _View:
    """Shows each report: a Live view on a terminal, printed tables otherwise."""

    def __init__(self, console: Console, name: str, wide: bool, *, quiet: bool) -> None:
        self.console = console
        self.name = name
        self.wide = wide
        self.quiet = quiet
        self.live: Live | None = None
        self.last: RenderableType = Text("")

    def __enter__(self) -> _View:
        if not self.quiet and self.console.is_terminal:
            self.live = Live(console=self.console, auto_refresh=False, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def show(self, report: Sample | None, error: str | None, n: int) -> None:
        if self.quiet:
            return
        if report is not None:
            warnings = report.get("warnings")
            lines = [
                Text(f"warning: {w}", style="yellow")
                for w in (warnings if isinstance(warnings, list) else [])
            ]
            self.last = Group(format_sample(report, source=self.name, wide=self.wide), *lines)
            body: RenderableType = self.last
        else:
            failed = Text(f"warning: sample {n}: source unreachable: {error}", style="bold red")
            body = Group(self.last, failed) if self.live is not None else failed
        if self.live is not None:
            self.live.update(body, refresh=True)
        else:
            self.console.print(body)
