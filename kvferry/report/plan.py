"""The SLA planner's part of the report: one subsection per ``kvferry plan`` result.

A plan result (:class:`~kvferry.bench.profile.simulate.SimulationReport`, tool ``plan``) is
either ``kvferry plan --simulate``'s fleets of calibrated mocks behind the router (with the
analytic plan kept beside them) or the analytic plan alone (``kvferry plan --json``). Each
subsection answers what a reader has to decide: the SLA and the load; per routing mode the
smallest simulated fleet that meets the SLA, or ``infeasible`` with the closest miss, beside the
analytic plan's prefill + decode counts; every simulated run (TTFT and ITL p50/p99, failures,
which target it missed); the analytic plan's choice per stage; and a figure of TTFT and ITL p50
(p99 dashed) against the fleet size per mode with the SLA lines and the run's identity. Also
the headline numbers (the smallest fleet per mode) and the findings (an SLA nothing met).
Nothing is measured here: every cell is read from the result. Targets and loads are printed as
given (``{x:g}``, as ``kvferry plan`` prints them), measured and interpolated times through
:func:`kvferry.report.fmt.num`, as every section prints them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from kvferry.bench.profile.select import Choice, Plan
from kvferry.bench.profile.simulate import SimRun, SimulationReport
from kvferry.report import fmt
from kvferry.report.figures import figure, log_if_spread, new_figure
from kvferry.report.headline import Headline
from kvferry.report.inputs import LoadedResult
from kvferry.report.model import Figure, Finding, Section, Table

__all__ = ["closest", "findings", "headlines", "subsection", "verdict"]

RUN_COLUMNS = [
    "Routing",
    "Instances",
    "Requests",
    "Failed",
    "TTFT p50 (ms)",
    "TTFT p99 (ms)",
    "ITL p50 (ms)",
    "ITL p99 (ms)",
    "Requests per instance",
    "SLA",
]


_ANALYTIC_NOTE = (
    "The analytic row: TTFT is the profile's average interpolated at the ISL (a lone request), "
    "ITL the average at context ISL + OSL/2 and the chosen KV usage (that many requests "
    "decoding), neither with queueing; its instances are prefill and decode counted apart "
    "(disaggregated)."
)
_SIMULATED_NOTE = (
    "The simulated rows are aggregated engines behind the router at the load, queueing "
    "included; a fleet meets the SLA when no request failed and its TTFT and ITL p50 are "
    "within the targets."
)


def _report(item: LoadedResult) -> SimulationReport:
    report = item.result
    if not isinstance(report, SimulationReport):
        raise TypeError(f"{item.name} is a {report.tool} result, not a plan result")
    return report


def _targets(report: SimulationReport) -> tuple[float, float] | None:
    """(TTFT, ITL) targets in ms: the simulation's, else the analytic plan's."""
    if report.options is not None:
        return report.options.ttft_ms, report.options.itl_ms
    if report.plan is not None:
        return report.plan.ttft_ms, report.plan.itl_ms
    return None


def _over(value: float | None, target: float) -> float:
    """How far ``value`` is over ``target``, as a share of it (inf when not measured)."""
    return math.inf if value is None else value / target - 1


def closest(report: SimulationReport, mode: str) -> SimRun | None:
    """The run of ``mode`` nearest to meeting the SLA: runs without a failed request first,
    then the least overshoot of its worse p50 (TTFT's or ITL's, as a share of its target),
    then the smaller fleet. None when the mode has no run or nothing was simulated."""
    o = report.options
    mine = [r for r in report.runs if r.mode == mode]
    if o is None or not mine:
        return None
    return min(
        mine,
        key=lambda r: (
            r.errors > 0,
            max(_over(r.ttft_p50_ms, o.ttft_ms), _over(r.itl_p50_ms, o.itl_ms)),
            r.instances,
        ),
    )


def _misses(report: SimulationReport, r: SimRun) -> list[str]:
    """What kept run ``r`` off the SLA, each with how far (empty: it met it)."""
    o = report.options
    if o is None or r.meets:
        return []
    out = [f"{r.errors} failed"] if r.errors else []
    for name, value, target in (
        ("TTFT", r.ttft_p50_ms, o.ttft_ms),
        ("ITL", r.itl_p50_ms, o.itl_ms),
    ):
        if value is None:
            out.append(f"no {name} measured")
        elif value > target:
            out.append(f"{name} p50 {fmt.num(value)} ms > {target:g} ms (+{_pct(value, target)})")
    return out or ["missed"]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pct(value: float, target: float) -> str:
    return f"{100 * (value / target - 1):.0f}%"


def verdict(report: SimulationReport, mode: str) -> str:
    """One line: the smallest fleet of ``mode`` that meets the SLA, or ``infeasible`` with the
    largest fleet tried and the closest miss."""
    o = report.options
    if o is None:
        return "not simulated"
    best = report.smallest(mode)
    if best is not None:
        return f"met by {best.instances} instance(s)"
    near = closest(report, mode)
    if near is None:
        return "not run"
    tried = max(r.instances for r in report.runs if r.mode == mode)
    return (
        f"infeasible: no fleet of up to {tried} instance(s) meets the SLA; closest: "
        f"{near.instances} instance(s), {', '.join(_misses(report, near))}"
    )


def _analytic_counts(plan: Plan) -> str:
    """``2 prefill + 2 decode`` from the replica counts; a dash where none was counted."""
    counts = {r.stage: r.count for r in plan.replicas}
    if not counts:
        return fmt.DASH
    return " + ".join(f"{n} {stage}" for stage, n in counts.items())


def _analytic_verdict(plan: Plan) -> str:
    if plan.feasible:
        return "met" + (" (no load given: no instance count)" if not plan.replicas else "")
    missed = [c for c in (plan.prefill, plan.decode) if c is not None and not c.feasible]
    return "infeasible: " + "; ".join(
        f"{c.metric} {fmt.num(c.latency_ms)} ms > {c.target_ms:g} ms "
        f"(+{_pct(c.latency_ms, c.target_ms)}, closest: {c.candidate})"
        for c in missed
    )


def _latency(choice: Choice | None) -> str:
    return fmt.DASH if choice is None else fmt.num(choice.latency_ms)


def _sla_table(report: SimulationReport) -> Table:
    o, plan = report.options, report.plan
    targets = _targets(report)
    rows = []
    if targets is not None:
        what = "p50 of each simulated fleet" if o is not None else "the profile's interpolation"
        rows.append(["TTFT target", f"<= {targets[0]:g} ms ({what})"])
        rows.append(["ITL target", f"<= {targets[1]:g} ms ({what})"])
    rate = o.request_rate if o is not None else plan.request_rate if plan is not None else None
    isl = o.isl if o is not None else plan.isl if plan is not None else None
    osl = o.osl if o is not None else plan.osl if plan is not None else None
    rows.append(["Request rate", "not given" if rate is None else f"{rate:g} requests/s"])
    rows.append(["ISL", "not given" if isl is None else f"{fmt.count(isl)} tokens"])
    rows.append(["OSL", "not given" if osl is None else f"{fmt.count(osl)} tokens"])
    rows.append(["Profile(s)", ", ".join(report.profiles) or report.profile_name or fmt.DASH])
    if report.max_kv_tokens or report.max_context:
        rows.append(
            [
                "Profiled engine",
                f"KV capacity {fmt.count(report.max_kv_tokens)} tokens, max context "
                f"{fmt.count(report.max_context)} tokens",
            ]
        )
    if o is not None:
        rows.append(
            [
                "Simulation",
                f"fleets of 1..{o.max_instances} mocks calibrated from the profile behind the "
                f"router, modes {', '.join(o.modes)}, {o.requests} requests per fleet (Poisson "
                f"arrivals), mocks at {report.speedup_ratio:g}x, times scaled back after "
                f"subtracting {fmt.num(report.overhead_ttft_ms)} ms (TTFT) and "
                f"{fmt.num(report.overhead_itl_ms)} ms (ITL) spent outside the model per request"
                + ("; every fleet size run" if o.all_fleets else "; each mode stops at the "
                   "first fleet that meets the SLA"),
            ]
        )  # fmt: skip
    return Table(columns=["What", "Value"], rows=rows, title="SLA and load")


def _choice_table(report: SimulationReport) -> Table | None:
    """Per routing mode the smallest fleet (or the closest miss), the analytic plan first."""
    o, plan = report.options, report.plan
    rows = []
    if plan is not None:
        rows.append(
            [
                "analytic (profile interpolation; prefill and decode apart)",
                _analytic_counts(plan),
                _latency(plan.prefill),
                fmt.DASH,
                _latency(plan.decode),
                fmt.DASH,
                _analytic_verdict(plan),
            ]
        )
    if o is not None:
        for mode in o.modes:
            best = report.smallest(mode)
            run = best or closest(report, mode)
            if run is None:
                rows.append([f"simulated, {mode} routing", fmt.DASH, *[fmt.DASH] * 4, "not run"])
                continue
            rows.append(
                [
                    f"simulated, {mode} routing",
                    str(run.instances) if best is not None else f"{run.instances} (closest)",
                    fmt.num(run.ttft_p50_ms),
                    fmt.num(run.ttft_p99_ms),
                    fmt.num(run.itl_p50_ms),
                    fmt.num(run.itl_p99_ms),
                    verdict(report, mode),
                ]
            )
    if not rows:
        return None
    both = plan is not None and o is not None
    return Table(
        columns=["Plan", "Instances", "TTFT p50 (ms)", "TTFT p99 (ms)", "ITL p50 (ms)",
                 "ITL p99 (ms)", "SLA"],
        rows=rows,
        title="Smallest fleet per routing mode, beside the analytic plan" if both
        else "Smallest fleet per routing mode" if o is not None else "The analytic plan",
        numeric=[False, True, True, True, True, True, False],
        note=" ".join(
            ([_ANALYTIC_NOTE] if plan is not None else [])
            + ([_SIMULATED_NOTE] if o is not None else [])
        ),
    )  # fmt: skip


def _runs_table(report: SimulationReport) -> Table:
    rows = [
        [
            r.mode,
            str(r.instances),
            fmt.count(r.requests),
            fmt.count(r.errors),
            fmt.num(r.ttft_p50_ms),
            fmt.num(r.ttft_p99_ms),
            fmt.num(r.itl_p50_ms),
            fmt.num(r.itl_p99_ms),
            ", ".join(str(n) for n in r.requests_per_instance) or fmt.DASH,
            "met" if r.meets else "missed: " + "; ".join(_misses(report, r)),
        ]
        for r in report.runs
    ]
    return Table(
        columns=RUN_COLUMNS,
        rows=rows,
        title="Simulated fleets (one run per routing mode and fleet size)",
        numeric=[False] + [True] * 7 + [False, False],
        note="Times are the profiled engine's (measured on sped-up mocks, scaled back). "
        "Requests per instance: as the router counted them, the endpoint bench's test request "
        "included.",
    )


def _stage_row(choice: Choice, plan: Plan) -> list[str]:
    where = (
        f"ISL {choice.isl:,.0f}"
        if choice.stage == "prefill"
        else f"context {choice.isl:,.0f}, KV usage {fmt.pct(choice.kv_usage or 0.0)} "
        f"(~{choice.concurrency or 0.0:.1f} requests)"
    )
    replicas = next((r for r in plan.replicas if r.stage == choice.stage), None)
    return [
        f"{choice.stage} ({choice.metric})",
        choice.candidate,
        where,
        fmt.num(choice.latency_ms),
        f"{choice.target_ms:g}",
        "met"
        if choice.feasible
        else f"infeasible (closest), +{_pct(choice.latency_ms, choice.target_ms)}",
        fmt.num(choice.tokens_per_s),
        fmt.DASH if replicas is None else str(replicas.count),
        fmt.DASH if replicas is None else f"{100 * replicas.margin:+.0f}%",
    ]


def _stages_table(plan: Plan) -> Table | None:
    choices = [c for c in (plan.prefill, plan.decode) if c is not None]
    if not choices:
        return None
    return Table(
        columns=["Stage", "Candidate", "At", "Predicted (ms)", "Target (ms)", "SLA",
                 "Tokens/s per instance", "Instances for the load", "Margin"],
        rows=[_stage_row(c, plan) for c in choices],
        title="Analytic plan per stage (kvferry plan, from the profile)",
        numeric=[False, False, False, True, True, False, True, True, True],
        note="Per stage the highest throughput per instance that meets the target (infeasible: "
        "the closest candidate); instances = ceil(load / tokens/s per instance), prefill load "
        "= rate x ISL, decode load = rate x OSL; margin = capacity over load, minus 1."
        + (" " + _sentence("; ".join(plan.notes)) + "." if plan.notes else ""),
    )  # fmt: skip


def _ms(r: SimRun, metric: str, stat: str) -> float:
    """Run ``r``'s TTFT or ITL at ``stat`` (NaN when not measured: a gap in the line)."""
    value: float | None = getattr(r, f"{metric.lower()}_{stat}_ms")
    return math.nan if value is None else value


