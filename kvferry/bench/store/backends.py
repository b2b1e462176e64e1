"""The store bench's backends, listed once, and what each needs before its clients start.

Owns :data:`BACKENDS`, the one table of the bench's backends (the CLI's choices, the options'
validation and the dispatch all read it): each names its preparer and the settings that apply
to it (``--capacity`` and the config key it sets, ``--disk-path``, ``--redis-url``,
``--address``). A preparer checks that the filled keys fit, gives each client its config (a disk
directory of its own, the address of a server or master) and starts the store-side process when
no address is given: ``kvferry serve store`` for ``server`` (through :mod:`kvferry.launcher`)
and ``mooncake_master`` (:mod:`kvferry.backends.mooncake_master`) for ``mooncake``.
Every process they start and every directory they create is registered on the harness's
``ExitStack`` and goes away with it. They never build a store: the clients do, the same way for
every backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from kvferry.backends.redis import redact_url
from kvferry.bench.store.client import StoreBenchError
from kvferry.config.models import KvferryConfig
from kvferry.errors import ConfigError
from kvferry.launcher import LaunchError, launch

if TYPE_CHECKING:
    from kvferry.bench.store.options import StoreBenchOptions

__all__ = [
    "BACKENDS",
    "SERVER_READY",
    "Prepared",
    "Preparer",
    "StoreBackend",
    "backend_settings",
    "start_store_server",
]

SERVER_READY = "kvferry-store-ready "
"""What ``kvferry serve store`` prints, followed by HOST:PORT, once it accepts connections."""


@dataclass
class Prepared:
    """What a backend's preparer hands the clients: one config per client, facts for the
    report and notes for the reader."""

    configs: list[KvferryConfig]
    info: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


Preparer = Callable[["StoreBenchOptions", KvferryConfig, contextlib.ExitStack], Prepared]


def _check_fits(options: StoreBenchOptions, config: KvferryConfig, capacity: int, key: str) -> None:
    if options.overfill:
        return
    slot = config.store.slot_size
    usable = int(capacity // slot * config.store.evict_start_threshold)
    if options.num_keys > usable:
        raise ConfigError(
            f"--num-keys {options.num_keys} does not fit: {key} = {capacity} bytes holds "
            f"{usable} slots of {slot} bytes below the eviction threshold "
            f"({config.store.evict_start_threshold:g}); raise --capacity to at least "
            f"{-(-options.num_keys * slot // config.store.evict_start_threshold):.0f} "
            "or lower --num-keys (or --overfill to measure the store evicting as it fills)"
        )


def _own_store_note(options: StoreBenchOptions, name: str) -> list[str]:
    if options.clients == 1:
        return []
    return [
        f"{name}: every client process has its own in-process store (in-process tiers are not "
        f"shared between processes); each filled and verified its own {options.num_keys} keys"
    ]


def _prepare_cpu(
    options: StoreBenchOptions, config: KvferryConfig, stack: contextlib.ExitStack
) -> Prepared:
    capacity = config.cpu.buffer_number * config.store.slot_size or config.cpu.capacity
    _check_fits(options, config, capacity, "cpu.capacity")
    return Prepared(
        [config] * options.clients,
        {"capacity_bytes": capacity},
        _own_store_note(options, "cpu"),
    )


def _prepare_disk(
    options: StoreBenchOptions, config: KvferryConfig, stack: contextlib.ExitStack
) -> Prepared:
    _check_fits(options, config, config.disk.capacity, "disk.capacity")
    notes = _own_store_note(options, "disk")
    if not config.disk.path:
        from kvferry.backends.disk import default_root

        # private tiers: each client's unnamed files are its own and go with it
        where = f"unnamed files under {default_root()}"
        if options.clients > 1:
            notes.append(f"disk: each client's tier in its own {where}")
        return Prepared(
            [config] * options.clients,
            {"path": where, "capacity_bytes": config.disk.capacity},
            notes,
        )
    base = (
        Path(config.disk.path).expanduser() / f"kvferry-store-bench-{os.getpid()}-{time.time_ns()}"
    )
    base.mkdir(parents=True)
    stack.callback(shutil.rmtree, base, True)
    configs = [
        config.model_copy(
            update={"disk": config.disk.model_copy(update={"path": str(base / f"client-{i}")})}
        )
        for i in range(options.clients)
    ]
    if options.clients > 1:
        notes.append(f"disk: one directory per client under {base} (removed at the end)")
    return Prepared(configs, {"path": str(base), "capacity_bytes": config.disk.capacity}, notes)


def _prepare_redis(
    options: StoreBenchOptions, config: KvferryConfig, stack: contextlib.ExitStack
) -> Prepared:
    url = urlsplit(config.redis.url)
    shown = url._replace(netloc=url.netloc.rpartition("@")[2]).geturl()
    return Prepared([config] * options.clients, {"url": shown})


def _prepare_server(
    options: StoreBenchOptions, config: KvferryConfig, stack: contextlib.ExitStack
) -> Prepared:
    """Running servers (``--address a,b``, ``server.addresses``, or the membership at
    ``--membership-url``/``server.membership_url``), or one server this run starts."""
    if options.address:
        addresses = [a.strip() for a in options.address.split(",") if a.strip()]
        bad = [a for a in addresses if not _is_host_port(a)]
        if bad or not addresses:
            raise ConfigError(
                f"--address {options.address!r} is invalid: give HOST:PORT of running store "
                "servers, comma-separated (e.g. 127.0.0.1:15428,127.0.0.1:15429)"
            )
    else:
        addresses = list(config.server.addresses)
    membership = config.server.membership_url
    notes: list[str] = []
    if not addresses and not membership:
        _check_fits(options, config, config.cpu.capacity, "cpu.capacity (the server's)")
        addresses = [stack.enter_context(start_store_server(config))]
        notes.append(
            f"server: started `kvferry serve store` on {addresses[0]} (cpu tier, "
            f"{config.cpu.capacity} bytes) for this run"
        )
    elif membership:
        notes.append(
            "server: the servers registered in the membership at "
            f"{redact_url(membership)} (and any --address given)"
        )
    server = config.server.model_copy(update={"addresses": addresses})
    cfg = config.model_copy(update={"server": server})
    info: dict[str, object] = {"addresses": addresses}
    if membership:
        info["membership_url"] = redact_url(membership)
    return Prepared([cfg] * options.clients, info, notes)


def _is_host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _prepare_mooncake(
    options: StoreBenchOptions, config: KvferryConfig, stack: contextlib.ExitStack
) -> Prepared:
    notes: list[str] = []
    address = options.address
    if address is None:
        from kvferry.backends.mooncake_master import MooncakeMaster

        try:
            master = MooncakeMaster.start()
        except RuntimeError as e:
            raise StoreBenchError(f"mooncake_master did not start: {e}") from e
        stack.callback(master.close)
        address = master.address
        notes.append(f"mooncake: started mooncake_master on {address} for this run")
    moon = config.mooncake.model_copy(update={"master_address": address})
    cfg = config.model_copy(update={"mooncake": moon})
    return Prepared([cfg] * options.clients, {"master_address": address}, notes)


@dataclass(frozen=True)
class StoreBackend:
    """One backend of the store bench: the tier it runs (the same name in the tier registry),
    what prepares it, and the settings that apply to it."""

    name: str
    prepare: Preparer
    settings: Mapping[str, str | None] = field(default_factory=dict)
    """Setting (as the CLI spells it) -> the config key it sets; None: an option of the bench
    (``--address``), not a config key."""


BACKENDS: dict[str, StoreBackend] = {
    b.name: b
    for b in (
        StoreBackend("cpu", _prepare_cpu, {"--capacity": "cpu.capacity"}),
        StoreBackend(
            "disk", _prepare_disk, {"--capacity": "disk.capacity", "--disk-path": "disk.path"}
        ),
        StoreBackend("redis", _prepare_redis, {"--redis-url": "redis.url"}),
        # --capacity: of the server a run starts (its cpu tier)
        StoreBackend(
            "server",
            _prepare_server,
            {
                "--capacity": "cpu.capacity",
                "--address": None,
                "--membership-url": "server.membership_url",
            },
        ),
        StoreBackend("mooncake", _prepare_mooncake, {"--address": None}),
    )
}
"""Every backend of the store bench, in the order the CLI lists them."""


def backend_settings(backend: str, given: Mapping[str, object | None]) -> dict[str, object]:
    """The config keys that the settings ``given`` (``{"--capacity": 4096, ...}``, None: not
    given) set for ``backend``.

    Raises:
        ConfigError: an unknown backend, or a setting given that does not apply to it (the
            message names the backends it is for).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r} is invalid: must be {', '.join(BACKENDS)}")
    applies = BACKENDS[backend].settings
    keys: dict[str, object] = {}
    for setting, value in given.items():
        if value is None:
            continue
        if setting not in applies:
            users = [b.name for b in BACKENDS.values() if setting in b.settings]
            raise ConfigError(
                f"{setting} does not apply to --backend {backend}; it is for "
                f"--backend {' or '.join(users)}"
            )
        key = applies[setting]
        if key is not None:
            keys[key] = value
    return keys


@contextlib.contextmanager
def start_store_server(config: KvferryConfig, timeout: float = 60.0) -> Iterator[str]:
    """Run ``python -m kvferry serve store`` (cpu tier, a free port) for the block; yield its
    HOST:PORT from its ``kvferry-store-ready HOST:PORT`` line; stop it afterwards.

    Raises:
        StoreBenchError: it exited or was not ready within ``timeout`` seconds (the message
            has its exit status and stderr).
    """
    with tempfile.TemporaryDirectory(prefix="kvferry-store-bench-") as tmp:
        doc = config.model_dump(mode="json")
        if config.listen.auth_token is not None:
            doc["listen"]["auth_token"] = config.listen.auth_token.get_secret_value()
        doc["server"]["membership_url"] = ""
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(doc))
        cmd = [sys.executable, "-m", "kvferry", "serve", "store", "--config", str(config_file)]
        cmd += ["--port", "0", "--tiers", "cpu", "--quiet"]
        try:
            child, line = launch(cmd, SERVER_READY, timeout, what="kvferry serve store")
        except LaunchError as e:
            raise StoreBenchError(str(e)) from e
        with child:
            yield line[len(SERVER_READY) :].strip()
