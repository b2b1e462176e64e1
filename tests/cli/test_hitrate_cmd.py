"""``kvferry bench hitrate`` end to end: sweep, outputs, workload input, replay, advice, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kvferry.cli.main import main


def test_sweep_writes_json_csv_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    table = tmp_path / "r.csv"
    png = tmp_path / "r.png"
    rc = main(
        [
            "bench", "hitrate", "--trace", "mooncake-synthetic", "--policy", "lru,fifo",
            "--capacity", "1953,9765", "--model-kv", "32,8,128,bf16", "--json", str(out),
            "--csv", str(table), "--plot", str(png), "--reference", "mooncake-fig9",
            "--plot-weighting", "token", "--prefill-tokens-per-s", "10000", "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["schema_version"] == 1 and report["blocks"] == 121877
    assert report["tool"] == "hitrate" and report["environment"]["cpus"] > 0
    assert (
        report["command"].startswith("kvferry bench hitrate ")
        and "--capacity 1953,9765" in report["command"]
    )
    assert [(r["policy"], r["capacity_blocks"]) for r in report["cases"]] == [
        ("lru", 1953), ("lru", 9765), ("fifo", 1953), ("fifo", 9765),
    ]  # fmt: skip
    # LRU over one tier is counted by the stack pass, FIFO by its policy driven directly
    assert [r["engine"] for r in report["cases"]] == ["stack", "stack", "direct", "direct"]
    lru = report["cases"][1]
    assert lru["capacity_bytes"] == 9765 * 131072 * 512
    assert abs(lru["token_hit_rate"] - 0.4352) < 0.02  # Figure 9 at 5e6 tokens
    assert lru["prefill_seconds_saved"] == pytest.approx(lru["hit_tokens"] / 10000)
    assert [r["name"] for r in report["references"]] == ["mooncake-fig9"] * 10
    rows = list(csv.DictReader(table.open()))
    assert [r["engine"] for r in rows] == ["stack", "stack", "direct", "direct"]
    assert len(rows) == 4 and float(rows[1]["block_hit_rate"]) == pytest.approx(
        lru["block_hit_rate"], abs=1e-6
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "0.4201" in text and "headline" in text and "(stack)" in text and "(direct)" in text


def test_workload_input_and_advice(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "bench", "hitrate", "--workload",
            "long-doc-qa:documents=4,questions=10,doc_tokens=4096",
            "--target-hit-rate", "0.5", "--capacity", "8,40", "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "advice (lru): block hit rate 0.5 needs cpu" in text


def test_replay_from_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    rc = main(
        [
            "bench", "hitrate", "--workload", "multi-turn:sessions=6,turns=4", "--replay",
            "--backend", "cpu", "--set", "cpu.buffer_number=20", "--kv-bytes-per-token", "8",
            "--json", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    r = json.loads(out.read_text())["cases"][0]
    assert r["mode"] == "replay" and r["replay"]["corrupt_blocks"] == 0
    assert r["tiers"] == [{"name": "cpu", "capacity_blocks": 20}]
    assert r["hit_blocks"] > 0


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--trace", "mooncake-synthetic", "--replay"], "give the KV geometry"),
        (
            [
                "--trace",
                "mooncake-synthetic",
                "--replay",
                "--kv-bytes-per-token",
                "8",
                "--capacity",
                "10",
            ],
            "size its tiers in the config",
        ),
        (["--trace", "mooncake-synthetic", "--policy", "mru"], "unknown eviction policy"),
        (["--trace", "mooncake-synthetic", "--capacity", "4GiB"], "give the KV geometry"),
        (
            ["--trace", "mooncake-synthetic", "--tiers", "cpu:10,disk:5", "--capacity", "9"],
            "leave its capacity out",
        ),
        (["--workload", "chat"], "unknown workload 'chat'"),
        (
            ["--trace", "mooncake-synthetic", "--capacity", "9", "--json", "/nonexistent/r.json"],
            "cannot write the JSON report",
        ),
        (["--workload", "multi-turn:sessions=many"], "sessions must be a whole number, got 'many'"),
        (["--workload", "multi-turn:colour=red"], "'colour=red' is not KEY=VALUE with KEY one of"),
        (["--workload", "multi-turn:sessions"], "'sessions' is not KEY=VALUE"),
        (["--workload", "multi-turn:turns=2,turns=3"], "turns is given twice"),
        (["--trace", "nope.jsonl"], "cannot open trace"),
        (["--trace", "mooncake-synthetic", "--jobs", "0"], "expected a whole number >= 1"),
        (
            ["--trace", "mooncake-synthetic", "--engine", "stack", "--capacity", "19,5000"],
            "engine 'stack' is not exact for lru cpu:19: capacity 19 is below the longest",
        ),
        (["--trace", "mooncake-synthetic", "--engine", "fast"], "invalid choice: 'fast'"),
        (
            ["--trace", "mooncake-synthetic", "--reference", "missing.csv", "--capacity", "9"],
            "cannot read reference curve",
        ),
    ],
)
def test_bad_input_exits_2_with_a_message(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "hitrate", "--quiet", *argv]) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("width", [100, 80])
def test_tables_keep_every_number_whole_in_a_narrow_terminal(
    width: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import kvferry.tables as tables
    from kvferry.testing.tables import assert_values_whole

    monkeypatch.setattr(tables, "PIPED_WIDTH", width)
    out = tmp_path / "r.json"
    workload = ["--workload", "multi-turn:sessions=6,turns=4", "--json", str(out), "--quiet"]
    sim = ["--policy", "lru,fifo", "--capacity", "8,40", "--model-kv", "32,8,128,bf16"]
    assert main(["bench", "hitrate", *workload, *sim, "--prefill-tokens-per-s", "10000"]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    headers = ["blocks", "GiB", "block", "token", "req-mean", "prefill s/s"]
    values = [
        [
            f"{r['capacity_blocks']:,}",
            f"{r['capacity_bytes'] / 2**30:,.2f}",
            f"{r['block_hit_rate']:.4f}",
            f"{r['token_hit_rate']:.4f}",
            f"{r['request_mean_hit_rate']:.4f}",
            f"{r['prefill_seconds_saved_per_trace_second']:.3f}",
        ]
        for r in report["cases"]
    ]
    dropped = assert_values_whole(text, width, headers, values)
    assert "block" not in dropped and "blocks" not in dropped

    replay = ["--replay", "--backend", "cpu", "--set", "cpu.buffer_number=20"]
    assert main(["bench", "hitrate", *workload, *replay, "--kv-bytes-per-token", "8"]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())["cases"][0]
    x = r["replay"]
    headers = ["block", "QPS", "p50 us", "p99 us", "GB/s", "write"]
    values = [
        [
            f"{r['block_hit_rate']:.4f}",
            f"{x['qps']:,.0f}",
            f"{x['request_latency_us']['p50']:,.0f}",
            f"{x['request_latency_us']['p99']:,.0f}",
            f"{x['bandwidth_gbps']:.2f}",
            f"{x['write_ratio']:.2f}",
        ]
    ]
    dropped = assert_values_whole(text, width, headers, values)
    assert {"QPS", "p99 us"}.isdisjoint(dropped)
