"""``kvferry model tiny``: impossible shapes are refused before anything is built or written."""

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
