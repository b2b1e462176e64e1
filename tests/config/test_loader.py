"""The config loader: layering, provenance and error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from kvferry.config import PRESETS, KvferryConfig, LoadedConfig, load_config
from kvferry.config.models import SECTIONS
from kvferry.errors import ConfigError

ALL_KEYS = [f"{s}.{k}" for s, model in SECTIONS.items() for k in model.model_fields]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_only() -> None:
    loaded = load_config(environ={})
    assert loaded.config == KvferryConfig()
    assert set(loaded.sources) == set(ALL_KEYS)
    assert set(loaded.sources.values()) == {"default"}


def test_precedence_flag_env_file_preset_default(tmp_path: Path) -> None:
    # transfer.workers is set by all four layers, max_inflight by three, use_hugepages by two,
    # grace_period_ns by the preset alone; each must come from its highest layer.
    cfg = write(
        tmp_path / "cfg.yaml",
        "transfer:\n  workers: 6\n  max_inflight: 600\n  use_hugepages: false\n"
        "  slice_size: 256KiB\n",
    )
    loaded = load_config(
        config_file=cfg,
        preset="throughput",
        environ={"KVFERRY_TRANSFER_WORKERS": "8", "KVFERRY_TRANSFER_MAX_INFLIGHT": "700"},
        flags={"transfer.workers": "10"},
    )
    t = loaded.config.transfer
    assert t.workers == 10
    assert t.max_inflight == 700
    assert t.use_hugepages is False
    assert t.slice_size == 256 * 1024
    assert t.grace_period_ns == PRESETS["throughput"]["transfer"]["grace_period_ns"]
    assert t.retry_count == 9
    assert loaded.sources["transfer.workers"] == "flag"
    assert loaded.sources["transfer.max_inflight"] == "env:KVFERRY_TRANSFER_MAX_INFLIGHT"
    assert loaded.sources["transfer.use_hugepages"] == f"file:{cfg}"
    assert loaded.sources["transfer.slice_size"] == f"file:{cfg}"
    assert loaded.sources["transfer.grace_period_ns"] == "preset:throughput"
    assert loaded.sources["transfer.retry_count"] == "default"
    assert loaded.sources["listen.port"] == "default"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_loads_and_sets_its_values(name: str) -> None:
    loaded = load_config(preset=name, environ={})
    for section, values in PRESETS[name].items():
        for key, value in values.items():
            assert getattr(getattr(loaded.config, section), key) == value
            assert loaded.sources[f"{section}.{key}"] == f"preset:{name}"


def test_presets_encode_the_tuning_guide() -> None:
    throughput = load_config(preset="throughput", environ={}).config.transfer
    assert (throughput.slice_size, throughput.workers, throughput.max_inflight) == (131072, 4, 512)
    assert throughput.use_hugepages is True
    assert throughput.grace_period_ns == 20_000
    latency = load_config(preset="latency", environ={}).config.transfer
    assert (latency.slice_size, latency.workers, latency.max_inflight) == (65536, 2, 256)
    assert latency.retry_count == 5
    assert latency.use_hugepages is True
    assert latency.grace_period_ns == 200_000


def test_preset_and_config_file_from_environment(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.json", json.dumps({"listen": {"port": 4000}}))
    loaded = load_config(environ={"KVFERRY_PRESET": "latency", "KVFERRY_CONFIG": str(cfg)})
    assert loaded.config.transfer.retry_count == 5
    assert loaded.config.listen.port == 4000
    assert loaded.sources["listen.port"] == f"file:{cfg}"


def test_explicit_arguments_beat_reserved_environment(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "listen:\n  port: 4001\n")
    loaded = load_config(
        config_file=cfg,
        preset="throughput",
        environ={"KVFERRY_PRESET": "no-such-preset", "KVFERRY_CONFIG": str(tmp_path / "none")},
    )
    assert loaded.config.listen.port == 4001
    assert loaded.sources["transfer.workers"] == "preset:throughput"


def test_json_and_yaml_files_give_the_same_config(tmp_path: Path) -> None:
    data = {
        "transfer": {"slice_size": "1MiB", "transfer_timeout": "250ms", "transport": "tcp"},
        "listen": {"bind_address": "0.0.0.0", "port": 0},
        "metadata": {"backend": "redis", "ttl": 30},
    }
    as_json = load_config(config_file=write(tmp_path / "c.json", json.dumps(data)), environ={})
    yaml_text = (
        "transfer:\n  slice_size: 1MiB\n  transfer_timeout: 250ms\n  transport: tcp\n"
        "listen:\n  bind_address: 0.0.0.0\n  port: 0\n"
        "metadata:\n  backend: redis\n  ttl: 30\n"
    )
    as_yaml = load_config(config_file=write(tmp_path / "c.yml", yaml_text), environ={})
    assert as_json.config == as_yaml.config
    assert as_yaml.config.transfer.slice_size == 1024 * 1024
    assert as_yaml.config.transfer.transfer_timeout == pytest.approx(0.25)
    assert as_yaml.config.metadata.backend == "redis"


def test_empty_file_sets_nothing(tmp_path: Path) -> None:
    loaded = load_config(config_file=write(tmp_path / "empty.yaml", ""), environ={})
    assert set(loaded.sources.values()) == {"default"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("Yes", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("OFF", False),
    ],
)
def test_booleans_from_env_and_flags(text: str, expected: bool) -> None:
    from_env = load_config(environ={"KVFERRY_TRANSFER_USE_HUGEPAGES": text})
    assert from_env.config.transfer.use_hugepages is expected
    from_flag = load_config(environ={}, flags={"transfer.use_hugepages": text})
    assert from_flag.config.transfer.use_hugepages is expected


def test_bad_boolean_names_key_value_source_and_valid_words() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"KVFERRY_TRANSFER_USE_HUGEPAGES": "maybe"})
    message = str(info.value)
    assert "transfer.use_hugepages" in message
    assert "'maybe'" in message
    assert "env KVFERRY_TRANSFER_USE_HUGEPAGES" in message
    assert "yes/no" in message


def test_bad_env_value_names_key_value_source_and_rule() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"KVFERRY_TRANSFER_WORKERS": "0"})
    message = str(info.value)
    assert "transfer.workers" in message
    assert "'0'" in message
    assert "env KVFERRY_TRANSFER_WORKERS" in message
    assert "greater than or equal to 1" in message
    assert info.value.__cause__ is None  # no pydantic ValidationError chained to the user


def test_bad_file_value_names_the_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "cfg.yaml", "transfer:\n  slice_size: 12parsecs\n")
    with pytest.raises(ConfigError) as info:
        load_config(config_file=cfg, environ={})
    message = str(info.value)
    assert "transfer.slice_size" in message
    assert "'12parsecs'" in message
    assert f"file {cfg}" in message
    assert "64KiB" in message  # what a valid size looks like


def test_bad_flag_value_names_the_flag_as_typed() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            environ={},
            flags={"transfer.transport": "rdma"},
            flag_names={"transfer.transport": "--transport"},
        )
    message = str(info.value)
    assert "transfer.transport" in message
    assert "'rdma'" in message
    assert "flag --transport" in message
    assert "'tcp'" in message


def test_bad_value_from_a_higher_layer_is_blamed_not_the_lower(tmp_path: Path) -> None:
    cfg = write(tmp_path / "cfg.yaml", "transfer:\n  workers: 3\n")
    with pytest.raises(ConfigError, match=r"transfer\.workers = 'many' \(env "):
        load_config(config_file=cfg, environ={"KVFERRY_TRANSFER_WORKERS": "many"})


def test_every_bad_value_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            environ={"KVFERRY_LISTEN_PORT": "70000"},
            flags={"transfer.retry_count": -1},
        )
    message = str(info.value)
    assert "listen.port = '70000' (env KVFERRY_LISTEN_PORT)" in message
    assert "transfer.retry_count = -1 (flag transfer.retry_count)" in message


def test_cross_key_check_names_the_keys_that_collided() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            environ={"KVFERRY_TRANSFER_MAX_FRAME_SIZE": "64KiB"},
            flags={"transfer.slice_size": "1MiB"},
        )
    message = str(info.value)
    assert "exceeds max_frame_size" in message
    assert "transfer.slice_size = '1MiB' (flag transfer.slice_size)" in message
    assert "transfer.max_frame_size = '64KiB' (env KVFERRY_TRANSFER_MAX_FRAME_SIZE)" in message


def test_breaker_cap_below_its_interval_names_both_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            environ={"KVFERRY_STORE_BREAKER_OPEN_SECONDS": "10s"},
            flags={"store.breaker_max_open_seconds": "5s"},
        )
    message = str(info.value)
    assert "breaker_max_open_seconds 5.0 is below breaker_open_seconds 10.0" in message
    assert "store.breaker_open_seconds = '10s' (env KVFERRY_STORE_BREAKER_OPEN_SECONDS)" in message
    loaded = load_config(environ={}, flags={"store.breaker_failures": "1"})
    assert loaded.config.store.breaker_failures == 1
    with pytest.raises(ConfigError, match=r"store\.breaker_failures = 0"):
        load_config(environ={}, flags={"store.breaker_failures": 0})


def test_bad_preset_value_names_the_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PRESETS, "broken", {"transfer": {"workers": 0}})
    with pytest.raises(ConfigError, match=r"transfer\.workers = 0 \(preset broken\)"):
        load_config(preset="broken", environ={})


def test_unknown_env_var_is_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"KVFERRY_TRANSFER_WORKER": "4", "PATH": "/bin"})
    message = str(info.value)
    assert "KVFERRY_TRANSFER_WORKER " in message
    assert "did you mean KVFERRY_TRANSFER_WORKERS?" in message


def test_other_env_vars_are_ignored() -> None:
    loaded = load_config(environ={"PATH": "/bin", "KVFERRYX": "1", "MC_SLICE_SIZE": "1"})
    assert set(loaded.sources.values()) == {"default"}


def test_unknown_file_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    cfg = write(tmp_path / "cfg.yaml", "transfer:\n  slice: 64KiB\n")
    with pytest.raises(ConfigError) as info:
        load_config(config_file=cfg, environ={})
    message = str(info.value)
    assert f"file {cfg}" in message
    assert "transfer.slice " in message
    assert "did you mean transfer.slice_size?" in message


def test_key_under_the_wrong_section_suggests_the_right_one(tmp_path: Path) -> None:
    cfg = write(tmp_path / "cfg.json", '{"transfer": {"port": 1}}')
    with pytest.raises(ConfigError, match=r"did you mean listen\.port\?"):
        load_config(config_file=cfg, environ={})


def test_unknown_file_section_is_named_with_a_suggestion(tmp_path: Path) -> None:
    cfg = write(tmp_path / "cfg.yaml", "transfr:\n  workers: 2\n")
    with pytest.raises(ConfigError, match=r"unknown section 'transfr'.*did you mean transfer\?"):
        load_config(config_file=cfg, environ={})


def test_flat_key_in_file_names_its_section(tmp_path: Path) -> None:
    cfg = write(tmp_path / "cfg.yaml", "workers: 2\n")
    with pytest.raises(ConfigError, match=r"'workers' \(workers belongs under .*transfer\.workers"):
        load_config(config_file=cfg, environ={})


def test_unknown_flag_key_is_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"flag --wrkers: .*did you mean transfer\.workers\?"):
        load_config(
            environ={}, flags={"transfer.wrkers": 2}, flag_names={"transfer.wrkers": "--wrkers"}
        )
    with pytest.raises(ConfigError, match=r"not a SECTION\.KEY.*did you mean transfer\.workers"):
        load_config(environ={}, flags={"workers": 2})


def test_none_flag_means_not_given() -> None:
    loaded = load_config(
        environ={"KVFERRY_TRANSFER_WORKERS": "5"}, flags={"transfer.workers": None}
    )
    assert loaded.config.transfer.workers == 5
    assert loaded.sources["transfer.workers"] == "env:KVFERRY_TRANSFER_WORKERS"


def test_unknown_preset_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(preset="fastest", environ={})
    assert "'fastest'" in str(info.value)
    for name in PRESETS:
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="KVFERRY_PRESET"):
        load_config(environ={"KVFERRY_PRESET": "fastest"})


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("bad.yaml", "transfer: [1\n", "not valid YAML: line 2"),
        ("bad.json", '{"transfer": {"workers": 1,}}', "not valid JSON"),
        ("list.yaml", "- 1\n- 2\n", "expected a mapping"),
        ("scalar.json", "42", "got int"),
        ("section.yaml", "transfer: 5\n", "section 'transfer' must be a mapping"),
        ("cfg.toml", "[transfer]\n", "unsupported extension '.toml'"),
    ],
)
def test_unusable_file_names_file_and_problem(
    tmp_path: Path, name: str, text: str, fragment: str
) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(ConfigError) as info:
        load_config(config_file=path, environ={})
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml not found"):
        load_config(config_file=missing, environ={})
    with pytest.raises(ConfigError, match=r"nope\.yaml \(from KVFERRY_CONFIG\) not found"):
        load_config(environ={"KVFERRY_CONFIG": str(missing)})


def test_rows_cover_every_key_and_mask_secrets() -> None:
    loaded = load_config(
        environ={"KVFERRY_LISTEN_AUTH_TOKEN": "hunter2"},
        flags={"transfer.slice_size": 131072, "transfer.use_hugepages": "yes"},
    )
    assert isinstance(loaded, LoadedConfig)
    assert isinstance(loaded.config.listen.auth_token, SecretStr)
    assert loaded.config.listen.auth_token.get_secret_value() == "hunter2"
    rows = {key: (value, source) for key, value, source in loaded.rows()}
    assert list(rows) == ALL_KEYS
    assert rows["listen.auth_token"] == ("***", "env:KVFERRY_LISTEN_AUTH_TOKEN")
    assert rows["transfer.slice_size"] == ("128KiB", "flag")
    assert rows["transfer.use_hugepages"] == ("true", "flag")
    assert rows["transfer.transfer_timeout"] == ("5s", "default")
    assert "hunter2" not in repr(loaded.rows())
    assert "hunter2" not in json.dumps(loaded.as_dict())


def test_unset_secret_is_shown_as_none() -> None:
    rows = {key: value for key, value, _ in load_config(environ={}).rows()}
    assert rows["listen.auth_token"] == "none"


def test_secret_never_appears_in_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, flags={"listen.auth_token": 12345})
    assert "12345" not in str(info.value)
    assert "listen.auth_token = ***" in str(info.value)


def test_loading_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KVFERRY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KVFERRY_METADATA_KEY_PREFIX", "lab")
    loaded = load_config()
    assert loaded.config.metadata.key_prefix == "lab"
    assert loaded.sources["metadata.key_prefix"] == "env:KVFERRY_METADATA_KEY_PREFIX"


def test_importing_reads_no_environment() -> None:
    # A bogus KVFERRY_* variable fails load_config, so an import that read the environment
    # would fail too.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVFERRY_")}
    env["KVFERRY_BOGUS"] = "1"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    code = "import kvferry.config, kvferry.cli.main, kvferry.cli.config_cmd; print('ok')"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
