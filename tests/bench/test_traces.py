"""Trace reading, validation and aiperf-compatible analysis, on the shared real traces."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from kvferry.bench.traces import TraceError, analyze_trace, bundled_path, read_trace
from kvferry.cli.main import main

# The shared traces, as bundled with kvferry (copied verbatim; see kvferry/data/traces/README.md)
PARITY = Path(bundled_path("aiperf-parity"))
GOLDEN = Path(bundled_path("aiperf_parity_golden.json"))
MOONCAKE = Path(bundled_path("mooncake-synthetic"))


# sha256 of the files in ../shared/data/traces (the copies the issue names), taken when they
# were bundled: the check needs no ../shared beside the checkout, so it runs on every clone.
SHARED_SHA256 = {
    "aiperf_parity_trace.jsonl": "c79d3848d949a969841860a8ea5ddfa6e115baa78b47896df89535561ca0327c",
    "aiperf_parity_golden.json": "dfea1d0662c5a8f640ef88c633c62404fb35dda385fc62a24596fe31453f75c2",
    "mooncake_synthetic_trace.jsonl": (
        "bd070915a98fc0ed264d7cfef2ce746002eb3076a695ec31ba2674c0111ec131"
    ),
}


def test_bundled_copies_are_verbatim() -> None:
    for name, digest in SHARED_SHA256.items():
        data = Path(bundled_path(name)).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, f"{name} differs from the shared copy"


def _same(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, int | float)
            and isinstance(b, int | float)
            and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
        )
    return a == b


def test_every_number_of_aiperf_golden_is_reproduced() -> None:
    golden = json.loads(GOLDEN.read_text())
    trace = read_trace(PARITY, keep_mismatched=True)
    report = analyze_trace(trace)
    for key, want in golden.items():
        assert _same(report[key], want), f"{key}: kvferry {report[key]!r}, aiperf {want!r}"
    # the lengths of this trace do not match its ids at 512 tokens per block: reported, kept
    assert [p.line for p in trace.problems] == [1, 2, 3, 4, 5]
    assert all(p.kept for p in trace.problems)
    assert report["block_weighted_ideal_hit_rate"] == pytest.approx(1 - 7 / 12)


def test_cli_json_equals_golden(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    rc = main(["trace", "analyze", str(PARITY), "--keep-mismatched", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    golden = json.loads(GOLDEN.read_text())
    assert all(_same(report[k], v) for k, v in golden.items())
    text = capsys.readouterr().out
    assert "0.3542" in text and "line 1:" in text


def test_mooncake_trace_matches_its_readme() -> None:
    trace = read_trace(MOONCAKE)
    assert trace.problems == []
    report = analyze_trace(trace)
    assert report["total_requests"] == 3993
    assert report["total_blocks"] == 121877
    assert report["distinct_blocks"] == 43924
    assert report["block_weighted_ideal_hit_rate"] == pytest.approx(0.6396, abs=5e-5)
    assert report["avg_isl"] == pytest.approx(15325, abs=1)
    # ids form prefix chains: the leading-hit rate equals the ideal one
    assert report["block_weighted_prefix_hit_rate"] == pytest.approx(
        report["block_weighted_ideal_hit_rate"]
    )


BAD_LINES = [
    ('{"timestamp": 0, "input_length": 10, "output_length": 1}', "missing field(s) hash_ids"),
    ('{"timestamp": 0, "input_length": -5, "output_length": 1, "hash_ids": []}', "input_length"),
    ('{"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [1]}', "needs 2"),
    ('{"timestamp": -1, "input_length": 1, "output_length": 1, "hash_ids": [1]}', "timestamp"),
    ('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": ["a"]}', "hash_ids[0]"),
    ('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [-3]}', "hash_ids[0]"),
    ('{"timestamp": 0, "input_length": 1.5, "output_length": 1, "hash_ids": [1]}', "input_length"),
    ("[1, 2]", "JSON object"),
    ("{not json", "not valid JSON"),
    ("[" * 100_000, "nested too deeply"),  # json's RecursionError must not escape
    ('{"hash_ids": ' * 50_000 + "1" + "}" * 50_000, "nested too deeply"),
]
GOOD = '{"timestamp": 5, "input_length": 513, "output_length": 2, "hash_ids": [7, 8]}'


@pytest.mark.parametrize(("line", "fragment"), BAD_LINES)
def test_bad_record_is_skipped_and_named(tmp_path: Path, line: str, fragment: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(GOOD + "\n\n" + line + "\n" + GOOD + "\n")
    trace = read_trace(path)
    assert len(trace.requests) == 2
    assert [p.line for p in trace.problems] == [3]
    assert fragment in trace.problems[0].message
    with pytest.raises(TraceError, match=rf"t\.jsonl:3: .*{fragment[:6]}"):
        read_trace(path, strict=True)


def test_mismatch_kept_only_when_asked_and_block_tokens_fixes_it(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"timestamp": 0, "input_length": 100, "output_length": 1, "hash_ids": [1,2]}\n'
    )
    assert read_trace(path).requests == []
    assert len(read_trace(path, keep_mismatched=True).requests) == 1
    assert read_trace(path, block_tokens=64).problems == []


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "analyze", str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot open trace" in capsys.readouterr().err
    assert main(["trace", "analyze", str(PARITY)]) == 2  # every record mismatched: none left
    assert "no valid request" in capsys.readouterr().err
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["trace", "analyze", str(binary)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["trace", "analyze", str(PARITY), "--block-tokens", "0"]) == 2
    assert ">= 1" in capsys.readouterr().err
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "\n")
    assert main(["trace", "analyze", str(deep), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "deep.jsonl:1: " in err and "nested too deeply" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("width", [80, 60])
def test_analyze_keeps_every_number_whole_in_a_narrow_terminal(
    width: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kvferry.tables as tables
    from kvferry.bench.traces import STAT_KEYS
    from kvferry.testing.tables import assert_values_whole

    monkeypatch.setattr(tables, "PIPED_WIDTH", width)
    out = tmp_path / "report.json"
    assert main(["trace", "analyze", str(MOONCAKE), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    headers = ["Mean", "Std Dev", "Min", "P25", "Median", "P75", "Max"]
    rows = [[f"{report['isl_stats'][k]:,.0f}" for k in STAT_KEYS]]
    rows.append([f"{report['hit_rate_stats'][k]:.3f}" for k in STAT_KEYS])
    dropped = assert_values_whole(text, width, headers, rows)
    assert {"Mean", "Median", "Max"}.isdisjoint(dropped)
    summary = [[f"{report['total_requests']:,}"], [f"{report['distinct_blocks']:,}"]]
    assert_values_whole(text, width, ["value"], summary)
