"""Reading the ready line of a kvferry server started as a child process, reaping it, and
waiting for a condition a test expects to become true."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time
from collections.abc import Callable
from typing import IO

__all__ = ["read_ready_line", "reap", "wait_for"]


def read_ready_line(
    proc: subprocess.Popen[bytes], timeout: float, log: IO[bytes], what: str, ready: str
) -> str:
    """The first stdout line of ``proc``, which must start with ``ready`` + a space.

    Args:
        proc: started with ``stdout=PIPE``.
        timeout: seconds to wait for the line.
        log: the file its stderr goes to, quoted when it exits first.
        what: the server's name in error messages (e.g. "kvferry serve mock").
        ready: the ready marker (e.g. "kvferry-mock-ready").

    Raises:
        RuntimeError: no line in time, the process exited first (with its stderr), or the line
            is not the ready line.
    """
    stdout = proc.stdout
    if stdout is None:  # pragma: no cover - started with stdout=PIPE
        raise RuntimeError(f"{what}'s stdout is not a pipe")
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"{what} did not start within {timeout:g}s")
        if select.select([stdout], [], [], left)[0]:
            chunk = os.read(stdout.fileno(), 4096)
            if not chunk:
                rc = proc.wait()
                log.seek(0)
                err = log.read().decode(errors="replace")
                raise RuntimeError(f"{what} exited before serving (rc={rc}):\n{err}")
            buf += chunk
    line = buf.split(b"\n", 1)[0].decode()
    if not line.startswith(ready + " "):
        raise RuntimeError(f"{what} printed {line!r}, not its ready line")
    return line


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if it still runs and wait for it (30 s at most)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    proc.wait(timeout=30)


def wait_for(
    check: Callable[[], bool], what: str, timeout: float = 10.0, poll: float = 0.02
) -> None:
    """Poll ``check`` until it is true.

    Raises:
        AssertionError: still false after ``timeout`` seconds (the message names ``what``).
    """
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what}")
        time.sleep(poll)
