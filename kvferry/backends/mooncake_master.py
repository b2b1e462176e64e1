"""A real ``mooncake_master`` process for tests and benchmarks of the Mooncake Store tier.

``MooncakeMaster.start()`` finds the binary that the ``mooncake-transfer-engine`` wheel ships,
starts it on free loopback ports (its RPC port and its HTTP metrics/admin port; the HTTP
metadata server stays off: clients use P2PHANDSHAKE metadata, so no etcd is needed), waits until
its RPC port accepts connections, and kills and reaps it on ``close()``. Its glog output goes to
a temporary file (``log()``) rather than a pipe that nobody drains.

This module owns launching one master; it knows nothing about the tier and imports no mooncake
code (the binary is found with ``importlib.util.find_spec``, which does not import the package).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from kvferry.errors import MissingDependency

MASTER_BINARY = "mooncake_master"

_PR_SET_PDEATHSIG = 1


def find_master_binary() -> str:
    """Path of the ``mooncake_master`` executable.

    The binary next to the installed ``mooncake`` package comes first (the ``mooncake_master``
    console script on PATH only ``execv``s it), then ``shutil.which``.

    Raises:
        MissingDependency: neither is there.
    """
    spec = importlib.util.find_spec("mooncake")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / MASTER_BINARY
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which(MASTER_BINARY)
    if found is None:
        raise MissingDependency(MASTER_BINARY, "mooncake")
    return found


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # A master must never outlive the test run that started it, even a killed one.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class MooncakeMaster:
    """One running ``mooncake_master``; use as a context manager or call ``close()``.

    Attributes:
        rpc_port: the port clients connect to.
        metrics_port: the port of its HTTP metrics/admin server (bound to 127.0.0.1).
        address: ``"127.0.0.1:<rpc_port>"``, the ``master_address`` of a Mooncake client.
    """

    def __init__(
        self, proc: subprocess.Popen[bytes], log: IO[bytes], rpc_port: int, metrics_port: int
    ) -> None:
        self.proc = proc
        self._log = log
        self.rpc_port = rpc_port
        self.metrics_port = metrics_port
        self.address = f"127.0.0.1:{rpc_port}"
        self._final_log = ""

    @classmethod
    def start(
        cls,
        *,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        startup_timeout: float = 15.0,
        attempts: int = 3,
    ) -> MooncakeMaster:
        """Start a master on free ports and wait until its RPC port accepts connections.

        Args:
            extra_args: more ``--flag=value`` arguments (e.g.
                ``["--eviction_high_watermark_ratio=1.0"]`` to turn eviction off).
            binary: the executable; default :func:`find_master_binary`.
            startup_timeout: seconds to wait for the RPC port.
            attempts: tries with fresh ports when the master exits at once (a port taken
                between picking and binding it).

        Raises:
            MissingDependency: no ``mooncake_master`` binary.
            RuntimeError: the master exited or did not listen within ``startup_timeout``.
        """
        path = binary or find_master_binary()
        error = RuntimeError("mooncake_master was not started (attempts < 1)")
        for _ in range(attempts):
            rpc_port, metrics_port = free_port(), free_port()
            while metrics_port == rpc_port:
                metrics_port = free_port()
            argv = [
                path,
                f"--rpc_port={rpc_port}",
                "--rpc_address=127.0.0.1",
                f"--metrics_port={metrics_port}",
                "--metrics_host=127.0.0.1",
                "--enable_metric_reporting=false",
                "--enable_http_metadata_server=false",
                *extra_args,
            ]
            log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the master
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
            master = cls(proc, log, rpc_port, metrics_port)
            try:
                master._wait_ready(startup_timeout)
            except RuntimeError as e:
                master.close()
                error = e
                if "exited" not in str(e):
                    break  # a hang, not a lost port race: trying again would hang again
                continue
            return master
        raise error

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not _accepts(self.rpc_port):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mooncake_master exited (rc={self.proc.returncode}) before listening on "
                    f"{self.address}:\n{self.log()[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mooncake_master did not listen on {self.address} within {timeout:g}s:\n"
                    f"{self.log()[-4000:]}"
                )
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        """What the master logged so far (glog lines)."""
        if self._log.closed:
            return self._final_log
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def close(self) -> None:
        """Stop the master (SIGTERM, then SIGKILL after 5 s) and reap it; idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if not self._log.closed:
            self._final_log = self.log()
            self._log.close()

    def __enter__(self) -> MooncakeMaster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.alive() else f"exited rc={self.proc.returncode}"
        return f"<MooncakeMaster {self.address} pid={self.proc.pid} {state}>"
