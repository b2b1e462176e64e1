"""Reading the ready line of a kvferry server started as a child process, reaping it, and
waiting for a condition a test expects to become true.

The ready line is read by :func:`kvferry.launcher.await_line` (one deadline that fires whatever
the child does); fixtures that start a child themselves use :class:`kvferry.launcher.Child`.
``wait_for`` is another thing: it polls a condition in this process, no child involved."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable
from typing import IO

from kvferry.launcher import TAIL_CHARS, await_line

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
        LaunchError: (a RuntimeError) no line in time, or the process exited first (with its
            status and the end of its stderr); the caller reaps it.
        RuntimeError: the first line is not the ready line.
    """

    def stderr() -> str:
        with contextlib.suppress(OSError, ValueError):
            size = os.fstat(log.fileno()).st_size
            return os.pread(log.fileno(), TAIL_CHARS, max(0, size - TAIL_CHARS)).decode(
                errors="replace"
            )
        return ""

    line = await_line(proc, lambda _: True, timeout, what=what, tail=stderr)
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
