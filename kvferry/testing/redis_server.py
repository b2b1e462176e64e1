"""Private redis-server processes for tests and benches: start, stop, restart on the same port.

Real redis-server binaries (apt package redis-server), without persistence, on 127.0.0.1.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvferry.testing.hang import hung


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("found no free port pair for a cluster node")


def _redis_up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # up (maybe password-only)
    except OSError:
        return False


class RedisProcess:
    """One redis-server without persistence on 127.0.0.1:port; restartable on the same port."""

    def __init__(self, port: int, workdir: Path, extra: list[str]) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = port
        self.workdir = workdir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir), *self.extra]
        log = self.workdir / "redis.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not _redis_up(self.port):
            if self.proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} exited:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING in 15s")
            time.sleep(0.02)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The server hung (SIGSTOP) for the ``with`` body, resumed (SIGCONT) after it however
        the body ends: the kernel still accepts connections, nobody answers."""
        if self.proc is None:
            raise RuntimeError(f"redis-server on port {self.port} is not running")
        with hung(self.proc.pid):
            yield

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class RedisProcesses:
    """A factory starting private redis-server processes under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[RedisProcess] = []

    def __call__(self, *extra: str) -> RedisProcess:
        workdir = self.root / f"redis{len(self.started)}"
        workdir.mkdir()
        port = _free_cluster_port() if "--cluster-enabled" in extra else free_port()
        server = RedisProcess(port, workdir, list(extra))
        self.started.append(server)
        server.start()
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()
