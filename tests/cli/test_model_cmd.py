"""``kvferry model tiny``: impossible shapes are refused before anything is built or written;
``kvferry model hf-cache``: a tokenizer placed where the hub looks for it, offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvferry.cli.main import main


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-kv-heads", "3"], "num_kv_heads (3) must divide num_heads (4)"),
        (["--dtype", "foo"], "dtype must be float32, bfloat16 or float16, got 'foo'"),
    ],
)
def test_bad_shape_is_a_clear_error(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiny"
    assert main(["model", "tiny", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_non_numeric_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "tiny", "/nonexistent/x", "--hidden-size", "big"]) == 2
    assert "argument --hidden-size: invalid int value: 'big'" in capsys.readouterr().err


def test_hf_cache_places_the_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "tokenizer.json").write_text('{"x": 1}')
    cache = tmp_path / "hub"
    assert main(["model", "hf-cache", str(model), str(cache), "--repo", "me/tok"]) == 0
    out = capsys.readouterr().out
    assert f"HF_HUB_OFFLINE=1 HF_HUB_CACHE={cache}" in out and "--tokenizer me/tok" in out
    root = cache / "models--me--tok"
    snapshot = root / "snapshots" / (root / "refs" / "main").read_text()
    assert (snapshot / "tokenizer.json").read_text() == '{"x": 1}'
    assert str(snapshot) in out


@pytest.mark.parametrize(
    ("target", "args", "message"),
    [
        ("missing", [], "has no tokenizer.json; build it with `kvferry model tiny`"),
        ("ok", ["--repo", "tok"], "repo must look like 'owner/name', got 'tok'"),
        ("file", [], "cannot place"),
    ],
)
def test_hf_cache_bad_input_is_a_clear_error(
    target: str, args: list[str], message: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    model = tmp_path / "tiny"
    if target != "missing":
        model.mkdir()
        (model / "tokenizer.json").write_text("{}")
    cache = tmp_path / "hub"
    if target == "file":
        cache.write_text("not a directory")
    assert main(["model", "hf-cache", str(model), str(cache), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
