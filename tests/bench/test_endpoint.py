"""``kvferry bench serve`` end to end against a real ``kvferry serve mock`` process (and the
zero-delay server): sweeps, request counts, warm-up, exact ISL/OSL, trace prefix sharing seen
by the server, aiperf-named artifacts, and clear errors. No timing is asserted."""

from __future__ import annotations

import csv
import json
import socket
import sys
from collections.abc import Iterator
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from kvferry.bench.endpoint.harness import ServeBenchOptions, ServeBenchReport, parse_stream, run
from kvferry.bench.result import SCHEMA, load_result
from kvferry.cli.main import main
from kvferry.testing.mock_engine import MockServerProcess
from kvferry.testing.zero_server import ZeroServerProcess

FINISHED = 'kvferry_mock_requests_total{finish_reason="length"}'
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def server() -> Iterator[MockServerProcess]:
    # Decode steps of 0.7 ms: a request's tokens come in separate reads, so ITL and the
    # per-user throughput exist (at 1000, 7 us steps, a short answer arrives in one read).
    with MockServerProcess.start("--speedup-ratio", "10", "--max-model-len", "4096") as s:
        yield s


def finished(server: MockServerProcess) -> float:
    return server.metrics().get(FINISHED, 0.0)


def bench(*args: str) -> int:
    return main(["bench", "serve", "--quiet", *args])


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def test_concurrency_sweep(
    server: MockServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = finished(server)
    art = tmp_path / "art"
    rc = bench(
        "--url", server.url, "--concurrency", "1,2,4", "--request-count", "12",
        "--warmup-requests", "3", "--isl", "40", "--osl", "6", "--artifact-dir", str(art),
        "--json", str(tmp_path / "s.json"), "--goodput", "ttft:60000 itl:60000", "--plot",
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "concurrency 4" in out and f"artifacts: {art}" in out
    summary = load(tmp_path / "s.json")
    assert summary["model"] == "kvferry-mock" and summary["endpoint"] == "completions"
    levels = summary["levels"]
    assert [(lv["kind"], lv["value"]) for lv in levels] == [
        ("concurrency", 1),
        ("concurrency", 2),
        ("concurrency", 4),
    ]
    for lv in levels:
        m = lv["metrics"]
        assert lv["request_count"] == 12 and lv["error_request_count"] == 0
        assert m["input_sequence_length"]["min"] == m["input_sequence_length"]["max"] == 40
        assert m["output_sequence_length"]["min"] == m["output_sequence_length"]["max"] == 6
        assert m["usage_prompt_tokens"]["avg"] == 40 and m["usage_completion_tokens"]["avg"] == 6
        assert m["time_to_first_token"]["count"] == 12 and m["good_request_count"]["avg"] == 12
    # Warm-up requests reached the server but not the results: 1 preflight + 3 x (12 + 3).
    assert finished(server) - before == 1 + 3 * (12 + 3)

    level = art / "concurrency_2"
    lines = [json.loads(x) for x in (level / "profile_export.jsonl").read_text().splitlines()]
    # Warm-up requests are exported too, tagged (as aiperf tags them), not dropped.
    phases = [x["metadata"]["benchmark_phase"] for x in lines]
    assert phases == ["warmup"] * 3 + ["profiling"] * 12
    first = lines[3]
    meta, metrics = first["metadata"], first["metrics"]
    assert meta["worker_id"] == "worker_0"
    assert meta["request_start_ns"] < meta["request_ack_ns"] <= meta["request_end_ns"]
    assert metrics["input_sequence_length"] == {"value": 40, "unit": "tokens"}
    assert metrics["time_to_first_token"]["unit"] == "ms"
    assert len(metrics["inter_chunk_latency"]["value"]) == 5
    assert "error" not in first
    agg = load(level / "profile_export_aiperf.json")
    for tag in ("time_to_first_token", "inter_token_latency", "request_latency",
                "output_token_throughput_per_user", "inter_chunk_latency"):  # fmt: skip
        assert {"unit", "avg", "p1", "p25", "p50", "p99", "std", "count"} <= set(agg[tag])
    assert agg["request_count"] == {"unit": "requests", "avg": 12.0}
    assert agg["request_throughput"]["unit"] == "requests/sec"
    assert agg["output_token_throughput"]["unit"] == "tokens/sec"
    assert agg["total_osl"]["avg"] == 72 and agg["error_summary"] == []
    assert agg["input_config"]["endpoint"]["type"] == "completions"
    rows = (level / "profile_export_aiperf.csv").read_text().splitlines()
    assert rows[0] == "Metric,avg,min,max,sum,p1,p5,p10,p25,p50,p75,p90,p95,p99,std"
    assert any(r.startswith("Time to First Token (ms),") for r in rows)
    assert "Metric,Value" in rows and any(r.startswith("Request Count,12") for r in rows)
    sweep = list(csv.DictReader((art / "sweep_summary.csv").open()))
    assert [r["level"] for r in sweep] == ["concurrency_1", "concurrency_2", "concurrency_4"]
    assert load(art / "sweep_summary.json")["levels"][2]["artifact_dir"].endswith("concurrency_4")
    # Both summaries are results of the lab's model too, and read back into the report.
    assert summary["schema"] == SCHEMA and summary["tool"] == "serve"
    assert summary["environment"]["cpus"] >= 1 and summary["ended_at"] > summary["started_at"]
    for path in (tmp_path / "s.json", art / "sweep_summary.json"):
        report = load_result(path)
        assert isinstance(report, ServeBenchReport) and report.model == "kvferry-mock"
        assert [c.level.value for c in report.cases] == [1, 2, 4]
        assert report.options.goodput == {"time_to_first_token": 60000.0,
                                          "inter_token_latency": 60000.0}  # fmt: skip
        for case, lv in zip(report.cases, levels, strict=True):
            assert case.metrics.request_count == 12 and case.records == []
            ttft = case.metrics.metrics["time_to_first_token"]
            assert ttft.to_json() == lv["metrics"]["time_to_first_token"]
    for png in ("ttft_itl_vs_concurrency.png", "throughput_vs_concurrency.png", "pareto.png"):
        assert (art / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chat_at_a_request_rate_with_two_workers(server: MockServerProcess, tmp_path: Path) -> None:
    rc = bench(
        "--url", server.url, "--endpoint", "chat", "--request-rate", "100",
        "--arrival", "constant", "--duration", "0.3", "--isl", "30", "--osl", "4",
        "--workers", "2", "--use-server-token-count", "--artifact-dir", str(tmp_path),
    )  # fmt: skip
    assert rc == 0
    agg = load(tmp_path / "profile_export_aiperf.json")
    assert agg["request_count"]["avg"] == 30  # 0, 10, ..., 290 ms
    # Server counts: the chat template adds "<|user|>" and "<|assistant|>" (two words).
    assert agg["input_sequence_length"]["avg"] == 32
    assert agg["output_sequence_length"]["avg"] == 4
    assert agg["input_config"]["load"] == {
        "type": "request_rate",
        "value": 100.0,
        "arrival": "constant",
        "duration_s": 0.3,
        "warmup_requests": 0,
        "workers": 2,
    }
    records = [json.loads(line) for line in (tmp_path / "profile_export.jsonl").open()]
    assert {r["metadata"]["worker_id"] for r in records} == {"worker_0", "worker_1"}
    issued = sorted(r["metadata"]["credit_issued_ns"] for r in records)
    gaps = [b - a for a, b in pairwise(issued)]
    # the schedule's constant 10 ms, whichever worker sent them (not a timing assertion)
    assert min(gaps) == pytest.approx(10_000_000, abs=20_000)


def test_trace_replay_makes_the_server_hit_blocks(
    server: MockServerProcess, tmp_path: Path
) -> None:
    rows = [[0, 1], [0, 1], [0, 2], [3, 4], [0, 1], [3, 4]]
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "".join(
            json.dumps({"timestamp": 30 * i, "input_length": 1024, "output_length": 3,
                        "hash_ids": ids}) + "\n"
            for i, ids in enumerate(rows)
        )
    )  # fmt: skip
    server.post("/kv/clear", {})
    before = server.kv_stats()
    rc = bench("--url", server.url, "--trace", str(trace), "--artifact-dir", str(tmp_path / "a"))
    assert rc == 0
    after = server.kv_stats()
    # 1024 words = 64 mock blocks of 16; hits: 0, 64, 32 (id 0), 0, 64, 64. The preflight's
    # 8-word prompt fills no block.
    assert after["lookup_blocks"] - before["lookup_blocks"] == 6 * 64
    assert after["hit_blocks"] - before["hit_blocks"] == 64 + 32 + 64 + 64
    agg = load(tmp_path / "a" / "profile_export_aiperf.json")
    assert agg["request_count"]["avg"] == 6 and agg["output_sequence_length"]["avg"] == 3
    assert agg["usage_prompt_cache_read_tokens"]["sum"] == (64 + 32 + 64 + 64) * 16
    assert agg["input_config"]["load"]["type"] == "fixed_schedule"
    lines = (tmp_path / "a" / "profile_export.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["metadata"]["conversation_id"] == "line-2"


def test_input_file_prompts_are_sent_as_written_and_wrap(
    server: MockServerProcess, tmp_path: Path
) -> None:
    # Two distinct 64-word prompts (4 mock blocks each), the second asking for 2 tokens; five
    # requests send lines 1, 2, 1, 2, 1 in order, so the last three hit all 4 blocks.
    prompts = tmp_path / "p.jsonl"
    words = [f"w{i}" for i in range(128)]
    prompts.write_text(
        json.dumps({"text": " ".join(words[:64])}) + "\n\n"
        + json.dumps({"texts": [" ".join(words[64:100]), " ".join(words[100:])],
                      "output_length": 2}) + "\n"
    )  # fmt: skip
    server.post("/kv/clear", {})
    before = server.kv_stats()
    rc = bench(
        "--url", server.url, "--input-file", str(prompts), "--request-count", "5", "--osl", "3",
        "--artifact-dir", str(tmp_path / "a"),
    )  # fmt: skip
    assert rc == 0
    after = server.kv_stats()
    assert after["lookup_blocks"] - before["lookup_blocks"] == 5 * 4
    assert after["hit_blocks"] - before["hit_blocks"] == 3 * 4
    lines = [json.loads(x) for x in (tmp_path / "a" / "profile_export.jsonl").read_text().split()]
    sent = {r["metadata"]["session_num"]: r for r in lines}
    assert sorted(sent) == [0, 1, 2, 3, 4]
    assert [sent[i]["metadata"]["conversation_id"] for i in range(5)] == [
        "entry-1", "entry-2", "entry-1", "entry-2", "entry-1"
    ]  # fmt: skip
    assert [sent[i]["metrics"]["output_sequence_length"]["value"] for i in range(5)] == [
        3, 2, 3, 2, 3
    ]  # fmt: skip
    assert {r["metrics"]["input_sequence_length"]["value"] for r in lines} == {64}


def test_zero_delay_server_through_the_api() -> None:
    with ZeroServerProcess.start() as zero:
        report = run(
            ServeBenchOptions(url=zero.url, concurrency=(8,), request_count=200, isl=16, osl=4)
        )
    (level,) = report.cases
    assert report.model == "kvferry-zero"
    assert level.metrics.request_count == 200 and level.metrics.error_count == 0
    assert level.metrics.value("output_sequence_length", "min") == 4
    assert level.metrics.value("input_sequence_length", "max") == 16
    assert sorted(r.index for r in level.records) == list(range(200))
    # to_json -> JSON text -> load_result gives the same report, less the per-request records
    # (profile_export.jsonl holds those); the auth token is never written.
    data = json.loads(json.dumps(report.to_json()))
    assert data["tool"] == "serve" and "auth_token" not in data["options"]
    loaded = load_result(data)
    assert loaded == replace(report, cases=[replace(level, records=[], warmup_records=[])])
    assert loaded.cases[0].metrics.value("time_to_first_token", "p99") == level.metrics.value(
        "time_to_first_token", "p99"
    )


def test_a_summary_written_before_the_result_model_still_loads() -> None:
    """The old ``--json`` / ``sweep_summary.json``: the summary keys alone, no schema."""
    with ZeroServerProcess.start() as zero:
        report = run(ServeBenchOptions(url=zero.url, concurrency=(2, 4), request_count=20))
    old = {"schema_version": 1, **json.loads(json.dumps(report.summary()))}
    loaded = load_result(old)
    assert isinstance(loaded, ServeBenchReport)
    assert loaded.options.concurrency == (2, 4) and loaded.url == report.url
    assert [c.level for c in loaded.cases] == [c.level for c in report.cases]
    for new, was in zip(loaded.cases, report.cases, strict=True):
        assert new.metrics.request_count == was.metrics.request_count == 20
        for tag, stat in (("time_to_first_token", "p50"), ("request_throughput", "avg")):
            assert new.metrics.value(tag, stat) == was.metrics.value(tag, stat)
    assert loaded.environment.host == ""  # an old file says nothing of its machine


@pytest.mark.parametrize("name", ["serve_vs_aiperf.json", "serve_vs_aiperf_c1.json",
                                  "serve_vs_aiperf_rate4.json"])  # fmt: skip
def test_old_serve_vs_aiperf_results_load(name: str) -> None:
    old = load(RESULTS / name)
    report = load_result(RESULTS / name)
    assert isinstance(report, ServeBenchReport)
    assert len(report.cases) == len(old["runs"]["kvferry"]) == 3
    first = old["runs"]["kvferry"][0]["figures"]
    assert (
        report.cases[0].metrics.value("time_to_first_token", "p50")
        == (first["time_to_first_token p50"])
    )
    ttft = next(r for r in report.ratios if r.metric == "time_to_first_token p50")
    row = next(r for r in old["rows"] if r["metric"] == "time_to_first_token p50")
    assert ttft.rounds == pytest.approx([a / b for a, b in zip(row["kvferry"], row["aiperf"])])
    assert ttft.reference == "aiperf" and min(ttft.rounds) <= ttft.value <= max(ttft.rounds)
    again = load_result(json.loads(json.dumps(report.to_json())))
    assert again == report


def test_tables_keep_every_number_whole_in_a_narrow_terminal(server: MockServerProcess) -> None:
    from kvferry.bench.endpoint.metrics import parse_goodput
    from kvferry.cli.serve_bench_cmd import level_table, sweep_table
    from kvferry.tables import print_table
    from kvferry.testing.tables import assert_fits, narrow_console, printed

    options = ServeBenchOptions(
        url=server.url, concurrency=(1, 2), request_count=4, isl=40, osl=6,
        goodput=parse_goodput("ttft:60000 itl:60000"),
    )  # fmt: skip
    report = run(options)
    for width in (100, 80):
        _, dropped = assert_fits(sweep_table(report), width)
        assert {"req/s", "out tok/s", "TTFT p99", "ITL p99", "goodput"}.isdisjoint(dropped)
        _, dropped = assert_fits(level_table(report.cases[0]), width)
        assert {"avg", "p99", "p50"}.isdisjoint(dropped)
    console = narrow_console(80)
    print_table(console, sweep_table(report, wide=True))
    text = printed(console)
    assert "left out" not in text and "…" not in text and "tok/s/user" in text
    assert max(len(line) for line in text.splitlines()) > 80


def test_every_plot_names_the_run(
    server: MockServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    import datetime
    import platform

    from matplotlib.figure import Figure

    from kvferry.bench.endpoint.export import plot_sweep
    from kvferry.bench.plots import IDENTITY_GID

    saved: list[Figure] = []
    savefig = Figure.savefig

    def keep(fig: Figure, *args: Any, **kwargs: Any) -> None:  # the real savefig, remembered
        saved.append(fig)
        savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    options = ServeBenchOptions(url=server.url, concurrency=(1, 2), request_count=4, isl=40, osl=6)
    report = run(options)
    run_dir = tmp_path / "my-run"
    written = plot_sweep(report, run_dir)
    assert len(saved) == len(written) == 3
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    for fig in saved:
        (text,) = [t.get_text() for t in fig.texts if t.get_gid() == IDENTITY_GID]
        text = " ".join(text.split())
        assert f"kvferry bench serve, run my-run: kvferry-mock at {server.url}" in text
        assert "synthetic isl 40, osl 6; concurrency 1, 2;" in text
        assert today in text and platform.node() in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concurrency", "0"], "--concurrency values must be whole numbers >= 1, got '0'"),
        (["--concurrency", "1,x"], "--concurrency values must be whole numbers >= 1"),
        (["--request-rate", "5", "--concurrency", "1,2"], "give one value, got 1,2"),
        (["--trace", "/nonexistent/t.jsonl"], "cannot open trace '/nonexistent/t.jsonl'"),
        (["--goodput", "ttfb:5"], "unknown metric 'ttfb'"),
        (["--duration", "soon"], "--duration: expected a duration"),
        (["--extra-body", "[1]"], "--extra-body must be a JSON object"),
        (["--url", "localhost:8000"], "--url must be http://HOST:PORT"),
        (["--tokenizer", "/nonexistent/tok"], "no such file or directory"),
        (["--input-file", "/nonexistent/p.jsonl"], "--input-file '/nonexistent/p.jsonl': No such"),
        (["--input-file", "p", "--trace", "t"], "not allowed with argument"),
    ],
)
def test_bad_flags_are_clear_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench(*args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unreachable_server_and_wrong_model(
    server: MockServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _free_port()
    assert bench("--url", f"http://127.0.0.1:{port}") == 2
    err = capsys.readouterr().err
    assert f"error: cannot reach http://127.0.0.1:{port}" in err and "check --url" in err
    assert "Traceback" not in err
    assert bench("--url", server.url, "--model", "gpt-9") == 2
    err = capsys.readouterr().err
    assert "the test request to" in err and "HTTP 404" in err and "gpt-9" in err


def test_parse_stream() -> None:
    role = b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
    a = b'data: {"choices":[{"delta":{"content":" one"}}]}\n\n'
    b = b'data: {"choices":[{"delta":{"content":" two"}}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
    # b's event is split across two reads: it gets the time of the read that completed it.
    result = parse_stream([(1, role + a + b[:10]), (2, b[10:] + usage), (3, b"data: [DONE]\n\n")])
    assert result.chunk_ns == [1, 2] and result.texts == [" one", " two"]
    assert result.usage == {"prompt_tokens": 5, "completion_tokens": 2} and result.done
    crlf = parse_stream([(7, b'data: {"choices":[{"text":"x"}]}\r\n\r\n')])
    assert crlf.chunk_ns == [7] and crlf.texts == ["x"]
    whole = parse_stream([(4, b'{"choices":[{"message":{"content":"hi there"}}]}')])
    assert whole.chunk_ns == [4] and whole.texts == ["hi there"]
    error = parse_stream([(5, b'data: {"error":{"message":"aborted","code":503}}\n\n')])
    assert error.error == "aborted" and not error.chunk_ns
    think = b'data: {"choices":[{"delta":{"reasoning_content":"hmm"}}]}\n\n'
    split = parse_stream([(1, think), (2, a), (3, b"data: [DONE]\n\n")])
    assert split.chunk_ns == [1, 2] and split.first_output_ns == 2 and split.last_ns == 3
    assert split.texts == ["", " one"] and split.reasoning == ["hmm", ""]


def test_plots_without_matplotlib_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvferry.bench.endpoint.export import require_matplotlib
    from kvferry.errors import MissingDependency

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(MissingDependency, match=r"pip install 'kvferry\[plot\]'"):
        require_matplotlib()
