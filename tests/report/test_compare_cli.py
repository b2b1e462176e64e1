"""``kvferry report RUN --compare BASE`` end to end through argv: the comparison section in the
page, one line per regression, and ``--fail-on-regression``'s exit status."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvferry.cli.main import main

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
BASE = RESULTS / "aa_transfer_tcp_run1.json"


def _scaled(tmp_path: Path, factor: float) -> Path:
    """A copy of BASE whose bandwidth, every round of every case, is ``factor`` times BASE's."""
    doc = json.loads(BASE.read_text())
    for case in doc["cases"]:
        case["bw_gbps"] *= factor
        case["round_bw_gbps"] = [x * factor for x in case["round_bw_gbps"]]
    path = tmp_path / f"head_x{factor:g}.json"
    path.write_text(json.dumps(doc))
    return path


def _report(tmp_path: Path, head: Path, *flags: str) -> list[str]:
    return [str(head), "-o", str(tmp_path / "r.html"), "--compare", str(BASE), *flags]


def test_a_run_against_itself_is_within_noise_and_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["report", *_report(tmp_path, BASE, "--fail-on-regression")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "regression:" not in out
    (summary,) = [line for line in out.splitlines() if line.startswith("compare: ")]
    # the same file on both sides: every metric of every case is within noise
    found = re.fullmatch(
        r"compare: (\d+) metric\(s\) of matched cases: (\d+) within noise", summary
    )
    assert found and found[1] == found[2] != "0", summary
    page = (tmp_path / "r.html").read_text()
    assert "Comparison: head against base" in page
    assert "within noise" in page and ">worse<" not in page


def test_a_slower_head_is_a_regression_and_fails_only_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head = _scaled(tmp_path, 0.5)
    rc = main(["report", *_report(tmp_path, head)])
    out = capsys.readouterr().out
    assert rc == 0, "without --fail-on-regression a regression is reported, not failed"
    lines = [line for line in out.splitlines() if line.startswith("regression: ")]
    # every case's bandwidth halved: a regression wherever the case's rounds-derived band is
    # narrower than that (this A/A file's noisiest cases have bands over +-50%)
    cases = json.loads(BASE.read_text())["cases"]
    assert len(cases) // 2 <= len(lines) <= len(cases), out
    assert all("BW" in line and "x0.500" in line for line in lines), lines
    assert f"{len(lines)} worse" in out  # the summary counts what the lines list
    assert main(["report", *_report(tmp_path, head, "--fail-on-regression")]) == 1


def test_a_faster_head_is_better_and_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head = _scaled(tmp_path, 2.0)
    assert main(["report", *_report(tmp_path, head, "--fail-on-regression")]) == 0
    assert "regression:" not in capsys.readouterr().out
    assert ">better<" in (tmp_path / "r.html").read_text()


def test_fail_on_regression_needs_a_base(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["report", str(BASE), "-o", str(tmp_path / "r.html"), "--fail-on-regression"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: --fail-on-regression needs --compare BASE_RUN"]


def test_a_missing_base_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["report", str(BASE), "-o", str(tmp_path / "r.html"), "--compare", "/nope.json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: cannot read /nope.json")
