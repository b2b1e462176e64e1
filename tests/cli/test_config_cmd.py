"""``kvferry config show`` / ``config presets`` and the CLI's error boundary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvferry.cli import main as cli_main
from kvferry.cli.main import main
from kvferry.config import PRESETS
from kvferry.config.models import SECTIONS

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands read os.environ; start every test without KVFERRY_* variables."""
    for name in list(os.environ):
        if name.startswith("KVFERRY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables to the terminal width


def show_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["config", "show", "--json", *args]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def test_show_table_lists_every_key_with_value_and_source(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["config", "show", "--preset", "latency", "--set", "listen.port=9000"]) == 0
    out = capsys.readouterr().out
    for header in ("Key", "Value", "Source"):
        assert header in out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    assert "9000" in lines["listen.port"] and "flag" in lines["listen.port"]
    assert "preset:latency" in lines["transfer.retry_count"]
    assert "5" in lines["transfer.retry_count"]
    assert "default" in lines["metadata.ttl"]
    every = {f"{name}.{key}" for name, model in SECTIONS.items() for key in model.model_fields}
    assert set(lines) - {"Key"} == every  # every key of every section, nothing else


def test_show_json_reports_sources_of_each_layer(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("transfer:\n  workers: 6\n  slice_size: 256KiB\n")
    monkeypatch.setenv("KVFERRY_TRANSFER_WORKERS", "8")
    data = show_json(
        capsys,
        "--config",
        str(cfg),
        "--preset",
        "throughput",
        "--set",
        "transfer.max_inflight=1000",
    )
    assert data["config"]["transfer"] == {
        **data["config"]["transfer"],
        "workers": 8,
        "slice_size": "256KiB",
        "max_inflight": 1000,
        "use_hugepages": True,
    }
    assert data["sources"]["transfer.workers"] == "env:KVFERRY_TRANSFER_WORKERS"
    assert data["sources"]["transfer.slice_size"] == f"file:{cfg}"
    assert data["sources"]["transfer.max_inflight"] == "flag"
    assert data["sources"]["transfer.use_hugepages"] == "preset:throughput"
    assert data["sources"]["listen.port"] == "default"


def test_show_masks_the_auth_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVFERRY_LISTEN_AUTH_TOKEN", "hunter2")
    data = show_json(capsys)
    assert data["config"]["listen"]["auth_token"] == "***"
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    assert "***" in out


def test_later_set_wins(capsys: pytest.CaptureFixture[str]) -> None:
    data = show_json(capsys, "--set", "transfer.workers=3", "--set", "transfer.workers=5")
    assert data["config"]["transfer"]["workers"] == 5


def test_command_flags_win_over_set() -> None:
    import argparse

    from kvferry.cli.common import add_config_options, load_from_args

    parser = argparse.ArgumentParser()
    add_config_options(parser)
    args = parser.parse_args(["--set", "transfer.workers=3", "--set", "listen.port=7"])
    loaded = load_from_args(
        args, {"transfer.workers": 9, "transfer.retry_count": None}, flag_names={}
    )
    assert loaded.config.transfer.workers == 9
    assert loaded.config.listen.port == 7
    assert loaded.sources["transfer.retry_count"] == "default"


def test_bad_value_exits_2_with_message_and_no_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["config", "show", "--set", "transfer.workers=0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ")
    assert "transfer.workers = '0' (flag --set transfer.workers)" in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--set", "transfer.workers"], "malformed --set 'transfer.workers'"),
        (["--set", "workers=4"], "malformed --set 'workers=4'"),
        (["--set", "transfer.wrkers=4"], "did you mean transfer.workers?"),
        (["--preset", "fastest"], "valid presets: latency, throughput"),
        (["--config", "/nonexistent/kvferry.yaml"], "/nonexistent/kvferry.yaml not found"),
    ],
)
def test_config_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    assert main(["config", "show", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert fragment in err


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``argv``; assert it failed with exit 2 and exactly one ``error:`` line."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize(
    ("pair", "fragment"),
    [
        ("transfer.slice_size=1e400", "transfer.slice_size = '1e400'"),
        ("transfer.transfer_timeout=1e999s", "transfer.transfer_timeout = '1e999s'"),
        ("store.lease_seconds=1e999", "store.lease_seconds = '1e999'"),
        ("store.lease_seconds=inf", "store.lease_seconds = 'inf'"),
        ("store.lease_seconds=30d", "store.lease_seconds = '30d'"),
        ("store.lease_seconds=2000000", "store.lease_seconds = '2000000'"),
        ("cpu.capacity=1e30", "cpu.capacity = '1e30'"),
    ],
)
def test_values_that_overflow_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], pair: str, fragment: str
) -> None:
    assert fragment in one_line_error(capsys, ["config", "show", "--set", pair])


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_deeply_nested_config_file_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, suffix: str
) -> None:
    deep = tmp_path / f"deep{suffix}"
    deep.write_text('{"transfer": ' * 100_000 + "1" + "}" * 100_000)
    err = one_line_error(capsys, ["config", "show", "--config", str(deep)])
    assert str(deep) in err and "nested too deeply" in err


