"""Hanging a child process for a test: what a hung peer looks like from outside (the kernel
still accepts its connections, nothing answers), made with SIGSTOP and undone with SIGCONT.

``os.kill`` returns before the signal has stopped every thread of the target, and a thread still
running on another CPU can answer one more request; ``hung`` waits until ``/proc`` shows every
thread stopped, so the test's next call is sure to meet a hung process.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["hung"]


def _all_stopped(pid: int) -> bool:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True  # gone: nothing left to answer
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue  # a thread that exited meanwhile
        state = stat[stat.rfind(")") + 2 :][:1]  # the field after "(comm)", which may hold ")"
        if state not in ("T", "t"):
            return False
    return True


@contextmanager
def hung(pid: int, timeout: float = 10.0) -> Iterator[None]:
    """Process ``pid`` stopped (every thread) for the ``with`` body, resumed after it however
    the body ends.

    Raises:
        RuntimeError: its threads did not all stop within ``timeout`` seconds.
    """
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout
        while not _all_stopped(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"process {pid} did not stop within {timeout:g}s of SIGSTOP")
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
