"""``kvferry plan --profile DIR --simulate``: fleets of mocks calibrated from a real profile of a
mock, behind the router, at a load. What is asserted does not hang on this machine's speed: an
SLA every fleet meets (the first fleet of each mode is the answer), one none can meet (every
fleet is tried, 'infeasible', --strict), the result's JSON, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvferry.bench.profile.simulate import SimulationReport
from kvferry.bench.result import load_result
from kvferry.cli.main import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def profile_dir(mock_profile_dir: Path) -> Path:
    """The session's real profile of a mock (tests/conftest.py)."""
    return mock_profile_dir


def _plan(profile: Path, *flags: str) -> list[str]:
    return [
        "plan", "--profile", str(profile), "--simulate", "--request-rate", "2", "--isl", "300",
        "--osl", "8", "--speedup-ratio", "5", "--sim-requests", "12", "--quiet", *flags,
    ]  # fmt: skip


def test_a_generous_sla_is_met_by_one_instance_per_mode(
    profile_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sim.json"
    flags = ("--ttft", "1e6", "--itl", "1e6", "--max-instances", "2", "--json", str(out))
    rc = main(_plan(profile_dir, *flags))
    text = capsys.readouterr().out
    assert rc == 0, text
    report = load_result(json.loads(out.read_text()))
    assert isinstance(report, SimulationReport)
    assert [(r.mode, r.instances, r.meets) for r in report.runs] == [
        ("kv", 1, True),
        ("round-robin", 1, True),
    ]
    for r in report.runs:
        # the router saw the 12 and the endpoint bench's test request before them
        assert r.requests == 12 and r.errors == 0 and r.requests_per_instance == [13]
        assert r.metrics is not None and r.ttft_p50_ms is not None and r.itl_p50_ms is not None
        # scaled back: engine time = (measured - overhead) x 5
        raw = r.metrics.value("time_to_first_token", "p50")
        assert raw is not None
        assert r.ttft_p50_ms == pytest.approx(max(0.0, raw - report.overhead_ttft_ms) * 5)
    assert report.plan is not None and report.plan.feasible  # the analytic plan, kept beside
    assert "kv: 1 instance(s) meet" in text and "round-robin: 1 instance(s) meet" in text
    assert "simulated fleets: simprofile" in text and "SLA met" in text

    # --all-fleets: every size, though the first meets the SLA
    flags = ("--ttft", "1e6", "--itl", "1e6", "--router-modes", "round-robin",
             "--max-instances", "2", "--all-fleets", "--json", "-")  # fmt: skip
    assert main(_plan(profile_dir, *flags)) == 0
    every = load_result(json.loads(capsys.readouterr().out))
    assert isinstance(every, SimulationReport)
    assert [(r.instances, r.meets) for r in every.runs] == [(1, True), (2, True)]
    assert every.smallest("round-robin") is every.runs[0]


def test_an_sla_no_fleet_meets_tries_every_size_and_says_infeasible(
    profile_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ("--ttft", "0.001", "--itl", "0.001", "--router-modes", "random",
             "--max-instances", "2", "--strict", "--json", "-")  # fmt: skip
    rc = main(_plan(profile_dir, *flags))
    report = load_result(json.loads(capsys.readouterr().out))
    assert rc == 1 and isinstance(report, SimulationReport)
    assert [(r.mode, r.instances, r.meets) for r in report.runs] == [
        ("random", 1, False),
        ("random", 2, False),
    ]
    assert sum(report.runs[1].requests_per_instance) == 13
    assert report.lines()[0].startswith("random: infeasible: no fleet of up to 2 instance(s)")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--router-modes", "kv,fastest"), "unknown mode 'fastest'"),
        (("--max-instances", "0"), "--max-instances must be 1..64"),
        (("--isl", "5000"), "exceeds the profiled engine's max context 2048"),
    ],
)
def test_bad_simulation_input_is_one_clear_error(
    profile_dir: Path, flags: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*_plan(profile_dir, "--ttft", "1", "--itl", "1"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_simulate_needs_one_profile_and_the_load(
    profile_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["plan", "--profile", str(profile_dir), "--ttft", "1", "--itl", "1", "--simulate"]
    assert main(args) == 2
    assert "needs the load" in capsys.readouterr().err
    assert main([*args, "--profile", str(profile_dir)]) == 2
    assert "give one --profile" in capsys.readouterr().err
