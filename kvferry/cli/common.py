"""Config options shared by every subcommand that needs a config.

Owns the ``--config``, ``--preset`` and ``--set`` options and how they reach
:func:`kvferry.config.load_config`. It reads no environment variable itself: the loader does.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Mapping

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from kvferry.config.loader import LoadedConfig, load_config
from kvferry.config.presets import PRESETS
from kvferry.errors import ConfigError


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE``, ``--preset NAME`` and repeatable ``--set SECTION.KEY=VALUE``."""
    group = parser.add_argument_group("configuration (flag > env KVFERRY_* > file > preset)")
    group.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE",
        default=None,
        help="YAML or JSON config file of section -> key -> value (default: $KVFERRY_CONFIG)",
    )
    group.add_argument(
        "--preset",
        metavar="NAME",
        default=None,
        help=f"tuning preset: {', '.join(sorted(PRESETS))} (default: $KVFERRY_PRESET)",
    )
    group.add_argument(
        "--set",
        dest="set_values",
        metavar="SECTION.KEY=VALUE",
        action="append",
        default=None,
        help="set one config key, e.g. --set transfer.slice_size=128KiB (repeatable)",
    )


def parse_set_values(pairs: list[str] | None) -> dict[str, str]:
    """Turn ``["transfer.workers=4", ...]`` into ``{"transfer.workers": "4"}``; last one wins.

    Raises:
        ConfigError: a pair is not ``SECTION.KEY=VALUE``.
    """
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(
                f"malformed --set {pair!r}: expected SECTION.KEY=VALUE, "
                "e.g. --set transfer.workers=4"
            )
        out[key] = value
    return out


def load_from_args(
    args: argparse.Namespace,
    flags: Mapping[str, object] | None = None,
    *,
    flag_names: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Load the config for a subcommand parsed with :func:`add_config_options`.

    Args:
        args: the parsed arguments (``config_file``, ``preset``, ``set_values``).
        flags: the command's own options as dotted key -> value; None values (options not
            given) are skipped. They win over ``--set`` for the same key.
        flag_names: dotted key -> option spelling (``{"transfer.workers": "--workers"}``), so
            a bad value names the option the user typed.

    Raises:
        ConfigError: a malformed ``--set`` or any error of :func:`load_config`.
    """
    set_values = parse_set_values(getattr(args, "set_values", None))
    names = {key: f"--set {key}" for key in set_values}
    merged: dict[str, object] = dict(set_values)
    for key, value in (flags or {}).items():
        if value is not None:
            merged[key] = value
            names[key] = (flag_names or {}).get(key, key)
    return load_config(
        config_file=getattr(args, "config_file", None),
        preset=getattr(args, "preset", None),
        flags=merged,
        flag_names=names,
    )


class Stopped(KeyboardInterrupt):
    """A SIGINT or SIGTERM that ended a command before it was up (a server still allocating its
    tiers). A KeyboardInterrupt, so that ``except Exception`` in between does not swallow it;
    the CLI prints the message and exits with 128 + the signal number."""

    def __init__(self, signum: int, doing: str) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {doing}")


def live_progress(console: Console, quiet: bool, *, eta: bool = False) -> Progress:
    """The live view of a bench that reports as it goes: a bar per task with its count, the
    time so far (``eta``: and the time left, estimated from the rate so far) and a free
    ``stats`` field (running percentiles, rates). Off when ``quiet`` or when ``console`` is not
    a terminal; gone from the screen when done."""
    columns: list[ProgressColumn] = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    if eta:
        columns.append(TimeRemainingColumn())
    return Progress(
        *columns,
        TextColumn("{task.fields[stats]}"),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )
