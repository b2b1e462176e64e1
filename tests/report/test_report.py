"""``kvferry report`` (kvferry/report/): reports built from the recorded results of every bench
kind in benchmarks/results/ and from a real short run made here, read back from the document,
the HTML page and the Markdown file; bad input through argv."""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvferry.bench.endpoint.harness import ServeBenchReport
from kvferry.bench.hitrate import HitRateOptions, HitRateReport
from kvferry.bench.hitrate import run as run_hitrate
from kvferry.bench.result import BenchResult, load_result
from kvferry.bench.router.harness import RouterBenchReport
from kvferry.bench.store.report import StoreBenchReport
from kvferry.bench.transfer import TransferBenchOptions, TransferBenchReport
from kvferry.bench.transfer import run as run_transfer
from kvferry.cli.main import main
from kvferry.report import fmt
from kvferry.report.build import build_report
from kvferry.report.html import render_html, write_html
from kvferry.report.markdown import write_markdown
from kvferry.report.model import Figure, ReportDoc, Section, Table

pytest.importorskip("matplotlib")

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

# One recorded result of each kind, with what each exercises: two contenders and the same-run
# references (transfer), a timed get phase (store), a reference curve and a policy sweep
# (hitrate), aiperf references and per-round ratios (serve), a prefix-ratio sweep (router).
RECORDED = {
    "transfer": ["tcp_1m16.json", "gpu/h200_large-DRAM.json"],
    "store": ["store_cpu_4k.json", "store_server_tcp.json"],
    "hitrate": ["hitrate_fig9_store.json"],
    "serve": ["serve_vs_aiperf.json"],
    "router": ["router_mock.json"],
}
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def figures(sections: list[Section]) -> list[Figure]:
    out: list[Figure] = []
    for s in sections:
        out += s.figures + figures(s.subsections)
    return out


def section(doc: ReportDoc, anchor: str) -> Section:
    (found,) = [s for s in doc.sections if s.anchor == anchor]
    return found


def table(s: Section, title: str) -> Table:
    (found,) = [t for t in s.tables if t.title == title]
    return found


def column(t: Table, name: str) -> list[str]:
    i = t.columns.index(name)
    return [row[i] for row in t.rows]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReportDoc, Path, Path]:
    """The report of the recorded results, written as HTML and Markdown."""
    paths = [RESULTS / name for names in RECORDED.values() for name in names]
    doc = build_report(paths)
    out = tmp_path_factory.mktemp("recorded")
    write_html(doc, out / "report.html")
    write_markdown(doc, out / "report.md")
    return doc, out / "report.html", out / "report.md"


def loaded(name: str) -> BenchResult:
    return load_result(RESULTS / name)


def test_every_bench_kind_has_a_section_with_one_subsection_per_result(
    recorded: tuple[ReportDoc, Path, Path],
) -> None:
    doc, _, _ = recorded
    anchors = [s.anchor for s in doc.sections]
    assert anchors == [
        "headline",
        "setup",
        "findings",
        "transfer",
        "store",
        "hitrate",
        "serve",
        "router",
        "sources",
    ]
    for kind, names in RECORDED.items():
        titles = [s.title for s in section(doc, kind).subsections]
        assert titles == [Path(n).name for n in names], kind
    assert doc.sources == [str(RESULTS / n) for names in RECORDED.values() for n in names]


def test_transfer_tables_hold_the_results_numbers(recorded: tuple[ReportDoc, Path, Path]) -> None:
    doc, _, _ = recorded
    result = loaded("tcp_1m16.json")
    assert isinstance(result, TransferBenchReport)
    sub = section(doc, "transfer").subsections[0]
    cases = table(sub, "Cases")
    assert column(cases, "BW (GB/s)") == [fmt.num(c.bw_gbps, 4) for c in result.cases]
    assert column(cases, "P99 Tx (us)") == [fmt.num(c.transfer_us.p99) for c in result.cases]
    assert column(cases, "Contender") == ["kvferry", "mooncake"]
    refs = table(sub, "References measured in the same run")
    assert column(refs, "Value") == [fmt.num(r.value, 4) for r in result.references]
    # five block sizes in the GPU run: one BW/P99 figure; one block size in the other: none
    assert [len(s.figures) for s in section(doc, "transfer").subsections] == [0, 1]


