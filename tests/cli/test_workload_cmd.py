"""``kvferry workload``: a clean JSONL trace on stdout or -o FILE, the summary on stderr."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kvferry.bench.traces import analyze_trace, read_trace
from kvferry.bench.workloads import WORKLOADS, generate, write_jsonl
from kvferry.cli.main import main


def expected(name: str, **options: object) -> str:
    out = io.StringIO()
    write_jsonl(generate(name, **options), out)
    return out.getvalue()


def test_trace_on_stdout_summary_on_stderr(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["workload", "long-doc-qa", "--documents", "3", "--questions", "4"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 12 and all(json.loads(line) for line in lines)
    assert out == expected("long-doc-qa", documents=3, questions=4)
    path = tmp_path / "t.jsonl"
    path.write_text(out)
    report = analyze_trace(read_trace(path))
    assert len(err.splitlines()) == 1
    assert err.startswith("long-doc-qa: 12 requests, ")
    assert f"{report['total_blocks']} blocks, {report['distinct_blocks']} distinct ids" in err
    assert f"ideal hit rate {report['block_weighted_ideal_hit_rate']:.4f}" in err


def test_output_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "agent.jsonl"
    argv = ["workload", "agent", "--sessions", "3", "--block-tokens", "64", "-o", str(path)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "agent: 30 requests" in err and str(path) in err
    trace = read_trace(path, block_tokens=64)
    assert trace.problems == [] and len(trace.requests) == 30
    assert path.read_text() == expected("agent", sessions=3, block_tokens=64)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_every_option_has_a_flag_that_reaches_the_generator(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    argv = ["workload", name]
    options: dict[str, object] = {}
    for info in WORKLOADS[name].option_infos():
        if isinstance(info.default, str):
            value: object = next(c for c in info.choices if c != info.default)
        elif isinstance(info.default, float):
            value = (
                min(info.default + 0.5, 1.0) if info.name == "prefix_ratio" else info.default + 0.5
            )
        else:
            value = info.default + 1
        options[info.name] = value
        argv += ["--" + info.name.replace("_", "-"), str(value)]
    assert main(argv) == 0
    assert capsys.readouterr().out == expected(name, **options)


def test_no_name_lists_the_workloads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["workload"]) == 0
    out = capsys.readouterr().out
    for name, spec in WORKLOADS.items():
        assert any(line.startswith(name) and spec.summary in line for line in out.splitlines())


def test_bad_value_exits_2_naming_the_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "keep.jsonl"
    path.write_text("precious\n")
    argv = ["workload", "prefix-ratio", "--prefix-ratio", "1.5", "-o", str(path)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and "--prefix-ratio" in err and "1.5" in err
    assert "[0, 1]" in err
    assert path.read_text() == "precious\n"  # a bad flag does not truncate the output


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["workload", "prefix-ratio", "--isl", "lots"], ["--isl", "invalid int value"]),
        (["workload", "long-doc-qa", "--order", "backwards"], ["--order", "invalid choice"]),
        (["workload", "multi-turn", "--turns", "0"], ["--turns", "must be a whole number >= 1"]),
        (["workload", "agent", "--seed", "-3"], ["--seed", "-3"]),
        (["workload", "chat"], ["invalid choice", "prefix-ratio"]),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: list[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    for word in words:
        assert word in err


def test_unwritable_output_is_a_clean_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "no" / "such" / "dir.jsonl"
    assert main(["workload", "agent", "-o", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the trace to --output") and "Traceback" not in err
