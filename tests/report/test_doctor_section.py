"""The doctor's part of the report (kvferry/report/doctor.py): a doctor result written to disk
and read back, beside a recorded store result: its section comes before the benches', its WARN
and FAIL checks are findings with the check as evidence (the FAIL first), its counts are
headline numbers, and its text is escaped in the HTML page."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvferry.bench.doctor import CheckResult, DoctorReport
from kvferry.report.build import build_report
from kvferry.report.html import write_html
from kvferry.report.markdown import write_markdown

pytest.importorskip("matplotlib")

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
HOSTILE = '<script>alert("x")</script>'


def doctor_result(path: Path) -> Path:
    report = DoctorReport(
        checks=[
            CheckResult("somaxconn", "OK", "4096", ">= 1088", "why somaxconn", ""),
            CheckResult(
                "nofile", "WARN", "20000 (hard 20000)", ">= 65536", "why nofile", "ulimit -n 65536"
            ),
            CheckResult(
                "redis",
                "FAIL",
                f"redis.url: unreachable {HOSTILE}",
                "reachable",
                "why redis",
                "start Redis",
            ),
            CheckResult("gpu", "SKIP", "no NVIDIA GPU", "pinned H2D >= 20 GB/s", "why gpu", ""),
        ],
        measurements={"wakeup_p50_us": 17.5, "suggested_grace_period_ns": 20000.0},
        command="kvferry doctor --json doctor.json",
    )
    report.write(path)
    return path


def test_doctor_section_findings_and_headlines(tmp_path: Path) -> None:
    doc = build_report([doctor_result(tmp_path / "doctor.json"), RESULTS / "store_cpu_4k.json"])
    anchors = [s.anchor for s in doc.sections]
    assert anchors == ["headline", "setup", "findings", "doctor", "store", "sources"]
    (doctor,) = [s for s in doc.sections if s.anchor == "doctor"]
    (sub,) = doctor.subsections
    assert "1 OK, 1 WARN, 1 FAIL, 1 SKIP" in sub.intro
    assert "kvferry doctor --json doctor.json" in sub.intro  # the command line, recorded
    checks, measured = sub.tables
    assert [row[:2] for row in checks.rows] == [
        ["somaxconn", "OK"], ["nofile", "WARN"], ["redis", "FAIL"], ["gpu", "SKIP"]
    ]  # fmt: skip
    assert ["wakeup_p50_us", "17.5"] in measured.rows

    (findings,) = [s for s in doc.sections if s.anchor == "findings"]
    mine = [f for f in findings.findings if f.title.startswith("doctor check ")]
    assert [(f.title, f.severity) for f in mine] == [
        ("doctor check redis", "bad"),
        ("doctor check nofile", "warn"),
    ]
    assert mine[1].evidence == ("doctor.json: nofile = 20000 (hard 20000) (threshold: >= 65536)")
    assert mine[1].recommendation == "ulimit -n 65536" and mine[1].detail == "why nofile"

    (headline,) = [s for s in doc.sections if s.anchor == "headline"]
    rows = {row[0]: row[1] for row in headline.tables[0].rows}
    assert rows["doctor checks FAIL"] == "1" and rows["doctor checks WARN"] == "1"

    write_html(doc, tmp_path / "report.html")
    write_markdown(doc, tmp_path / "report.md")
    html = (tmp_path / "report.html").read_text()
    assert HOSTILE not in html and "&lt;script&gt;" in html
    assert "Host checks (doctor)" in (tmp_path / "report.md").read_text()