def test_store_hitrate_serve_router_tables_hold_the_results_numbers(
    recorded: tuple[ReportDoc, Path, Path],
) -> None:
    doc, _, _ = recorded
    store = loaded("store_cpu_4k.json")
    assert isinstance(store, StoreBenchReport)
    phases = table(section(doc, "store").subsections[0], "Phases")
    assert column(phases, "Ops/s") == [fmt.num(p.ops_per_s) for p in store.phases]
    assert column(phases, "P99 (us)") == [fmt.num(p.latency_us.p99) for p in store.phases]

    hit = loaded("hitrate_fig9_store.json")
    assert isinstance(hit, HitRateReport)
    cases = table(section(doc, "hitrate").subsections[0], "Cases")
    assert column(cases, "Block hit rate") == [fmt.pct(r.block_hit_rate) for r in hit.cases]
    assert column(cases, "Per-request mean") == [
        fmt.pct(r.request_mean_hit_rate) for r in hit.cases
    ]

    serve = loaded("serve_vs_aiperf.json")
    assert isinstance(serve, ServeBenchReport)
    levels = table(section(doc, "serve").subsections[0], "Levels")
    assert column(levels, "TTFT p50 (ms)") == [
        fmt.num(c.metrics.value("time_to_first_token", "p50")) for c in serve.cases
    ]
    ratios = table(section(doc, "serve").subsections[0], "Ratios")
    assert column(ratios, "Value") == [fmt.ratio(r.value) for r in serve.ratios]

    router = loaded("router_mock.json")
    assert isinstance(router, RouterBenchReport)
    runs = table(section(doc, "router").subsections[0], "Runs (one per load and policy)")
    assert column(runs, "TTFT p50 (ms)") == [fmt.num(r.ttft_p50_ms) for r in router.cases]
    assert column(runs, "Hit rate (workers)") == [fmt.pct(r.hit_rate) for r in router.cases]


def test_figure_count_and_every_figure_is_a_png(recorded: tuple[ReportDoc, Path, Path]) -> None:
    doc, _, _ = recorded
    found = figures(doc.sections)
    # transfer: the GPU sweep (5 block sizes); store: 2 runs; hitrate: 1; serve: one level,
    # no curve; router: 1
    assert [f.name for f in found] == [
        "transfer-1-bw-p99",
        "store-0-phases",
        "store-1-phases",
        "hitrate-0-curve",
        "router-0-policies",
    ]
    assert all(f.png.startswith(b"\x89PNG\r\n\x1a\n") for f in found)
    assert len({f.name for f in found}) == len(found)


def test_the_html_page_is_self_contained(recorded: tuple[ReportDoc, Path, Path]) -> None:
    doc, page, _ = recorded
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert "@import" not in text and "url(" not in text
    images = re.findall(r'<img src="([^"]+)"', text)
    assert len(images) == len(figures(doc.sections))
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    # a table of contents linking every section, and the headings it links to
    for s in doc.sections:
        assert f'href="#{s.anchor}"' in text and f'id="{s.anchor}"' in text
    assert "overflow-x: auto" in text  # wide tables scroll in their box, not the page


def test_the_markdown_links_figures_written_beside_it(
    recorded: tuple[ReportDoc, Path, Path],
) -> None:
    doc, _, md = recorded
    text = md.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == len(figures(doc.sections))
    for link in links:
        assert link.startswith("report_files/") and not link.startswith("/")
        assert (md.parent / link).read_bytes().startswith(b"\x89PNG")
    for s in doc.sections:
        assert f'<a id="{s.anchor}"></a>' in text


