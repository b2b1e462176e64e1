"""The report's setup and sources sections: what the numbers were measured on, and with what.

Setup: every run (tool, when, how long, host, commit, the command line where the result
records one), every machine (host, platform, kernel, CPUs and NUMA nodes, memory, Python,
commit and whether the checkout had uncommitted changes), the package versions, and the
effective config with provenance: only the keys that are not at their default, each with where
its value came from, and a count of the rest. Sources: the files read, the files skipped and
why, and the benches' own PNGs found in run directories. It reads results; nothing is measured.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvferry.bench.result import BenchResult, EffectiveConfig, Environment
from kvferry.report import fmt
from kvferry.report.inputs import Inputs, LoadedResult
from kvferry.report.model import Figure, Section, Table

__all__ = ["command_of", "config_table", "setup_section", "sources_section"]

CLIENT_TOOLS = frozenset({"serve", "router", "profile", "plan"})
"""Tools that measure a server through its URL (or, ``plan``, fleets of mocks and the router
started as processes of their own): they run under no kvferry config."""

MAX_RUN_NAMES = 8
"""Runs named in a machine's row at most; the rest are counted. A ``make run`` writes seven
(the doctor's and six benches'), and its one command row names them all."""


def command_of(result: BenchResult) -> str:
    """The command line a result records, else empty (run from Python, or a file written
    before results recorded it)."""
    return result.command


def _env_key(env: Environment) -> str:
    data = {k: v for k, v in vars(env).items() if k != "captured_at"}
    return json.dumps(data, sort_keys=True, default=str)


def _commit(env: Environment) -> str:
    if not env.git_commit:
        return "not recorded"
    dirty = {True: " + uncommitted changes", False: " (clean)", None: ""}[env.git_dirty]
    return env.git_commit[:12] + dirty


def _names(items: Sequence[LoadedResult]) -> str:
    names = [i.name for i in items]
    if len(names) <= MAX_RUN_NAMES:
        return ", ".join(names)
    return ", ".join(names[:MAX_RUN_NAMES]) + f" and {len(names) - MAX_RUN_NAMES} more"


def _machine_row(env: Environment, items: Sequence[LoadedResult]) -> list[str]:
    cpus = f"{env.cpus} x {env.cpu_model}" if env.cpu_model else str(env.cpus or fmt.DASH)
    numa = f"{len(env.numa_nodes)}: " + "; ".join(env.numa_nodes) if env.numa_nodes else fmt.DASH
    return [
        env.host or "not recorded",
        env.platform or fmt.DASH,
        env.kernel or fmt.DASH,
        cpus,
        numa,
        fmt.size(env.memory_bytes) if env.memory_bytes else fmt.DASH,
        env.python or fmt.DASH,
        _commit(env),
        _names(items),
    ]


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def config_table(config: EffectiveConfig, runs: str) -> Table:
    """The non-default keys of ``config`` with their provenance, and a count of the defaults."""
    rows = [
        [key, _value(config.values[key]), source]
        for key, source in sorted(config.sources.items())
        if source != "default" and key in config.values
    ]
    defaults = sum(1 for key in config.values if config.sources.get(key, "default") == "default")
    return Table(
        columns=["Key", "Value", "Set by"],
        rows=rows,
        title=f"Effective config of {runs}",
        note=f"{len(rows)} key(s) set, {defaults} key(s) at their defaults (not shown). Set by: "
        "flag (the command line), env:KVFERRY_* (the environment), file:PATH (a config file), "
        "preset:NAME, bench (the bench itself, for what it measures).",
    )


def setup_section(items: Sequence[LoadedResult]) -> Section:
    runs = Table(
        columns=["Run", "Tool", "Started", "Duration (s)", "Host", "Commit"],
        rows=[
            [
                i.name,
                i.result.tool,
                fmt.utc(i.result.started_at),
                fmt.num(i.result.seconds) if i.result.started_at else fmt.DASH,
                i.result.environment.host or "not recorded",
                _commit(i.result.environment),
            ]
            for i in sorted(items, key=lambda i: (not i.result.started_at, i.result.started_at))
        ],
        title="Runs",
        numeric=[False, False, False, True, False, False],
        note="In the order they ran; times in UTC. Files written before the result model "
        "recorded no start time, machine or commit: 'not recorded'.",
    )
    tables = [runs]
    by_command: dict[str, list[LoadedResult]] = {}
    for i in items:
        if command_of(i.result):
            by_command.setdefault(command_of(i.result), []).append(i)
    if by_command:
        # one row per command: a suite's steps share one
        rows = [[_names(group), command] for command, group in by_command.items()]
        tables.append(Table(columns=["Runs", "Command line"], rows=rows, title="Command lines"))
    machines: dict[str, tuple[Environment, list[LoadedResult]]] = {}
    for i in items:
        env = i.result.environment
        machines.setdefault(_env_key(env), (env, []))[1].append(i)
    tables.append(
        Table(
            columns=[
                "Host",
                "Platform",
                "Kernel",
                "CPUs",
                "NUMA nodes (CPUs each)",
                "Memory",
                "Python",
                "Commit",
                "Runs",
            ],
            rows=[_machine_row(env, group) for env, group in machines.values()],
            title="Machines and checkouts",
        )
    )
    recorded = [(env, group) for env, group in machines.values() if env.packages]
    if recorded:
        names = sorted({p for env, _ in recorded for p in env.packages})
        tables.append(
            Table(
                columns=["Package"]
                + [f"machine {n + 1} ({env.host})" for n, (env, _) in enumerate(recorded)],
                rows=[
                    [p] + [env.packages.get(p) or "not installed" for env, _ in recorded]
                    for p in names
                ],
                title="Package versions",
                note="machine N: the Nth row of 'Machines and checkouts' that recorded its "
                "packages.",
            )
        )
    configs: dict[str, tuple[EffectiveConfig, list[LoadedResult]]] = {}
    for i in items:
        if i.result.config is not None:
            key = json.dumps(
                [i.result.config.values, i.result.config.sources], sort_keys=True, default=str
            )
            configs.setdefault(key, (i.result.config, []))[1].append(i)
    all_default = []
    for config, group in configs.values():
        table = config_table(config, _names(group))
        if table.rows:
            tables.append(table)
        else:
            all_default.append(f"{_names(group)} ({len(config.values)} keys)")
    missing = [i for i in items if i.result.config is None]
    clients = [i for i in missing if i.result.tool in CLIENT_TOOLS]
    tunes = [i for i in missing if i.result.tool == "tune"]
    older = [i for i in missing if i.result.tool not in CLIENT_TOOLS and i.result.tool != "tune"]
    intro = "What each run was measured on and with. Every field comes from the run's result file."
    if all_default:
        intro += f" Every config key at its default: {'; '.join(all_default)}."
    if clients:
        intro += (
            f" {_names(clients)}: no kvferry config (they measure servers through their URLs; "
            "what they sent is in their own sections)."
        )
    if tunes:
        intro += (
            f" {_names(tunes)}: tuning runs, each step measured against its own config (in "
            "their section)."
        )
    if older:
        intro += (
            f" {len(older)} run(s) recorded no effective config (files written before the "
            f"result model): {_names(older)}."
        )
    return Section(title="Setup", anchor="setup", intro=intro, tables=tables)


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def sources_section(inputs: Inputs, generated_by: str) -> Section:
    """The files read, the files skipped and why, and the benches' own figures."""
    tables = [
        Table(
            columns=["Run", "Tool", "File"],
            rows=[[i.name, i.result.tool, str(i.path)] for i in inputs.results],
            title="Result files read",
        )
    ]
    if inputs.skipped:
        tables.append(
            Table(
                columns=["File", "Why it was skipped"],
                rows=[[str(s.path), s.reason] for s in inputs.skipped],
                title="Files skipped (not kvferry results)",
            )
        )
    figures = []
    for path, name in inputs.pngs:
        try:
            png = Path(path).read_bytes()
        except OSError:
            continue
        stem = "own-" + _SAFE.sub("-", name.removesuffix(".png")).strip("-")
        figures.append(Figure(stem, name, png, f"Drawn by the bench itself when it ran: {path}"))
    intro = (
        f"Built by {generated_by} from {len(inputs.results)} result file(s). Every number in "
        "the tables above is read from these files (a figure's footer names its run)."
    )
    if figures:
        intro += " The figures below are the PNGs the benches wrote beside their results."
    return Section(title="Sources", anchor="sources", intro=intro, tables=tables, figures=figures)