def _figure(item: LoadedResult, report: SimulationReport, index: int) -> Figure | None:
    o = report.options
    if o is None or not report.runs:
        return None
    fig = new_figure(width=10.0, height=4.6)
    axes = fig.subplots(1, 2)
    sizes = sorted({r.instances for r in report.runs})
    for ax, name, target in ((axes[0], "TTFT", o.ttft_ms), (axes[1], "ITL", o.itl_ms)):
        values = [target]
        for k, mode in enumerate(o.modes):
            mine = [r for r in report.runs if r.mode == mode]
            if not mine:
                continue
            xs = [r.instances for r in mine]
            p50 = [_ms(r, name, "p50") for r in mine]
            p99 = [_ms(r, name, "p99") for r in mine]
            values += [v for v in p50 + p99 if v == v]
            color = f"C{k}"
            ax.plot(xs, p50, color=color, marker="o", label=f"{mode} p50")
            ax.plot(xs, p99, color=color, marker="^", linestyle="--", alpha=0.6,
                    label=f"{mode} p99")  # fmt: skip
            met = [(x, v) for x, v, r in zip(xs, p50, mine, strict=True) if r.meets]
            if met:
                ax.scatter([m[0] for m in met], [m[1] for m in met], s=140, facecolors="none",
                           edgecolors=color, linewidths=1.5, zorder=3)  # fmt: skip
        ax.axhline(target, color="C3", linestyle=":", linewidth=1.5,
                   label=f"SLA: p50 <= {target:g} ms")  # fmt: skip
        log_if_spread(ax, values)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("instances in the fleet")
        ax.set_ylabel(f"{name} (ms, profiled engine's time)")
        ax.set_title(f"{name} vs fleet size", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"simulated fleets of {report.profile_name}: {o.request_rate:g} requests/s, "
        f"ISL {o.isl}, OSL {o.osl}",
        fontsize=11,
    )
    return figure(
        f"plan-{index}-fleets",
        "Simulated TTFT and ITL vs fleet size, per routing mode",
        fig,
        item,
        "p50 solid, p99 dashed, per routing mode; the dotted line is the SLA target (on the "
        "p50); a ringed point is a fleet that met the SLA (no failure, both p50s within).",
    )


