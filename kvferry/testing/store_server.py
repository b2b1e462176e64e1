"""Store servers (``kvferry serve store``) in their own processes, for tests and benches.

Each :class:`StoreServerProcess` is a real ``python -m kvferry serve store`` child: real
sockets, a real shared-memory pool, and (with ``register=``) a real lease in a real Redis. It
can be stopped cleanly (SIGTERM: the server leaves the membership), killed (SIGKILL: it leaves
its lease to expire) and restarted on the same port. With ``netns=`` it runs inside a network
namespace of a :class:`~kvferry.testing.netns.NetLab`, bound to that namespace's address, as a
server on another host would be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from typing import IO

from kvferry.testing.netns import Netns

__all__ = ["StoreServerProcess"]


class StoreServerProcess:
    """One store server process; ``start`` waits for its ready line.

    Args:
        port: the port to listen on (0: any free port, chosen again by each start).
        extra: more ``kvferry serve store`` arguments (``--register URL``, ``--set k=v``, ...).
        slot_size: ``--slot-size`` in bytes.
        capacity: ``--capacity`` of its cpu tier.
        netns: run inside this network namespace, bound to its address (``--bind ns.ip``).
    """

    def __init__(
        self,
        *extra: str,
        port: int = 0,
        slot_size: int = 4096,
        capacity: str = "4MiB",
        netns: Netns | None = None,
    ) -> None:
        self.port = port
        self.extra = list(extra)
        self.slot_size = slot_size
        self.capacity = capacity
        self.netns = netns
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""
        self._err: IO[str] | None = None

    def start(self) -> StoreServerProcess:
        """Start the server and wait for ``kvferry-store-ready HOST:PORT``.

        Raises:
            RuntimeError: it exited or printed something else first (with its stderr).
        """
        cmd = [sys.executable, "-m", "kvferry", "serve", "store", "--port", str(self.port)]
        cmd += ["--tiers", "cpu", "--capacity", self.capacity, "--slot-size", str(self.slot_size)]
        cmd += ["--quiet", *self.extra]
        if self.netns is not None:
            cmd += ["--bind", self.netns.ip]
        # stderr to a file, not a pipe: a pipe nobody reads would block a chatty server.
        err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the process)
        start = subprocess.Popen if self.netns is None else self.netns.popen
        proc = start(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ))
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("kvferry-store-ready "):
            proc.kill()
            proc.wait()
            err.seek(0)
            raise RuntimeError(f"store server did not start: {line!r} {err.read()[-2000:]}")
        self._err = err
        self.proc = proc
        self.address = line.split()[1]
        self.port = int(self.address.rsplit(":", 1)[1])  # a restart keeps the port
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the store server is not running")
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL and reap: no shutdown of any kind (its lease is left to expire)."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM and reap: the graceful shutdown (it leaves the membership first)."""
        self._end(signal.SIGTERM)

    def _end(self, sig: signal.Signals) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if self._err is not None:
            self._err.close()
