"""Settings of the vLLM connector, read from ``kv_connector_extra_config``; no vLLM import here.

``kv_connector_extra_config`` is one JSON object. Its keys are either connector options
(:class:`ConnectorOptions`) or kvferry config sections, exactly as in a kvferry config file::

    {"store": {"tiers": ["server"]}, "server": {"addresses": ["10.0.0.5:15500"]},
     "save": true, "model_id": "llama-3-8b"}

``config_file`` and ``preset`` name a kvferry config file and preset, as ``--config`` and
``--preset`` do for the CLI; the sections given inline override them, and ``KVFERRY_*``
environment variables are read as everywhere in kvferry.

Where the KV lives (:func:`store_mode`):

- every tier local (``cpu``, ``disk``; the default is ``[cpu]``): **embedded**. The scheduler
  process of vLLM owns the store and serves it with a kvferry store server on 127.0.0.1 (a
  random port and a random token); the worker processes reach it over the transfer engine
  (shared memory on one host). One vLLM instance, nothing else to run.
- every tier shared (``server``, ``redis``, ``mooncake``): **shared**. The scheduler and the
  workers are clients of the same store, so several vLLM instances share KV through it.

A pipeline that mixes the two is refused: a local tier in a vLLM process would be a cache that
the other process (scheduler or worker) cannot see. Put local tiers behind ``kvferry serve
store`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Literal

from kvferry.backends.registry import load_tier
from kvferry.config import KvferryConfig, load_config
from kvferry.errors import ConfigError

__all__ = ["ConnectorOptions", "ConnectorSettings", "parse_extra_config", "store_mode"]

StoreMode = Literal["embedded", "shared"]


@dataclass(frozen=True)
class ConnectorOptions:
    """The connector's own options (top-level keys of ``kv_connector_extra_config``)."""

    load: bool = True
    """Look up and load cached prefixes into vLLM's KV cache."""
    save: bool = True
    """Save newly computed full prompt blocks to the store."""
    model_id: str = ""
    """Name of the model in block keys; empty: vLLM's model name or path. Instances that must
    share KV need the same model_id (and the same weights)."""
    on_load_failure: Literal["recompute", "fail"] = "recompute"
    """What vLLM does with a block that failed to load: recompute it (kvferry's default: the
    store is a cache), or fail the request (vLLM's own default)."""
    retry_after: float = 2.0
    """Seconds the connector stops asking a store that just failed (lookups miss, saves are
    skipped and counted) before it tries again."""
    min_hit_blocks: int = 1
    """Fewer hit blocks than this are not loaded (vLLM computes them)."""
    pd_data_plane: Literal["", "direct", "store"] = ""
    """How a prefill instance hands a request's KV to a decode instance (vLLM's
    ``kv_transfer_params`` with ``do_remote_decode``): ``direct`` (the prefill keeps the blocks,
    the decode reads them over the transfer engine; :mod:`kvferry.serving.vllm.handoff`) or
    ``store`` (the prefill saves to the store, the decode loads from it). Empty: ``direct``
    for ``kv_role`` ``kv_producer`` and ``kv_consumer``, no P/D for ``kv_both``."""
    pd_host: str = "127.0.0.1"
    """Direct data plane, prefill side: the address its KV listener binds and announces (the
    one decode instances reach it on)."""
    pd_port: int = 0
    """Direct data plane, prefill side: the listener's port (0: any free port)."""
    pd_lease: float = 120.0
    """Direct data plane, prefill side: seconds a finished prefill's staged KV waits for a
    decode instance; then it is dropped (a decode that reads too late recomputes). A request
    may ask for less with ``kv_transfer_params.kvferry_lease_s``."""
    pd_buffer_blocks: int = 0
    """Direct data plane, prefill side: the staging buffer's size in KV blocks (every layer);
    0: room for 4 prompts of max_model_len, at most a quarter of the instance's KV cache. A
    prefill that finds no room hands off nothing (the decode instance recomputes)."""
    pd_timeout: float = 30.0
    """Direct data plane, decode side: the most seconds one hand-off's reads may take."""


_OPTION_NAMES = {f.name for f in fields(ConnectorOptions)}
_FILE_KEYS = {"config_file", "preset"}


@dataclass
class ConnectorSettings:
    """Parsed ``kv_connector_extra_config``: the connector options and the kvferry config."""

    options: ConnectorOptions = field(default_factory=ConnectorOptions)
    config: KvferryConfig = field(default_factory=KvferryConfig)


