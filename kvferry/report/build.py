"""The report, assembled: results in, a :class:`~kvferry.report.model.ReportDoc` out.

:func:`build_report` is the stable entry point (``kvferry report`` and ``kvferry bench all`` call
it, then :func:`kvferry.report.html.write_html` and :func:`kvferry.report.markdown.write_markdown`
draw it). The document's sections, in order: headline metrics, setup, bottlenecks and
recommendations, one section per bench kind present (a subsection per result), sources. Each
bench's module (:mod:`.doctor`, :mod:`.transfer`, :mod:`.store`, :mod:`.hitrate`, :mod:`.serve`,
:mod:`.router`, :mod:`.profile`, :mod:`.plan`) builds its subsections and headline numbers; this
module only orders them. A comparison (``--compare``) is added by the caller with
:func:`add_section`.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

from kvferry.report import (
    doctor,
    findings,
    fmt,
    hitrate,
    plan,
    profile,
    router,
    serve,
    store,
    transfer,
    tune,
)
from kvferry.report.headline import Headline, headline_section
from kvferry.report.inputs import Inputs, LoadedResult, collect
from kvferry.report.model import ReportDoc, Section
from kvferry.report.setup import setup_section, sources_section
from kvferry.version import __version__

__all__ = ["BENCHES", "add_section", "build_from", "build_report"]


@dataclass(frozen=True)
class _Bench:
    title: str
    anchor: str
    intro: str
    module: ModuleType

    @property
    def subsection(self) -> Callable[[LoadedResult, int], Section]:
        fn: Callable[[LoadedResult, int], Section] = self.module.subsection
        return fn

    @property
    def headlines(self) -> Callable[[LoadedResult], Sequence[Headline]]:
        fn: Callable[[LoadedResult], Sequence[Headline]] = self.module.headlines
        return fn


BENCHES: dict[str, _Bench] = {
    "doctor": _Bench(
        "Host checks (doctor)",
        "doctor",
        "kvferry doctor: the production checklist against the machine the runs below were "
        "measured on, each check OK, WARN, FAIL or SKIP with its value, threshold and fix.",
        doctor,
    ),
    "transfer": _Bench(
        "Transfer engine",
        "transfer",
        "kvferry bench transfer: block size x batch size x threads, bandwidth and per-batch "
        "latency, beside the same-run references and any other engine measured.",
        transfer,
    ),
    "store": _Bench(
        "KV store",
        "store",
        "kvferry bench store: put/get throughput and latency of a store backend, per phase.",
        store,
    ),
    "hitrate": _Bench(
        "Prefix-cache hit rate",
        "hitrate",
        "kvferry bench hitrate: hit rate against cache capacity per eviction policy on a trace.",
        hitrate,
    ),
    "serve": _Bench(
        "Endpoint (serving)",
        "serve",
        "kvferry bench serve: TTFT, ITL and throughput of an OpenAI-compatible server per load.",
        serve,
    ),
    "router": _Bench(
        "Router",
        "router",
        "kvferry bench router: KV-aware routing against round-robin and random on one load.",
        router,
    ),
    "profile": _Bench(
        "SLA profile",
        "profile",
        "kvferry profile: TTFT against ISL (prefill) and ITL and throughput against KV usage "
        "and context (decode) of one engine, for SLA planning (kvferry plan).",
        profile,
    ),
    "plan": _Bench(
        "SLA plan",
        "plan",
        "kvferry plan: the engine configuration and the fleet that meet a TTFT and ITL SLA at a "
        "load, from a profile: interpolated (prefill and decode counted apart) and, with "
        "--simulate, measured on fleets of mocks calibrated from the profile behind the router.",
        plan,
    ),
    "tune": _Bench(
        "Tuning",
        "tune",
        "kvferry tune: knobs searched by same-run measurements on this machine, and what is "
        "recommended.",
        tune,
    ),
}
"""The bench kinds the report has a section for, in the order they appear."""


def _with_notes(section: Section, item: LoadedResult) -> Section:
    """The command line and the notes the run recorded, after its own intro."""
    if item.result.command:
        section.intro = f"{section.intro} Command: `{item.result.command}`.".strip()
    notes = item.result.notes
    if notes:
        text = "; ".join(n.rstrip(".") for n in notes)
        section.intro = f"{section.intro} Notes recorded by the run: {text}.".strip()
    return section


def build_from(inputs: Inputs, *, title: str | None = None) -> ReportDoc:
    """The report of results already read (:func:`kvferry.report.inputs.collect`).

    Raises:
        MissingDependency: matplotlib is not installed (the ``plot`` extra).
    """
    items = inputs.results
    heads: list[Headline] = []
    printed: list[Headline] = []
    bench_sections: list[Section] = []
    for tool, bench in BENCHES.items():
        mine = [i for i in items if i.result.tool == tool]
        if not mine:
            continue
        subs = [_with_notes(bench.subsection(item, n), item) for n, item in enumerate(mine)]
        for n, item in enumerate(mine):
            found_here = list(bench.headlines(item))
            heads.extend(found_here)
            if n == 0:  # printed after a run: the first result of each kind
                printed.extend(found_here)
        bench_sections.append(
            Section(title=bench.title, anchor=bench.anchor, intro=bench.intro, subsections=subs)
        )
    others = sorted({i.result.tool for i in items} - set(BENCHES))
    found = findings.findings(items)
    sections = [headline_section(heads), setup_section(items), findings.findings_section(found)]
    sections += bench_sections
    if others:
        sections.append(
            Section(
                title="Other results",
                anchor="other",
                intro="Results of tools this report has no section for yet (listed under "
                f"Sources): {', '.join(others)}.",
            )
        )
    sections.append(sources_section(inputs, f"kvferry report {__version__}"))
    present = {i.result.tool for i in items}
    tools = [t for t in BENCHES if t in present] + others
    now = time.time()
    return ReportDoc(
        title=title or f"kvferry report: {', '.join(tools)} ({len(items)} run(s))",
        generated_at=now,
        sources=inputs.sources,
        sections=sections,
        headline=[(f"{h.label} [{h.run}]", h.formatted) for h in printed],
        meta=_meta(items, now),
    )


def _meta(items: Sequence[LoadedResult], now: float) -> list[tuple[str, str]]:
    """When the report was built; the runs' hosts, commits and time span."""
    hosts = sorted({i.result.environment.host for i in items if i.result.environment.host})
    commits = sorted(
        {
            (i.result.environment.git_commit or "")[:12]
            + (" (uncommitted changes)" if i.result.environment.git_dirty else "")
            for i in items
            if i.result.environment.git_commit
        }
    )
    starts = [i.result.started_at for i in items if i.result.started_at]
    ends = [i.result.ended_at for i in items if i.result.ended_at]
    unknown = sum(1 for i in items if not i.result.started_at)
    span = f"{fmt.utc(min(starts))} to {fmt.utc(max(ends or starts))}" if starts else "not recorded"
    if starts and unknown:
        span += f" ({unknown} run(s) recorded no time)"
    return [
        ("Generated", f"{fmt.utc(now)} by kvferry report {__version__} on {platform.node()}"),
        ("Runs", f"{len(items)} from {len(hosts)} host(s): {', '.join(hosts) or 'not recorded'}"),
        ("Measured", span),
        ("Commits", ", ".join(commits) or "not recorded"),
    ]


def build_report(paths: Sequence[str | os.PathLike[str]], *, title: str | None = None) -> ReportDoc:
    """Read the results at ``paths`` (files or run directories) and build their report.

    Args:
        paths: result files and run directories (see :func:`kvferry.report.inputs.collect`).
        title: the page's title; None: one naming the tools and the number of runs.

    Returns:
        The document; draw it with :func:`kvferry.report.html.write_html` and
        :func:`kvferry.report.markdown.write_markdown`.

    Raises:
        ResultError: a path that is missing or not a readable result, or a directory without
            any result (one line naming the file).
        MissingDependency: matplotlib is not installed.
    """
    return build_from(collect(paths), title=title)


def add_section(doc: ReportDoc, section: Section, *, after: str = "findings") -> None:
    """Insert ``section`` after the section anchored ``after`` (at the end when absent)."""
    anchors = [s.anchor for s in doc.sections]
    at = anchors.index(after) + 1 if after in anchors else len(doc.sections)
    doc.sections.insert(at, section)
