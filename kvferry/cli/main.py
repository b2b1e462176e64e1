"""The ``kvferry`` entry point: builds the parser from one module per subcommand and runs it.

Owns the top-level error boundary of the CLI: a :class:`~kvferry.errors.KvferryError` becomes
``error: <message>`` on stderr and exit status 2, and so does a ``RecursionError`` (input nested
deeper than a parser can follow); Ctrl-C becomes 130, and a signal that stops a server while it
starts (:class:`~kvferry.cli.common.Stopped`) 128 + its number; no traceback is shown for any
of them.
Also where kvferry's log lines go: stderr, one timestamped line each, at ``--log-level`` (or
``KVFERRY_LOG_LEVEL``; default warning). Each subcommand module exposes ``add_parser(subparsers)
-> None``, which registers its parser and sets ``func=<callable(args) -> int>`` with
``set_defaults``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import stat
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO, cast

from kvferry.cli.common import Stopped
from kvferry.config.loader import ENV_LOG_LEVEL
from kvferry.errors import ConfigError, KvferryError

# A new subcommand is one more name here. A module that does not exist yet is skipped, so this
# list may name commands that are still being written.
_COMMAND_MODULES = [
    "kvferry.cli.config_cmd",
    "kvferry.cli.bench_cmd",
    "kvferry.cli.serve_cmd",
    "kvferry.cli.trace_cmd",
    "kvferry.cli.workload_cmd",
    "kvferry.cli.model_cmd",
    "kvferry.cli.report_cmd",
    "kvferry.cli.advise_cmd",
    "kvferry.cli.tune_cmd",
    "kvferry.cli.monitor_cmd",
    "kvferry.cli.doctor_cmd",
    "kvferry.cli.profile_cmd",
    "kvferry.cli.plan_cmd",
]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
LOG_LEVELS = ("debug", "info", "warning", "error")


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is when a line is logged (tests swap it).

    When stderr is a pipe or a socket, a line waits at most ``_PIPE_WAIT_S`` for room and is
    dropped (counted, and said in the next line that goes out) when there is none: a server
    whose stderr pipe nobody drains must not have a connection thread blocked in a log call
    (with the handler's lock, every other thread that logs) for as long as nobody reads.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr
        fd = _pipe_fd(stream)
        if fd is None:
            super().emit(record)
            return
        try:
            line = self.format(record)
            if self.dropped:
                line += f" ({self.dropped} earlier log lines dropped: stderr was not read)"
            stream.flush()
            if _write_within(fd, (line + "\n").encode(errors="replace"), _PIPE_WAIT_S):
                self.dropped = 0
            else:
                self.dropped += 1
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


_PIPE_WAIT_S = 0.1


def _pipe_fd(stream: TextIO) -> int | None:
    """The file descriptor behind ``stream`` when it is a pipe or a socket, else None."""
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError, AttributeError):
        return None
    return fd if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) else None


def _write_within(fd: int, data: bytes, seconds: float) -> bool:
    """Write ``data`` to ``fd`` as room comes, for at most ``seconds``; False if it did not
    all go (a line cut short ends with a newline, so the next one starts on its own)."""
    deadline = time.monotonic() + seconds
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            if len(view) < len(data):
                _write_some(fd, b"\n")
            return False
        n = _write_some(fd, view[: select.PIPE_BUF])
        view = view[n:]
    return True


def _write_some(fd: int, data: bytes | memoryview) -> int:
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


def setup_logging(level: str | None) -> None:
    """Send the ``kvferry`` loggers' lines at ``level`` (None: ``KVFERRY_LOG_LEVEL``, else
    warning) to stderr as ``time LEVEL logger: message``.

    Raises:
        ConfigError: the level is not one of LOG_LEVELS.
    """
    if level is None:
        level = os.environ.get(ENV_LOG_LEVEL, "").strip().lower() or "warning"
        if level not in LOG_LEVELS:
            raise ConfigError(
                f"{ENV_LOG_LEVEL}={level!r} is not a log level; use one of {', '.join(LOG_LEVELS)}"
            )
    logger = logging.getLogger("kvferry")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvferry")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The ``kvferry`` parser with every subcommand of ``_COMMAND_MODULES`` that exists."""
    parser = argparse.ArgumentParser(
        prog="kvferry",
        description="KV-cache transfer engine and benchmark lab.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    log_help = f"what kvferry logs to stderr (default: ${ENV_LOG_LEVEL}, else warning)"
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=None, help=log_help)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            # Only the command module itself may be missing; a missing dependency *inside* it
            # is a real error and must surface.
            if e.name == name:
                continue
            raise
        module.add_parser(subparsers)
    _add_to_every_command(subparsers, "--log-level", choices=LOG_LEVELS, help=log_help)
    return parser


def _add_to_every_command(
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
    flag: str,
    **kwargs: Any,
) -> None:
    """Let ``flag`` of the top-level parser also follow any (sub)command: ``kvferry serve router
    --log-level info``. SUPPRESS keeps a value given before the command when it is not repeated."""
    for sub in set(subparsers.choices.values()):
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        for action in nested:
            _add_to_every_command(action, flag, **kwargs)
        if flag not in sub._option_string_actions:
            sub.add_argument(flag, default=argparse.SUPPRESS, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """Run ``kvferry`` with ``argv`` (``sys.argv[1:]`` if None) and return the exit status."""
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version, or a usage error argparse already printed
            return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)
        setup_logging(args.log_level)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what ran, for exports
        func = cast("Callable[[argparse.Namespace], int] | None", getattr(args, "func", None))
        if func is None:
            parser.print_help(sys.stderr)
            return EXIT_ERROR
        return func(args)
    except KvferryError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except RecursionError:
        # Parsers of user input (json, yaml) recurse per nesting level; the readers of config,
        # trace and prompt files name the file and line, this is the net under the others.
        print(
            "error: the input is nested too deeply to process (Python's recursion limit was "
            "reached); flatten it",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except Stopped as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
