"""What each backend of the store bench needs before its clients start: one function per backend.

Owns the preparers (:data:`PREPARERS`, backend name -> function): they check that the filled
keys fit, give each client its config (a disk directory of its own, the address of a server or
master) and start the store-side process when no address is given: ``kvferry serve store`` for
``server`` and ``mooncake_master`` (:mod:`kvferry.backends.mooncake_master`) for ``mooncake``.
Every process they start and every directory they create is registered on the harness's
``ExitStack`` and goes away with it. They never build a store: the clients do, the same way for
every backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from kvferry.bench.store.client import StoreBenchError
from kvferry.config.models import KvferryConfig
from kvferry.errors import ConfigError

if TYPE_CHECKING:
    from kvferry.bench.store.harness import StoreBenchOptions

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
    slot = config.store.slot_size
    usable = int(capacity // slot * config.store.evict_start_threshold)
    if options.num_keys > usable:
        raise ConfigError(
            f"--num-keys {options.num_keys} does not fit: {key} = {capacity} bytes holds "
            f"{usable} slots of {slot} bytes below the eviction threshold "
            f"({config.store.evict_start_threshold:g}); raise --capacity to at least "
            f"{-(-options.num_keys * slot // config.store.evict_start_threshold):.0f} "
            "or lower --num-keys"
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
    addresses = [options.address] if options.address else list(config.server.addresses)
    notes: list[str] = []
    if not addresses:
        _check_fits(options, config, config.cpu.capacity, "cpu.capacity (the server's)")
        addresses = [stack.enter_context(start_store_server(config))]
        notes.append(
            f"server: started `kvferry serve store` on {addresses[0]} (cpu tier, "
            f"{config.cpu.capacity} bytes) for this run"
        )
    server = config.server.model_copy(update={"addresses": addresses, "membership_url": ""})
    cfg = config.model_copy(update={"server": server})
    return Prepared([cfg] * options.clients, {"addresses": addresses}, notes)


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


PREPARERS: dict[str, Preparer] = {
    "cpu": _prepare_cpu,
    "disk": _prepare_disk,
    "redis": _prepare_redis,
    "server": _prepare_server,
    "mooncake": _prepare_mooncake,
}
"""Backend name -> the function that prepares its config (and processes) for the clients."""


@contextlib.contextmanager
def start_store_server(config: KvferryConfig, timeout: float = 60.0) -> Iterator[str]:
    """Run ``python -m kvferry serve store`` (cpu tier, a free port) for the block; yield its
    HOST:PORT from its ``kvferry-store-ready HOST:PORT`` line."""
    with tempfile.TemporaryDirectory(prefix="kvferry-store-bench-") as tmp:
        doc = config.model_dump(mode="json")
        if config.listen.auth_token is not None:
            doc["listen"]["auth_token"] = config.listen.auth_token.get_secret_value()
        doc["server"]["membership_url"] = ""
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(doc))
        cmd = [sys.executable, "-m", "kvferry", "serve", "store", "--config", str(config_file)]
        cmd += ["--port", "0", "--tiers", "cpu", "--quiet"]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            yield _await_line(proc, SERVER_READY, timeout, "kvferry serve store")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _await_line(proc: subprocess.Popen[str], prefix: str, timeout: float, what: str) -> str:
    """The rest of the first stdout line starting with ``prefix``; stdout and stderr are
    drained afterwards by daemon threads so the process never blocks on a full pipe."""
    lines: queue.Queue[str | None] = queue.Queue()
    errors: list[str] = []

    def pump_out() -> None:
        assert proc.stdout is not None  # Popen(stdout=PIPE)
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def pump_err() -> None:
        assert proc.stderr is not None  # Popen(stderr=PIPE)
        for line in proc.stderr:
            errors.append(line)
            del errors[:-50]

    threading.Thread(target=pump_out, daemon=True).start()
    threading.Thread(target=pump_err, daemon=True).start()
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            proc.wait(timeout=10)
            break
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    rc = proc.poll()
    state = f"exited with status {rc}" if rc is not None else f"was not ready in {timeout:g}s"
    raise StoreBenchError(f"{what} {state}: {''.join(errors).strip()[-2000:]}")