def test_the_headline_names_its_units_and_sources(recorded: tuple[ReportDoc, Path, Path]) -> None:
    doc, _, _ = recorded
    head = table(section(doc, "headline"), "Headline numbers")
    rows = {row[0]: row for row in head.rows}
    router = loaded("router_mock.json")
    assert isinstance(router, RouterBenchReport)
    kv = sorted(
        r.value for r in router.ratios if r.subject == "kv" and r.metric.startswith("time_to")
    )
    median = kv[len(kv) // 2] if len(kv) % 2 else (kv[len(kv) // 2 - 1] + kv[len(kv) // 2]) / 2
    assert rows["router kv / round-robin TTFT p50"][1] == fmt.ratio(median)
    assert rows["router kv / round-robin TTFT p50"][3].startswith("router_mock.json")
    transfer = loaded("tcp_1m16.json")
    assert isinstance(transfer, TransferBenchReport)
    best = max((c for c in transfer.cases if c.backend == "kvferry"), key=lambda c: c.bw_gbps)
    (peak,) = [
        r for r in head.rows if r[0] == "transfer peak bandwidth (kvferry)" and "tcp_1m16" in r[3]
    ]
    assert peak[1] == f"{fmt.num(best.bw_gbps)} GB/s"
    definitions = column(table(section(doc, "headline"), "Definitions"), "Term")
    assert {"GB, GB/s", "percentiles (p50, p99, p99.9)", "block hit rate"} <= set(definitions)
    # the numbers printed after a run: one result of each kind, each named by its run
    printed = {label.rsplit("[", 1)[1].rstrip("]") for label, _ in doc.headline}
    assert printed == {Path(names[0]).name for names in RECORDED.values()}


def test_findings_follow_from_rows_of_the_results(recorded: tuple[ReportDoc, Path, Path]) -> None:
    doc, _, _ = recorded
    found = section(doc, "findings").findings
    router = loaded("router_mock.json")
    assert isinstance(router, RouterBenchReport)
    worse = [r for r in router.ratios if r.subject == "kv" and r.metric.startswith("time_to")]
    worse = [r for r in worse if r.value >= 1.0]
    (routing,) = [f for f in found if f.title.startswith("kv routing does not beat")]
    for r in worse:
        assert f"load {r.case}: kv / round-robin TTFT p50 {fmt.ratio(r.value)}" in routing.evidence
    # a hit-rate file of before the distinct-block count: no ceiling, so no ceiling finding
    assert not [f for f in found if "ceiling" in f.title]
    assert all(f.evidence and f.detail for f in found)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory from real short runs: a transfer sweep with the same-run references, a
    hit-rate sweep on the bundled trace, a file of another tool and a copy of the transfer
    result in a sub-directory."""
    out = tmp_path_factory.mktemp("run")
    transfer = run_transfer(
        TransferBenchOptions(
            start_block_size=4096,
            max_block_size=16384,
            total_buffer_size=1 << 20,
            duration=0.05,
            warmup=0.02,
            reference=True,
        )
    )
    transfer.notes.append(HOSTILE)
    transfer.write(out / "transfer.json")
    hit = run_hitrate(
        HitRateOptions(
            trace="mooncake-synthetic", capacities=[500, 5000, 100_000], policies=["lru"], jobs=1
        )
    )
    hit.write(out / "hitrate.json")
    (out / "aiperf").mkdir()
    (out / "aiperf" / "profile_export_aiperf.json").write_text(json.dumps({"records": []}))
    shutil.copy(out / "transfer.json", out / "aiperf" / "transfer_copy.json")
    return out


def test_a_real_run_directory_makes_a_report(run_dir: Path, tmp_path: Path) -> None:
    doc = build_report([run_dir])
    transfer = load_result(run_dir / "transfer.json")
    assert isinstance(transfer, TransferBenchReport)
    assert [s.anchor for s in doc.sections][3:5] == ["transfer", "hitrate"]
    sub = section(doc, "transfer").subsections[0]
    assert column(table(sub, "Cases"), "BW (GB/s)") == [
        fmt.num(c.bw_gbps, 4) for c in transfer.cases
    ]
    assert [r.name for r in transfer.references] == ["socket_stream_1MiB", "memcpy_16MiB"]
    assert len(sub.figures) == 1  # three block sizes
    # the setup names this machine and checkout, as the result recorded them
    runs = table(section(doc, "setup"), "Runs")
    env = transfer.environment
    assert [r[0] for r in runs.rows] == ["transfer.json", "hitrate.json"]  # the order they ran
    assert runs.rows[0][4] == env.host and runs.rows[0][2] == fmt.utc(transfer.started_at)
    if env.git_commit:
        assert runs.rows[0][5].startswith(env.git_commit[:12])
    # the other tool's file and the copy of the same run: skipped and listed, not errors
    skipped = table(section(doc, "sources"), "Files skipped (not kvferry results)")
    reasons = dict(skipped.rows)
    assert 'no "tool" field' in reasons[str(run_dir / "aiperf" / "profile_export_aiperf.json")]
    assert "the same run as transfer.json" in reasons[str(run_dir / "aiperf/transfer_copy.json")]
    # the hit-rate result records its distinct blocks: the ceiling is measured at 100,000
    hit = load_result(run_dir / "hitrate.json")
    assert isinstance(hit, HitRateReport) and hit.distinct_blocks
    ceiling_row = [r for r in table(section(doc, "headline"), "Headline numbers").rows
                   if r[0] == "trace reuse ceiling (block-weighted)"]  # fmt: skip
    full = [c for c in hit.cases if (c.capacity_blocks or 0) >= hit.distinct_blocks]
    assert ceiling_row[0][1] == fmt.pct(max(c.block_hit_rate for c in full))


def test_strings_from_results_are_escaped(run_dir: Path, tmp_path: Path) -> None:
    doc = build_report([run_dir / "transfer.json"])
    assert HOSTILE in section(doc, "transfer").subsections[0].intro
    page = render_html(doc)
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    write_markdown(doc, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    assert "<script" not in md and "&lt;script&gt;" in md


def test_the_cli_writes_both_files_and_prints_the_headline(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    html, md = tmp_path / "out.html", tmp_path / "out.md"
    assert main(["report", str(run_dir), "-o", str(html), "--md", str(md)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"report: {html}", f"markdown: {md}"]
    assert any(line.startswith("  transfer peak bandwidth (kvferry) [transfer.json]: ")
               for line in out)  # fmt: skip
    assert html.read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "out_files" / "transfer-0-bw-p99.png").exists()


@pytest.fixture
def bad_inputs(tmp_path: Path) -> Iterator[dict[str, Path]]:
    newer = json.loads((RESULTS / "router_mock.json").read_text())
    doc = load_result(RESULTS / "store_cpu_4k.json").to_json()
    doc["schema_version"] = 99
    (tmp_path / "newer.json").write_text(json.dumps(doc))
    (tmp_path / "dir_newer").mkdir()
    (tmp_path / "dir_newer" / "a.json").write_text(json.dumps(doc))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.json").write_text(json.dumps(newer["args"]))
    yield {
        "missing": tmp_path / "missing.json",
        "other tool": RESULTS / "vllm_ttft.json",
        "newer schema": tmp_path / "newer.json",
        "newer schema in a directory": tmp_path / "dir_newer",
        "directory without results": tmp_path / "empty",
    }


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "cannot read"),
        ("other tool", 'no "tool" field'),
        ("newer schema", "newer than this kvferry reads"),
        ("newer schema in a directory", "newer than this kvferry reads"),
        ("directory without results", "no kvferry result in this directory"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(
    case: str,
    message: str,
    bad_inputs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "never.html"
    assert main(["report", str(bad_inputs[case]), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert str(bad_inputs[case]) in err[0]
    assert not out.exists()


def test_unwritable_output_and_bad_flags_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = str(RESULTS / "router_mock.json")
    assert main(["report", result, "-o", str(tmp_path / "no" / "dir" / "r.html")]) == 2
    assert "cannot write the report" in capsys.readouterr().err
    assert main(["report", result, "--noise-band", "2"]) == 2
    assert "--noise-band" in capsys.readouterr().err
    assert main(["report", result, "--fail-on-regression", "-o", str(tmp_path / "r.html")]) == 2
    assert "needs --compare" in capsys.readouterr().err


def test_transfer_ratios_read_one_row_per_case_with_sizes_and_round_ranges() -> None:
    result = loaded("tcp_1m16_session12_rounds8_run1.json")
    assert isinstance(result, TransferBenchReport) and result.ratios
    doc = build_report([RESULTS / "tcp_1m16_session12_rounds8_run1.json"])
    ratios = table(section(doc, "transfer").subsections[0], "Ratios between contenders, per case")
    bw = [r for r in result.ratios if r.metric == "bw_gbps"]
    assert len(ratios.rows) == len(bw)  # BW and P99 of a case share a row
    assert column(ratios, "Case (block x batch x threads)")[0] == "1 MiB x 16 x 1"
    assert column(ratios, "BW ratio (higher better)") == [fmt.ratio(r.value) for r in bw]
    lo, hi = bw[0].spread
    assert column(ratios, "BW range")[0] == f"{fmt.ratio(lo)} - {fmt.ratio(hi)}"
    assert "Median of 8 alternating rounds" in (ratios.note or "")
