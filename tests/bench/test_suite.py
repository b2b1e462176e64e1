"""``kvferry bench all`` for real: the whole lab, ``--quick``, through argv into a temporary run
directory; every result file read back with ``load_result`` into its bench's report, the
figures there, the report built when this kvferry has the report builder (and then opened in a
real browser when chromium is here); a step that fails is recorded while the others' files
stay; bad flags are one error line. No timing is asserted."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from kvferry.bench.doctor import CHECKS, DoctorReport
from kvferry.bench.endpoint.harness import ServeBenchReport
from kvferry.bench.hitrate import HitRateReport
from kvferry.bench.result import load_result
from kvferry.bench.router.harness import RouterBenchReport
from kvferry.bench.store import StoreBenchReport
from kvferry.bench.suite import (
    MOONCAKE_HINT,
    QUICK,
    STEPS,
    SuiteOptions,
    SuiteProgress,
    mooncake_available,
    run,
)
from kvferry.bench.transfer import TransferBenchReport
from kvferry.cli.main import main
from kvferry.errors import ConfigError
from kvferry.testing.browser import MISSING_REASON, find_chromium, open_page

RESULTS = {
    "doctor.json": DoctorReport,
    "transfer.json": TransferBenchReport,
    "store-cpu.json": StoreBenchReport,
    "store-server.json": StoreBenchReport,
    "hitrate.json": HitRateReport,
    "serve.json": ServeBenchReport,
    "router.json": RouterBenchReport,
}
FIGURES = (
    "hitrate.png",
    "router.png",
    "serve/ttft_itl_vs_concurrency.png",
    "serve/throughput_vs_concurrency.png",
    "serve/pareto.png",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """One ``kvferry bench all --quick`` for every test of the module: (run dir, exit, stdout)."""
    out = tmp_path_factory.mktemp("lab") / "run"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main(["bench", "all", "--quick", "--quiet", "--out", str(out)])
    return out, rc, buffer.getvalue()


@pytest.mark.slow
def test_every_step_writes_a_result_that_loads(quick_run: tuple[Path, int, str]) -> None:
    out, rc, stdout = quick_run
    assert rc == 0, stdout
    results = {name: load_result(out / name) for name in RESULTS}
    for name, cls in RESULTS.items():
        assert type(results[name]) is cls, name
        assert results[name].command.startswith("kvferry bench all --quick"), name
    for name in FIGURES:
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name

    doctor = results["doctor.json"]
    assert isinstance(doctor, DoctorReport)
    assert [c.name for c in doctor.checks] == list(CHECKS)
    assert doctor.options.wakeup_samples == QUICK.doctor_wakeup_samples

    transfer = results["transfer.json"]
    assert isinstance(transfer, TransferBenchReport)
    assert transfer.options.transport == "tcp" and transfer.options.check_consistency
    assert {r.name for r in transfer.references} == {"socket_stream_1MiB", "memcpy_16MiB"}
    blocks = sorted({c.block_size for c in transfer.cases})
    assert blocks == [4096, 8192, 16384] and QUICK.transfer_max_block == 16384
    contenders = {c.backend for c in transfer.cases}
    if mooncake_available():
        assert contenders == {"kvferry", "mooncake"} and transfer.ratios
    else:
        assert contenders == {"kvferry"} and MOONCAKE_HINT in transfer.notes

    for name in ("store-cpu.json", "store-server.json"):
        store = results[name]
        assert isinstance(store, StoreBenchReport) and store.ok
        assert store.options.backend == name[len("store-") : -len(".json")]
        assert store.options.op == "batch-get"

    hitrate = results["hitrate.json"]
    assert isinstance(hitrate, HitRateReport)
    assert {(c.policy, c.tiers[0].capacity_blocks) for c in hitrate.cases} == {
        (p, c) for p in ("lru", "length-aware") for c in QUICK.hitrate_capacities
    }
    assert hitrate.reference_curve() and hitrate.reference_name() == "mooncake-fig9"

    serve = results["serve.json"]
    assert isinstance(serve, ServeBenchReport)
    assert [c.level.value for c in serve.cases] == list(QUICK.serve_concurrency)
    for level in serve.cases:
        assert level.metrics.request_count == QUICK.serve_requests
        assert level.metrics.error_count == 0
    assert serve.command.startswith("kvferry bench all --quick")

    router = results["router.json"]
    assert isinstance(router, RouterBenchReport)
    assert {(c.label, c.policy) for c in router.cases} == {("0.9", "kv"), ("0.9", "round-robin")}
    assert all(c.requests == QUICK.router_requests and c.errors == 0 for c in router.cases)

    # the summary names every step and what it wrote
    for step in STEPS:
        assert step in stdout
    assert "store-server.json" in stdout


@pytest.mark.slow
def test_the_run_ends_in_a_report(quick_run: tuple[Path, int, str]) -> None:
    out, rc, stdout = quick_run
    assert rc == 0
    html, md = out / "report.html", out / "report.md"
    assert html.stat().st_size > 0 and md.stat().st_size > 0
    assert "report: " in stdout and "report.html" in stdout
    text = md.read_text()
    # every step records the one command line: the setup names it once, for all seven runs
    rows = text.splitlines()
    (row,) = [r for r in rows if r.startswith("| ") and "kvferry bench all --quick" in r]
    assert all(name in row for name in RESULTS), row
    assert "not installed" not in _package_row(text, "vllm") or not _imports("vllm")


def _package_row(markdown: str, package: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith(f"| {package} "))


def _imports(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
# CI installs chromium (make test's system-deps): there a missing browser fails, not skips.
@pytest.mark.skipif(find_chromium() is None and not os.environ.get("CI"), reason=MISSING_REASON)
def test_the_report_opens_cleanly_in_a_real_browser(quick_run: tuple[Path, int, str]) -> None:
    out, _, _ = quick_run
    snap = open_page(out / "report.html")
    assert snap.console_errors == [] and snap.external_requests == []
    assert snap.images >= 1 and snap.images_loaded == snap.images
    assert len(snap.headings) >= 1 + len(STEPS)  # the title, then at least a section a bench
    text = snap.text.lower()
    for step in ("doctor", "transfer", "store", "hit", "serve", "router"):
        assert step in text, step
    snap.save_screenshot(out / "report.png")


def test_a_failed_step_is_recorded_and_its_files_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "serve").write_text("a file where the serve figures' directory goes")
    rc = main(["bench", "all", "--quick", "--quiet", "--only", "serve", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.strip().splitlines()[-1] == (
        "error: 1 step(s) failed: serve (see the table above)"
    )
    assert "Traceback" not in captured.err
    assert "FAILED: cannot create the artifact directory" in " ".join(captured.out.split())
    # the result was written before the figures failed, and no other step ran
    assert isinstance(load_result(out / "serve.json"), ServeBenchReport)
    assert not (out / "transfer.json").exists()


def test_progress_and_the_mooncake_note(tmp_path: Path) -> None:
    seen: list[SuiteProgress] = []
    options = SuiteOptions(
        out=tmp_path / "run", quick=True, steps=("transfer", "hitrate"), mooncake=False
    )
    result = run(options, seen.append)
    assert [s.name for s in result.steps] == ["transfer", "hitrate"]
    assert result.failed == []
    assert [p.name for p in result.results] == ["transfer.json", "hitrate.json"]
    assert {(p.step, p.index, p.steps) for p in seen} == {("transfer", 0, 2), ("hitrate", 1, 2)}
    assert any(p.total and p.done == p.total for p in seen if p.step == "hitrate")
    assert result.notes == [MOONCAKE_HINT]
    data = json.loads((tmp_path / "run" / "transfer.json").read_text())
    assert MOONCAKE_HINT in data["notes"]
    assert {c["backend"] for c in data["cases"]} == {"kvferry"}


def test_the_doctor_step_checks_the_machine_first(tmp_path: Path) -> None:
    result = run(SuiteOptions(out=tmp_path / "run", quick=True, steps=("hitrate", "doctor")))
    assert [s.name for s in result.steps] == ["doctor", "hitrate"]  # STEPS' order, doctor first
    assert result.failed == []
    doctor = load_result(tmp_path / "run" / "doctor.json")
    assert isinstance(doctor, DoctorReport) and len(doctor.checks) == len(CHECKS)
    assert doctor.config is not None and set(doctor.config.sources.values()) == {"default"}


def test_a_stale_file_of_an_earlier_run_is_not_kept(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "hitrate.png").write_bytes(b"not this run's")
    result = run(SuiteOptions(out=out, quick=True, steps=("hitrate",)))
    assert (out / "hitrate.png").read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in result.files] == ["hitrate.json", "hitrate.png"]


def test_bad_options_are_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="--only"):
        SuiteOptions(steps=("transfer", "nope"))
    rc = main(["bench", "all", "--only", "nope", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip() == (
        "error: --only 'nope' is invalid: must be one or more of doctor, transfer, store, "
        "hitrate, serve, router"
    )
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = main(["bench", "all", "--quick", "--quiet", "--out", str(blocker / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().startswith("error: --out") and err.strip().endswith("Not a directory")