def _intro(report: SimulationReport) -> str:
    o, plan = report.options, report.plan
    targets = _targets(report)
    head = f"Plan for {report.profile_name or 'the profile'}"
    rate = o.request_rate if o is not None else plan.request_rate if plan is not None else None
    if rate is not None:
        isl, osl = (o.isl, o.osl) if o is not None else (plan.isl, plan.osl) if plan else (0, 0)
        head += f" at {rate:g} requests/s (ISL {fmt.count(isl)}, OSL {fmt.count(osl)})"
    if targets is not None:
        head += f" against TTFT <= {targets[0]:g} ms and ITL <= {targets[1]:g} ms"
    parts = [head + "."]
    if o is not None:
        parts += [f"{mode}: {verdict(report, mode)}." for mode in o.modes]
    else:
        parts.append("Not simulated (kvferry plan without --simulate): the analytic plan alone.")
    if plan is not None:
        counts = _analytic_counts(plan)
        parts.append(
            f"Analytic plan: {_analytic_verdict(plan)}"
            + (f", {counts} instance(s)." if counts != fmt.DASH else ".")
        )
    return " ".join(parts)


def subsection(item: LoadedResult, index: int) -> Section:
    report = _report(item)
    tables = [_sla_table(report)]
    choice = _choice_table(report)
    if choice is not None:
        tables.append(choice)
    if report.runs:
        tables.append(_runs_table(report))
    if report.plan is not None:
        stages = _stages_table(report.plan)
        if stages is not None:
            tables.append(stages)
    fig = _figure(item, report, index)
    return Section(
        title=item.name,
        anchor=f"plan-{index}",
        intro=_intro(report),
        tables=tables,
        figures=[fig] if fig else [],
    )