def test_a_nested_value_that_fits_the_parser_is_shown_short(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    deep = tmp_path / "nested.json"
    deep.write_text('{"transfer": {"workers": ' + "[" * 500 + "]" * 500 + "}}")
    err = one_line_error(capsys, ["config", "show", "--config", str(deep)])
    assert "transfer.workers" in err and len(err) < 1000


def test_a_recursion_error_anywhere_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvferry.cli import config_cmd

    def recurse(_: object) -> int:
        return recurse(_)

    monkeypatch.setattr(config_cmd, "load_from_args", recurse)
    assert "nested too deeply" in one_line_error(capsys, ["config", "show"])


def test_unknown_env_var_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVFERRY_TRANSFER_SLICESIZE", "1")
    assert main(["config", "show"]) == 2
    assert "did you mean KVFERRY_TRANSFER_SLICE_SIZE?" in capsys.readouterr().err


def test_presets_lists_each_preset_and_its_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "presets"]) == 0
    out = capsys.readouterr().out
    assert "throughput: high-throughput KV-cache transfer" in out
    assert "latency: low-latency online inference" in out
    assert "128KiB" in out
    assert "transfer.retry_count" in out
    assert main(["config", "presets", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["throughput"]["values"] == PRESETS["throughput"]
    assert set(data) == set(PRESETS)


def test_usage_errors_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "config" in capsys.readouterr().err
    assert main(["config"]) == 2
    assert "show" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("kvferry ")


def test_log_level_flag_and_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    log = logging.getLogger("kvferry.test")
    assert main(["--log-level", "info", "config", "presets"]) == 0
    log.info("shown at info")
    log.debug("not shown at info")
    err = capsys.readouterr().err
    assert " INFO kvferry.test: shown at info" in err and "not shown" not in err
    monkeypatch.setenv("KVFERRY_LOG_LEVEL", "error")
    assert main(["config", "presets"]) == 0  # the variable is not an unknown config key
    log.warning("hidden at error")
    assert "hidden" not in capsys.readouterr().err
    monkeypatch.setenv("KVFERRY_LOG_LEVEL", "loud")
    assert main(["config", "presets"]) == 2
    assert "KVFERRY_LOG_LEVEL='loud' is not a log level" in capsys.readouterr().err
    assert main(["--log-level", "loud", "config", "presets"]) == 2
    assert "invalid choice: 'loud'" in capsys.readouterr().err
    # after the command too, and there it wins over the variable and a value given before
    assert main(["--log-level", "error", "config", "presets", "--log-level", "debug"]) == 0
    log.debug("shown at debug")
    assert "shown at debug" in capsys.readouterr().err
    logging.getLogger("kvferry").setLevel(logging.WARNING)  # as the other tests expect


def test_keyboard_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvferry.cli import config_cmd

    def interrupted(_: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(config_cmd, "load_from_args", interrupted)
    assert main(["config", "show"]) == 130


def test_missing_command_module_is_skipped_but_a_broken_one_is_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        cli_main, "_COMMAND_MODULES", ["kvferry.cli.config_cmd", "kvferry.cli.not_yet_cmd"]
    )
    assert "config" in cli_main.build_parser().format_help()

    (tmp_path / "kvf_broken_cmd.py").write_text("import kvf_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli_main, "_COMMAND_MODULES", ["kvf_broken_cmd"])
    with pytest.raises(ModuleNotFoundError, match="kvf_missing_dependency_xyz"):
        cli_main.build_parser()


def _run_module(*args: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVFERRY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "kvferry", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_python_dash_m_config_show_json() -> None:
    proc = _run_module(
        "config", "show", "--json", env_extra={"KVFERRY_TRANSFER_SLICE_SIZE": "256KiB"}
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["config"]["transfer"]["slice_size"] == "256KiB"
    assert data["sources"]["transfer.slice_size"] == "env:KVFERRY_TRANSFER_SLICE_SIZE"


def test_python_dash_m_error_exits_2_without_traceback() -> None:
    proc = _run_module("config", "show", env_extra={"KVFERRY_TRANSFER_WORKERS": "lots"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: invalid config: transfer.workers = 'lots'")
    assert "env KVFERRY_TRANSFER_WORKERS" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("width", [60, 50])
def test_show_keeps_every_key_and_short_value_whole_in_a_narrow_terminal(
    width: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kvferry.tables as tables
    from kvferry.config.loader import load_config
    from kvferry.testing.tables import assert_values_whole

    monkeypatch.setattr(tables, "PIPED_WIDTH", width)
    assert main(["config", "show", "--preset", "latency"]) == 0
    text = capsys.readouterr().out
    # Values and sources are prose: one longer than the squeezed column (8) may wrap.
    rows = [
        [key, value if len(value) <= 8 else "", source if len(source) <= 8 else ""]
        for key, value, source in load_config(preset="latency", environ={}).rows()
    ]
    assert_values_whole(text, width, ["Key", "Value", "Source"], rows)
