"""``kvferry config``: show the effective config and where each value came from; list presets.

Owns the ``config show`` and ``config presets`` subcommands. It only reads config through
:mod:`kvferry.cli.common` (and so through the loader); it changes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys

from kvferry.cli.common import add_config_options, load_from_args
from kvferry.config.loader import LoadedConfig, load_config
from kvferry.config.presets import PRESET_DESCRIPTIONS, PRESETS
from kvferry.tables import FitTable, add_wide_option, output_console, print_table


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kvferry config`` and its ``show`` and ``presets`` subcommands."""
    config = subparsers.add_parser(
        "config",
        help="show the effective config or the presets",
        description="Inspect kvferry's configuration.",
    )
    config.set_defaults(func=lambda _args: _usage(config))
    sub = config.add_subparsers(title="config commands", metavar="COMMAND")

    show = sub.add_parser(
        "show",
        help="print every config key, its effective value and where it came from",
        description="Print every config key with its effective value and its source "
        "(default, preset:NAME, file:PATH, env:NAME or flag).",
    )
    add_config_options(show)
    show.add_argument("--json", action="store_true", help='print {"config": ..., "sources": ...}')
    add_wide_option(show)
    show.set_defaults(func=run_show)

    presets = sub.add_parser(
        "presets",
        help="list the tuning presets and the values they set",
        description="List the tuning presets and the values they set.",
    )
    presets.add_argument("--json", action="store_true", help="print the presets as JSON")
    add_wide_option(presets)
    presets.set_defaults(func=run_presets)


def run_show(args: argparse.Namespace) -> int:
    """``kvferry config show``: a Key | Value | Source table, or JSON with ``--json``."""
    loaded = load_from_args(args)
    if args.json:
        print(json.dumps({"config": loaded.as_dict(), "sources": loaded.sources}, indent=2))
        return 0
    _print_table(loaded, title="kvferry config", wide=args.wide)
    return 0


def run_presets(args: argparse.Namespace) -> int:
    """``kvferry config presets``: each preset's description and the values it sets."""
    if args.json:
        out = {
            name: {"description": PRESET_DESCRIPTIONS.get(name, ""), "values": values}
            for name, values in PRESETS.items()
        }
        print(json.dumps(out, indent=2))
        return 0
    from rich.text import Text

    console = output_console()
    # Load each preset alone (no file, no environment) so values print as the models normalise
    # them ("128KiB"), next to the default they replace.
    default_values = {key: value for key, value, _ in load_config(environ={}).rows()}
    for name in PRESETS:
        loaded = load_config(preset=name, environ={})
        table = FitTable(
            f"{name}: {PRESET_DESCRIPTIONS.get(name, '')}", wide=args.wide, title_justify="left"
        )
        table.add_column("Key", justify="left", style="cyan")
        table.add_column("Value", text=True, style="bold")
        table.add_column("Default", text=True, style="dim")
        for key, value, source in loaded.rows():
            if source == f"preset:{name}":
                table.add_row(key, Text(value), Text(default_values[key]))
        print_table(console, table)
    return 0


def _print_table(loaded: LoadedConfig, *, title: str, wide: bool) -> None:
    # Cells are printed as written (no markup): a value such as "[red]" stays "[red]".
    table = FitTable(title, wide=wide, title_justify="left")
    table.add_column("Key", justify="left", style="cyan")
    table.add_column("Value", text=True)
    table.add_column("Source", text=True)
    for key, value, source in loaded.rows():
        style = None if source == "default" else "bold"
        table.add_row(key, value, source, style=style)
    print_table(output_console(), table)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2