def headlines(item: LoadedResult) -> Sequence[Headline]:
    """The smallest simulated fleet that meets the SLA, per routing mode."""
    report = _report(item)
    o = report.options
    if o is None:
        return []
    out = []
    for mode in o.modes:
        best = report.smallest(mode)
        if best is not None:
            out.append(
                Headline(
                    f"plan smallest fleet meeting the SLA ({mode})",
                    float(best.instances),
                    "instance(s)",
                    f"fewest simulated instances behind {mode} routing whose TTFT p50 <= "
                    f"{o.ttft_ms:g} ms and ITL p50 <= {o.itl_ms:g} ms at "
                    f"{o.request_rate:g} requests/s",
                    item.name,
                    f"{mode} x {best.instances}",
                    digits=1,
                )
            )
    return out


def findings(item: LoadedResult) -> Iterable[Finding]:
    """An SLA that no simulated fleet of a mode met (or, not simulated, that the analytic plan
    found infeasible): with the closest miss and what would change it."""
    report = _report(item)
    o, plan = report.options, report.plan
    if o is not None:
        missed = [
            m for m in o.modes if report.smallest(m) is None and closest(report, m) is not None
        ]
        if missed:
            yield Finding(
                severity="bad",
                title="no simulated fleet meets the SLA"
                + ("" if len(missed) == len(o.modes) else f" with {', '.join(missed)} routing"),
                detail=f"At {o.request_rate:g} requests/s (ISL {o.isl}, OSL {o.osl}), no "
                f"fleet of up to {o.max_instances} instance(s) kept TTFT p50 <= "
                f"{o.ttft_ms:g} ms and ITL p50 <= {o.itl_ms:g} ms.",
                evidence=f"{item.name}: " + "; ".join(f"{m}: {verdict(report, m)}" for m in missed),
                recommendation="Simulate larger fleets (--max-instances), plan another candidate "
                "engine (kvferry profile --candidate), or relax the SLA where the closest miss is "
                "small.",
                rule="plan.infeasible",
            )
    elif plan is not None and not plan.feasible:
        yield Finding(
            severity="bad",
            title="the analytic plan finds the SLA infeasible",
            detail="No profiled candidate meets every target at the load's lengths.",
            evidence=f"{item.name}: {_analytic_verdict(plan)}",
            recommendation="Profile another candidate engine, or relax the target the closest "
            "candidate misses.",
            rule="plan.infeasible",
        )
