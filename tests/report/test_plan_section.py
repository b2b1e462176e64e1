"""The report's SLA plan section (kvferry/report/plan.py), from real ``kvferry plan`` results:
``--simulate`` on fleets of mocks calibrated from a real profile of a mock (an SLA every fleet
meets, one none meets) and the plain plan of the same profile (met, infeasible), reported
through ``kvferry report`` as HTML and Markdown. What is asserted does not hang on this
machine's speed: the verdicts of a generous and an impossible SLA, and that every number shown
is the result's own."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest

from kvferry.bench.profile.simulate import SimulationReport
from kvferry.bench.result import load_result
from kvferry.cli.main import main
from kvferry.report import fmt
from kvferry.report.build import build_report
from kvferry.report.figures import identity
from kvferry.report.inputs import collect
from kvferry.report.model import ReportDoc, Section, Table

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.slow

LOAD = ("--request-rate", "2", "--isl", "300", "--osl", "8")
GENEROUS = ("--ttft", "1e6", "--itl", "1e6")
IMPOSSIBLE = ("--ttft", "0.001", "--itl", "0.001")


def _simulate(profile: Path, out: Path, *flags: str) -> Path:
    args = ["plan", "--profile", str(profile), "--simulate", *LOAD, "--speedup-ratio", "5",
            "--sim-requests", "12", "--max-instances", "2", "--quiet", "--json", str(out),
            *flags]  # fmt: skip
    assert main(args) == 0  # no --strict: an infeasible SLA is a result, not a failure
    return out


@pytest.fixture(scope="module")
def results(mock_profile_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four real plan results of one profile: simulated met / infeasible, plain met /
    infeasible."""
    out = tmp_path_factory.mktemp("plans")
    met = _simulate(mock_profile_dir, out / "sim_met.json", *GENEROUS)
    bad = _simulate(mock_profile_dir, out / "sim_infeasible.json", *IMPOSSIBLE,
                    "--router-modes", "random")  # fmt: skip
    plain = {}
    for name, sla in (("plan_met", GENEROUS), ("plan_infeasible", IMPOSSIBLE)):
        path = out / f"{name}.json"
        assert main(["plan", "--profile", str(mock_profile_dir), *sla, *LOAD, "--json",
                     str(path)]) == 0  # fmt: skip
        plain[name] = path
    return {"sim_met": met, "sim_infeasible": bad, **plain}


