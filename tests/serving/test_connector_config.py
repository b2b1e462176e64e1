"""kv_connector_extra_config parsing: options, kvferry sections, clear errors."""

from __future__ import annotations

import pytest

from kvferry.errors import ConfigError
from kvferry.serving.vllm.config import parse_extra_config, store_mode


def test_empty_config_is_an_embedded_cpu_store() -> None:
    s = parse_extra_config({}, environ={})
    assert s.config.store.tiers == ["cpu"]
    assert store_mode(s.config) == "embedded"
    assert s.options.load and s.options.save
    assert s.options.on_load_failure == "recompute"


def test_sections_and_options_are_read() -> None:
    s = parse_extra_config(
        {
            "store": {"tiers": ["server"]},
            "server": {"addresses": ["127.0.0.1:15500"], "timeout": 2},
            "save": False,
            "model_id": "m",
            "retry_after": 3,
        },
        environ={},
    )
    assert store_mode(s.config) == "shared"
    assert s.config.server.addresses == ["127.0.0.1:15500"]
    assert s.config.server.timeout == 2
    assert s.options.save is False and s.options.model_id == "m"
    assert s.options.retry_after == 3.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"stroe": {}}, "unknown key 'stroe'"),
        ({"store": ["cpu"]}, "must be an object of store settings"),
        ({"save": "yes"}, "save must be true or false"),
        ({"retry_after": -1}, "non-negative number"),
        ({"min_hit_blocks": 1.5}, "non-negative integer"),
        ({"on_load_failure": "ignore"}, "'recompute' or 'fail'"),
        ({"store": {"tiers": ["cpu", "redis"]}}, "mixes local tiers (cpu) with shared"),
        ({"store": {"slot_size": "huge"}}, "store.slot_size"),
        ({"config_file": 3}, "config_file must be a file path"),
    ],
)
def test_bad_settings_are_clear_errors(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_extra_config(extra, environ={})
    assert message in str(e.value)


def test_environment_is_read_like_everywhere_in_kvferry() -> None:
    s = parse_extra_config({}, environ={"KVFERRY_CPU_CAPACITY": "64MiB"})
    assert s.config.cpu.capacity == 64 << 20