def _check_option(name: str, value: object) -> object:
    default = getattr(ConnectorOptions(), name)
    if name == "pd_data_plane":
        if value not in ("", "direct", "store"):
            raise ConfigError(
                f"kv_connector_extra_config.pd_data_plane must be 'direct' or 'store', "
                f"got {value!r}"
            )
        return value
    if name == "pd_port" and (
        isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536
    ):
        raise ConfigError(
            f"kv_connector_extra_config.pd_port must be a port (0-65535; 0: any), got {value!r}"
        )
    if name in ("pd_lease", "pd_timeout") and (
        isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
    ):
        raise ConfigError(
            f"kv_connector_extra_config.{name} must be a number of seconds > 0, got {value!r}"
        )
    if name == "on_load_failure":
        if value not in ("recompute", "fail"):
            raise ConfigError(
                f"kv_connector_extra_config.on_load_failure must be 'recompute' or 'fail', "
                f"got {value!r}"
            )
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(
                f"kv_connector_extra_config.{name} must be true or false, got {value!r}"
            )
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(
                f"kv_connector_extra_config.{name} must be a non-negative integer, got {value!r}"
            )
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(
                f"kv_connector_extra_config.{name} must be a non-negative number, got {value!r}"
            )
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"kv_connector_extra_config.{name} must be a string, got {value!r}")
    return value


def parse_extra_config(
    extra: Mapping[str, object] | None, environ: Mapping[str, str] | None = None
) -> ConnectorSettings:
    """Validate ``kv_connector_extra_config`` into connector options and a kvferry config.

    With no ``store.tiers`` given anywhere, the connector uses the default, ``[cpu]``
    (embedded); a disk tier without ``disk.path`` is private to the scheduler process.

    Raises:
        ConfigError: an unknown key (with the valid ones), a bad option value, a config
            section that is not an object, anything the kvferry config models reject, or a
            pipeline that mixes local and shared tiers.
    """
    extra = dict(extra or {})
    sections = set(KvferryConfig.model_fields)
    options: dict[str, object] = {}
    flags: dict[str, object] = {}
    config_file: str | None = None
    preset: str | None = None
    for key, value in extra.items():
        if key in _OPTION_NAMES:
            options[key] = _check_option(key, value)
        elif key == "config_file":
            if not isinstance(value, str) or not value:
                raise ConfigError("kv_connector_extra_config.config_file must be a file path")
            config_file = value
        elif key == "preset":
            if not isinstance(value, str) or not value:
                raise ConfigError("kv_connector_extra_config.preset must be a preset name")
            preset = value
        elif key in sections:
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"kv_connector_extra_config.{key} must be an object of {key} settings "
                    f'(as in a kvferry config file), e.g. {{"{key}": {{...}}}}; got {value!r}'
                )
            for sub, v in value.items():
                flags[f"{key}.{sub}"] = v
        else:
            valid = sorted(_OPTION_NAMES | _FILE_KEYS | sections)
            raise ConfigError(
                f"kv_connector_extra_config has an unknown key {key!r}; valid keys: "
                + ", ".join(valid)
            )
    loaded = load_config(
        config_file=config_file,
        preset=preset,
        flags=flags,
        environ=environ,
        flag_names={k: f"kv_connector_extra_config.{k}" for k in flags},
    )
    config = loaded.config
    store_mode(config)  # refuse a mixed pipeline now, with the message, not later
    return ConnectorSettings(options=ConnectorOptions(**options), config=config)  # type: ignore[arg-type]


def store_mode(config: KvferryConfig) -> StoreMode:
    """``embedded`` when every tier is local, ``shared`` when every tier is shared.

    Raises:
        ConfigError: the pipeline mixes local and shared tiers, or names an unknown tier.
    """
    shared = {name: load_tier(name).shared for name in config.store.tiers}
    if all(shared.values()):
        return "shared"
    if not any(shared.values()):
        return "embedded"
    local = [n for n, s in shared.items() if not s]
    remote = [n for n, s in shared.items() if s]
    raise ConfigError(
        f"store.tiers {config.store.tiers} mixes local tiers ({', '.join(local)}) with shared "
        f"ones ({', '.join(remote)}); the vLLM connector takes either local tiers only "
        "(served from vLLM's scheduler process) or shared tiers only. To put a cpu/disk "
        "pipeline in front of other vLLM instances, run `kvferry serve store` and use "
        "tiers: [server]"
    )