@pytest.fixture(scope="module")
def report(results: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[
    ReportDoc, str, str
]:  # fmt: skip
    """The report of the four results, through the CLI (HTML and Markdown) and as a document."""
    out = tmp_path_factory.mktemp("planreport")
    paths = [str(p) for p in results.values()]
    assert main(["report", *paths, "-o", str(out / "r.html"), "--md", str(out / "r.md")]) == 0
    return build_report(paths), (out / "r.html").read_text(), (out / "r.md").read_text()


def _load(path: Path) -> SimulationReport:
    result = load_result(json.loads(path.read_text()))
    assert isinstance(result, SimulationReport)
    return result


def _sub(doc: ReportDoc, name: str) -> Section:
    (plan,) = [s for s in doc.sections if s.anchor == "plan"]
    (found,) = [s for s in plan.subsections if s.title == f"{name}.json"]
    return found


def _table(s: Section, prefix: str) -> Table:
    (found,) = [t for t in s.tables if t.title.startswith(prefix)]
    return found


def _column(t: Table, name: str) -> list[str]:
    i = t.columns.index(name)
    return [row[i] for row in t.rows]


def test_plan_results_get_their_own_section_not_other_results(
    report: tuple[ReportDoc, str, str],
) -> None:
    doc, page, md = report
    anchors = [s.anchor for s in doc.sections]
    assert "plan" in anchors and "other" not in anchors
    (plan,) = [s for s in doc.sections if s.anchor == "plan"]
    assert [s.title for s in plan.subsections] == [
        "sim_met.json", "sim_infeasible.json", "plan_met.json", "plan_infeasible.json"
    ]  # fmt: skip
    assert '<section id="plan">' in page and "Other results" not in page
    assert '<a id="plan"></a>' in md and "## SLA plan" in md


def test_a_simulated_plan_shows_the_sla_the_load_every_run_and_the_smallest_fleet(
    results: dict[str, Path], report: tuple[ReportDoc, str, str]
) -> None:
    doc, page, md = report
    result = _load(results["sim_met"])
    assert result.options is not None and result.plan is not None
    s = _sub(doc, "sim_met")
    sla = dict((row[0], row[1]) for row in _table(s, "SLA and load").rows)
    assert sla["TTFT target"] == "<= 1e+06 ms (p50 of each simulated fleet)"
    assert sla["Request rate"] == "2 requests/s"
    assert sla["ISL"] == "300 tokens" and sla["OSL"] == "8 tokens"
    assert "modes kv, round-robin, 12 requests per fleet" in sla["Simulation"]

    # every run, its numbers the result's own (a generous SLA: one instance per mode)
    runs = _table(s, "Simulated fleets")
    assert [(r.mode, r.instances, r.meets) for r in result.runs] == [
        ("kv", 1, True), ("round-robin", 1, True)
    ]  # fmt: skip
    assert _column(runs, "TTFT p50 (ms)") == [fmt.num(r.ttft_p50_ms) for r in result.runs]
    assert _column(runs, "ITL p99 (ms)") == [fmt.num(r.itl_p99_ms) for r in result.runs]
    assert _column(runs, "SLA") == ["met", "met"]

    # the smallest fleet per mode beside the analytic plan
    choice = _table(s, "Smallest fleet per routing mode, beside the analytic plan")
    plan = result.plan
    counts = " + ".join(f"{r.count} {r.stage}" for r in plan.replicas)
    assert choice.rows[0][:2] == [
        "analytic (profile interpolation; prefill and decode apart)", counts
    ]  # fmt: skip
    assert plan.prefill is not None and choice.rows[0][2] == fmt.num(plan.prefill.latency_ms)
    assert [row[0] for row in choice.rows[1:]] == ["simulated, kv routing",
                                                   "simulated, round-robin routing"]  # fmt: skip
    assert [row[-1] for row in choice.rows] == ["met", "met by 1 instance(s)",
                                                "met by 1 instance(s)"]  # fmt: skip
    assert "kv: met by 1 instance(s). round-robin: met by 1 instance(s)." in s.intro
    for text in ("kv: met by 1 instance(s)", fmt.num(result.runs[0].ttft_p50_ms), counts):
        assert text in md and html.escape(text) in page

    # the figure: one, a PNG, with the run's identity; linked from the Markdown
    (fig,) = s.figures
    assert fig.name == "plan-0-fleets" and fig.png.startswith(b"\x89PNG")
    assert "plan-0-fleets.png" in md and 'id="fig-plan-0-fleets"' in page
    (item,) = [i for i in collect([results["sim_met"]]).results]
    assert identity(item)[0] == "kvferry plan, run sim_met.json"

    # the headline: the smallest fleet per mode
    assert ("plan smallest fleet meeting the SLA (kv) [sim_met.json]", "1 instance(s)") in (
        doc.headline
    )


def test_an_sla_no_fleet_meets_is_infeasible_with_the_closest_miss(
    results: dict[str, Path], report: tuple[ReportDoc, str, str]
) -> None:
    doc, page, md = report
    result = _load(results["sim_infeasible"])
    assert [(r.mode, r.meets) for r in result.runs] == [("random", False), ("random", False)]
    s = _sub(doc, "sim_infeasible")
    choice = _table(s, "Smallest fleet per routing mode")
    (row,) = [r for r in choice.rows if r[0] == "simulated, random routing"]
    assert row[-1].startswith(
        "infeasible: no fleet of up to 2 instance(s) meets the SLA; closest: "
    ) and row[1].endswith("(closest)")
    # the closest miss: the run whose worse p50 overshoots least, with its own numbers
    n = int(row[1].split()[0])
    (near,) = [r for r in result.runs if r.instances == n]
    assert near is min(
        result.runs,
        key=lambda r: (
            r.errors > 0,
            max((r.ttft_p50_ms or 0) / 0.001, (r.itl_p50_ms or 0) / 0.001),
        ),
    )
    assert row[2] == fmt.num(near.ttft_p50_ms) and row[4] == fmt.num(near.itl_p50_ms)
    assert f"TTFT p50 {fmt.num(near.ttft_p50_ms)} ms > 0.001 ms" in row[-1]
    assert all(v.startswith("missed: ") for v in _column(_table(s, "Simulated fleets"), "SLA"))
    text = "random: infeasible: no fleet of up to 2 instance(s) meets the SLA"
    assert text in md and text in page
    # a finding says so, with the rule's name and the evidence
    (findings,) = [d.findings for d in doc.sections if d.anchor == "findings"]
    (mine,) = [
        f for f in findings if f.rule == "plan.infeasible" and "sim_infeasible" in f.evidence
    ]
    assert mine.severity == "bad" and "random: infeasible" in mine.evidence
    assert "no simulated fleet meets the SLA" in md


def test_the_plain_plan_writes_a_result_and_gets_the_section(
    results: dict[str, Path], report: tuple[ReportDoc, str, str]
) -> None:
    doc, page, md = report
    met, bad = _load(results["plan_met"]), _load(results["plan_infeasible"])
    assert met.options is None and not met.runs and met.plan is not None and met.plan.feasible
    assert bad.plan is not None and not bad.plan.feasible
    assert met.command.startswith("kvferry plan --profile ") and met.started_at > 0

    s = _sub(doc, "plan_met")
    assert "Not simulated" in s.intro and not s.figures
    stages = _table(s, "Analytic plan per stage")
    assert met.plan.prefill is not None and met.plan.decode is not None
    assert _column(stages, "Predicted (ms)") == [
        fmt.num(met.plan.prefill.latency_ms), fmt.num(met.plan.decode.latency_ms)
    ]  # fmt: skip
    assert _column(stages, "Instances for the load") == [str(r.count) for r in met.plan.replicas]
    assert _column(stages, "SLA") == ["met", "met"]
    (only,) = _table(s, "The analytic plan").rows
    assert only[-1] == "met"

    s = _sub(doc, "plan_infeasible")
    assert _column(_table(s, "Analytic plan per stage"), "SLA")[0].startswith(
        "infeasible (closest), +"
    )
    verdict = _table(s, "The analytic plan").rows[0][-1]
    assert verdict.startswith("infeasible: TTFT ") and "closest: " in verdict
    assert "Analytic plan: infeasible: TTFT" in s.intro
    assert html.escape(verdict) in page and "the analytic plan finds the SLA infeasible" in md
