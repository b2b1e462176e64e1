"""How the doctor sees the machine: one object through which every check reads the system.

Owns :class:`SystemView`: the roots of ``/proc``, ``/sys``, ``/dev`` and ``/dev/shm`` and the
few system calls and probes a check makes (resource limits, ``statvfs``, ``stat``, the CPU
affinity, the io_uring setup probe, the ``O_DIRECT`` probe, the wake-up and H2D probes), each
injectable, so a test points a check at a fake tree built in a temporary
directory and gets the status that tree deserves. Reading only: nothing here writes to the
system, and nothing needs root (a file only root may read reads as absent, and the check
that needed it says so).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvferry.backends.disk_format import probe_direct_io
from kvferry.bench.doctor.probes import H2dSpeed, Latency, h2d_speed, wakeup_latency

__all__ = ["IO_URING_SETUP", "SystemView", "probe_io_uring"]

IO_URING_SETUP = {"x86_64": 425, "aarch64": 425}
"""The ``io_uring_setup`` system call's number per machine (the same on both since 5.1)."""


def probe_io_uring() -> str | None:
    """Whether this process may create an io_uring: None if it may, else why not.

    Calls ``io_uring_setup(1, params)`` and closes the ring: the same answer a real user gets,
    including a seccomp filter (containers) or ``kernel.io_uring_disabled`` refusing it.
    """
    number = IO_URING_SETUP.get(platform.machine())
    if number is None:
        return f"no io_uring_setup number known for {platform.machine()}"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError as e:
        return f"cannot load libc: {e}"
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
    fd = libc.syscall(number, 1, params)
    if fd < 0:
        code = ctypes.get_errno()
        return f"io_uring_setup failed: {errno.errorcode.get(code, code)} ({os.strerror(code)})"
    os.close(fd)
    return None


def _affinity() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


@dataclass
class SystemView:
    """Where the checks read the system (module docstring). The defaults are this machine."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    dev_shm: Path = Path("/dev/shm")
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit
    statvfs: Callable[[str], os.statvfs_result] = os.statvfs
    stat: Callable[[str], os.stat_result] = os.stat
    affinity: Callable[[], set[int]] = _affinity
    io_uring: Callable[[], str | None] = probe_io_uring
    direct_io: Callable[[str], str | None] = probe_direct_io
    """The O_DIRECT probe of a directory: None when it works, else why not."""
    wakeup: Callable[[int], Latency] = wakeup_latency
    """The wake-up latency of a sleeping thread, over that many samples."""
    h2d: Callable[[], H2dSpeed | None] = h2d_speed
    """Pinned host-to-device speed of GPU 0 (imports torch); None without CUDA."""

    def __post_init__(self) -> None:
        self.proc, self.sys, self.dev = Path(self.proc), Path(self.sys), Path(self.dev)
        self.dev_shm = Path(self.dev_shm)

    # -- files -------------------------------------------------------------------------------
    def read(self, path: Path) -> str | None:
        """The text of ``path``, stripped; None when it is absent or unreadable."""
        try:
            return path.read_text(errors="replace").strip()
        except OSError:
            return None

    def proc_text(self, rel: str) -> str | None:
        return self.read(self.proc / rel)

    def sys_text(self, rel: str) -> str | None:
        return self.read(self.sys / rel)

    def proc_int(self, rel: str) -> int | None:
        """An integer file under /proc (``sys/vm/max_map_count``); None if absent or not one."""
        return _int(self.proc_text(rel))

    def sys_int(self, rel: str) -> int | None:
        return _int(self.sys_text(rel))

    def proc_ints(self, rel: str) -> list[int] | None:
        """A file of whitespace-separated integers (``sys/net/ipv4/tcp_rmem``)."""
        text = self.proc_text(rel)
        if text is None:
            return None
        try:
            return [int(x) for x in text.split()]
        except ValueError:
            return None

    def meminfo(self) -> dict[str, int]:
        """``/proc/meminfo`` as name -> value (kB figures in kB, counts as counts)."""
        out: dict[str, int] = {}
        for line in (self.proc_text("meminfo") or "").splitlines():
            name, _, rest = line.partition(":")
            with contextlib.suppress(ValueError, IndexError):
                out[name.strip()] = int(rest.split()[0])
        return out

    def listdir(self, path: Path) -> list[str]:
        """The sorted names in ``path``; empty when it is absent."""
        try:
            return sorted(os.listdir(path))
        except OSError:
            return []


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None
