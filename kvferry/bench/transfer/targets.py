"""The engines of a transfer-bench run and the targets they move bytes to and from.

Owns building a backend from its registry name (:func:`make_backend`), serving a target in this
process until a signal (:func:`serve_target`, what ``kvferry bench transfer --target`` runs), and
starting one in a child process on loopback (:func:`spawn_local_target`, the ``--local`` mode)
through :mod:`kvferry.launcher`: its ready line is awaited with a real deadline and the error
quotes the child's stderr. It measures nothing.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from kvferry.bench.transfer.backends.base import TransferBenchBackend
from kvferry.bench.transfer.backends.registry import load as load_backend
from kvferry.bench.transfer.options import TransferBenchOptions
from kvferry.config.models import KvferryConfig
from kvferry.errors import ConfigError
from kvferry.launcher import launch

__all__ = [
    "READY_PREFIX",
    "TARGET_START_TIMEOUT",
    "make_backend",
    "serve",
    "serve_target",
    "spawn_local_target",
]

READY_PREFIX = "kvferry-target-ready "
"""What a target prints, followed by its segment name, once it serves."""
TARGET_START_TIMEOUT = 60.0
"""Seconds a local target has to print its ready line."""


def make_backend(
    name: str, options: TransferBenchOptions, config: KvferryConfig
) -> TransferBenchBackend:
    """The backend registered as ``name``, built with the run's transport and segment type.

    Raises:
        ConfigError: an unknown backend, or one that cannot run here (VRAM without a GPU).
    """
    cls = load_backend(name)
    return cls(transport=options.transport, seg_type=options.seg_type, config=config)


def serve_target(
    backend: TransferBenchBackend,
    total_buffer_size: int,
    announce: Callable[[str], None],
    stop: threading.Event | None = None,
) -> None:
    """Run a target until ``stop`` is set or SIGINT/SIGTERM arrives."""
    name = backend.start_target(total_buffer_size)
    announce(name)
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        backend.close()


def serve(
    options: TransferBenchOptions,
    announce: Callable[[str], None],
    *,
    config: KvferryConfig | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve the one backend of ``options`` (with its overrides) as a target until ``stop``
    is set or a signal arrives; ``announce`` gets the segment name once it serves.

    Raises:
        ConfigError: ``options.backend`` names more than one entry, or a bad override.
    """
    specs = options.contenders()
    if len(specs) != 1:
        raise ConfigError("--target serves one backend; pass a single --backend")
    spec = specs[0]
    backend = make_backend(spec.name, options, spec.config(config or KvferryConfig()))
    serve_target(backend, options.total_buffer_size, announce, stop)


@contextlib.contextmanager
def spawn_local_target(
    backend: str, options: TransferBenchOptions, config: KvferryConfig
) -> Iterator[tuple[str, int]]:
    """Start a target process of ``backend`` on loopback (the ``--local`` mode) with
    ``config``; yield (segment, pid); stop it (SIGTERM, then SIGKILL) afterwards.

    Raises:
        LaunchError: the target exited or did not print its ready line in
            :data:`TARGET_START_TIMEOUT` seconds (the message has its stderr).
    """
    with tempfile.TemporaryDirectory(prefix="kvferry-bench-") as tmp:
        config_file = Path(tmp) / "config.json"
        doc = config.model_dump(mode="json")
        doc["listen"]["port"] = 0
        doc["listen"]["bind_address"] = "127.0.0.1"
        if config.listen.auth_token is not None:
            doc["listen"]["auth_token"] = config.listen.auth_token.get_secret_value()
        config_file.write_text(json.dumps(doc))
        cmd = [
            sys.executable,
            "-m",
            "kvferry",
            "bench",
            "transfer",
            "--target",
            "--backend",
            backend,
            "--transport",
            options.transport,
            "--seg-type",
            options.seg_type,
            "--total-buffer-size",
            str(options.total_buffer_size),
            "--config",
            str(config_file),
            "--quiet",
        ]
        child, line = launch(
            cmd, READY_PREFIX, TARGET_START_TIMEOUT, what=f"the {backend} target process"
        )
        with child:
            yield line[len(READY_PREFIX) :].strip(), child.pid
