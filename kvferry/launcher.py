"""One way to start a child process and wait until it is ready, with a deadline that always fires.

Owns starting a child in its own process group, waiting for its ready line (a prefix or a
predicate, on its stdout or in a log file it writes) or for any condition the caller polls, and
ending it (the whole group: a server's own children go with it). The deadline is real: the wait
selects on the pipe (or polls the log) with the time left, so a child that prints nothing and
never exits ends the wait on time, which a blocking ``readline`` cannot. When the child dies or
the deadline passes, :class:`LaunchError` names the child, its exit status (or that it was still
running, and was killed) and the tail of what it wrote to stderr or its log.

Where the output goes, so that the child never blocks on a full pipe:
    stdout    a pipe read for the ready line; after it, a daemon thread drains it (keeping a tail)
    stderr    a file (``log``, or an unnamed temporary file): nothing needs to drain it, and its
              tail is there to quote at any time
    log mode  (``output="log"``) stdout and stderr both go to ``log``; the ready line is looked
              for in that file
It must not know what the child is: callers (the benches' targets and servers, the test
fixtures) pass the command, the ready marker and a name for messages.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal

from kvferry.errors import KvferryError

__all__ = ["Child", "LaunchError", "Match", "await_line", "launch"]

Match = str | Callable[[str], bool]
"""What makes a line the ready line: a prefix it starts with, or a predicate on it."""

TAIL_CHARS = 3000
"""How much of a child's stderr (or log) an error quotes, from the end."""


class LaunchError(KvferryError, RuntimeError):
    """A child exited before it was ready, or was not ready in time (then it was killed).

    A ``RuntimeError`` too, as the test fixtures that used to raise one documented.
    """

    def __init__(self, message: str, *, exit_code: int | None, tail: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        """The child's exit status (negative: killed by that signal); None: it was running."""
        self.tail = tail
        """The end of what it wrote to stderr (or its log)."""


def _matcher(match: Match) -> Callable[[str], bool]:
    if isinstance(match, str):
        prefix = match
        return lambda line: line.startswith(prefix)
    return match


def _failure(
    what: str, rc: int | None, timeout: float, tail: str, waiting: str = ""
) -> LaunchError:
    if rc is None:
        state = f"was not ready within {timeout:g}s (still running: killed)"
    elif rc < 0:
        state = f"was killed by signal {-rc} before it was ready (rc={rc})"
    else:
        state = f"exited before it was ready (rc={rc})"
    if waiting:
        state += f" (waiting for {waiting})"
    tail = tail.strip()
    return LaunchError(
        f"{what} {state}" + (f"; it wrote:\n{tail}" if tail else "; it wrote nothing"),
        exit_code=rc,
        tail=tail,
    )


def _peek(proc: subprocess.Popen[Any]) -> int | None:
    """``proc``'s exit status if it has ended, else None, without reaping it: while it is an
    unreaped zombie its pid, and so its process group id, cannot be reused, which makes
    signalling the group afterwards safe."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped elsewhere
        return proc.poll()
    if info is None:
        return None
    return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status


def _wait_peek(proc: subprocess.Popen[Any], timeout: float) -> int | None:
    """:func:`_peek` until it has a status or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while (rc := _peek(proc)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return rc


def await_line(
    proc: subprocess.Popen[Any],
    match: Match,
    timeout: float,
    *,
    what: str,
    tail: Callable[[], str] = lambda: "",
    leftover: bytearray | None = None,
) -> str:
    """The first line of ``proc``'s stdout that ``match`` accepts (without its newline).

    Reads the pipe's file descriptor with ``select`` and the time left, never a blocking read,
    so the deadline fires whatever the child does. Lines before the ready one are skipped.

    Args:
        proc: started with ``stdout=PIPE``.
        match: a prefix, or a predicate on a line.
        timeout: seconds to wait in all.
        what: the child's name in the error (``"kvferry serve store"``).
        tail: what the child wrote to stderr so far, for the error.
        leftover: receives the bytes read past the ready line (None: dropped).

    Raises:
        LaunchError: the child closed stdout (it exited: its status is waited for up to 10 s)
            or ``timeout`` passed. Either way the child is left to the caller to end and reap.
    """
    if proc.stdout is None:
        raise ValueError(f"{what}: started without stdout=PIPE, there is no line to wait for")
    accept = _matcher(match)
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = bytearray()
    while True:
        while (newline := buf.find(b"\n")) >= 0:
            line = bytes(buf[:newline]).decode(errors="replace").rstrip("\r")
            del buf[: newline + 1]
            if accept(line):
                if leftover is not None:
                    leftover.extend(buf)
                return line
        left = deadline - time.monotonic()
        if left <= 0:
            raise _failure(what, _peek(proc), timeout, tail())
        if not select.select([fd], [], [], left)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:  # EOF: the child exited (or closed its stdout, which is as bad)
            raise _failure(what, _wait_peek(proc, 10.0), timeout, tail())
        buf += chunk


def _read_tail(f: IO[bytes] | None, path: Path | None) -> str:
    """The last TAIL_CHARS of a file, by handle or path, decoded; "" when it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        if path is not None:
            with path.open("rb") as raw:
                raw.seek(0, os.SEEK_END)
                raw.seek(max(0, raw.tell() - TAIL_CHARS * 4))
                return raw.read().decode(errors="replace")[-TAIL_CHARS:]
        if f is not None:  # an unnamed temporary file, opened for reading and writing
            size = os.fstat(f.fileno()).st_size
            return os.pread(f.fileno(), TAIL_CHARS * 4, max(0, size - TAIL_CHARS * 4)).decode(
                errors="replace"
            )[-TAIL_CHARS:]
    return ""


class Child:
    """A child process in its own process group, whose output never blocks it.

    Use :func:`launch` to start one and wait for its ready line in one call; or build one and
    call :meth:`ready_line` or :meth:`wait_until`. A context manager: leaving it stops the
    child (:meth:`stop`).

    Args:
        argv: the command.
        what: its name in messages (default: ``argv[0]``).
        output: ``"pipe"``: stdout is a pipe (the ready line is read from it) and stderr goes to
            ``log`` or a temporary file; ``"log"``: stdout and stderr both go to ``log``
            (required), where the ready line is looked for.
        log: a file path for stderr (``"pipe"``) or for all output (``"log"``); kept after
            the child ends. None: an unnamed temporary file, gone with :meth:`stop`.
        stdin: True: a pipe (``stdin``; :meth:`stop` closes it first, so a child that serves
            until EOF ends itself); False: ``/dev/null``.
        env, cwd: as for ``subprocess.Popen`` (None: this process's).

    Raises:
        OSError: the command cannot be started (no such program).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        what: str | None = None,
        output: Literal["pipe", "log"] = "pipe",
        log: str | os.PathLike[str] | None = None,
        stdin: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        if output == "log" and log is None:
            raise ValueError("output='log' needs a log path to read the ready line from")
        self.argv = list(argv)
        self.what = what or self.argv[0]
        self.log_path = Path(log) if log is not None else None
        self._output = output
        self._stdout_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._drain: threading.Thread | None = None
        self._log_offset = 0
        if self.log_path is not None:
            self._log: IO[bytes] = self.log_path.open("wb")
        else:
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if output == "pipe" else self._log,
                stderr=self._log if output == "pipe" else subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=cwd,
                start_new_session=True,  # its own process group: stop() ends its children too
            )
        except BaseException:
            self._log.close()
            raise

    # -- facts -------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdin(self) -> IO[bytes] | None:
        return self.proc.stdin

    @property
    def returncode(self) -> int | None:
        """The exit status once it ended (negative: the signal that ended it), else None."""
        return _peek(self.proc)

    def alive(self) -> bool:
        return _peek(self.proc) is None

    def tail(self) -> str:
        """The end of what the child wrote to stderr (or its log) and, after the ready line,
        to stdout: what an error about it quotes."""
        err = _read_tail(None if self._log.closed else self._log, self.log_path)
        out = "".join(self._stdout_tail)[-TAIL_CHARS:]
        return err + (("\n" if err and out else "") + out if out else "")

    # -- waiting -----------------------------------------------------------------------------
    def ready_line(self, match: Match, timeout: float) -> str:
        """Wait for the first line that ``match`` accepts (a prefix or a predicate) and return
        it; the child keeps running (its stdout drained from then on).

        Raises:
            LaunchError: it exited first, or ``timeout`` passed (then it is killed).
        """
        if self._output == "log":
            return self._ready_in_log(_matcher(match), timeout)
        leftover = bytearray()
        try:
            line = await_line(
                self.proc, match, timeout, what=self.what, tail=self.tail, leftover=leftover
            )
        except LaunchError:
            self.kill()
            raise
        self._start_drain(bytes(leftover))
        return line

    def _ready_in_log(self, accept: Callable[[str], bool], timeout: float) -> str:
        assert self.log_path is not None  # checked in __init__
        deadline = time.monotonic() + timeout
        pending = b""
        while True:
            with contextlib.suppress(OSError), self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                chunk = f.read()
                self._log_offset += len(chunk)
                pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").rstrip("\r")
                if accept(line):
                    self._log_offset -= len(pending)  # the rest is not consumed
                    return line
            rc = _peek(self.proc)
            if rc is not None or time.monotonic() >= deadline:
                error = _failure(self.what, rc, timeout, self.tail())
                self.kill()
                raise error
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def wait_until(
        self, check: Callable[[], bool], timeout: float, *, poll: float = 0.1, what: str = ""
    ) -> None:
        """Poll ``check`` until it is true (a health endpoint that answers, a file that
        appears) while the child runs.

        Raises:
            LaunchError: the child exited first, or ``timeout`` passed (then it is killed); the
                message names what was awaited (``what``, e.g. "GET /health").
        """
        deadline = time.monotonic() + timeout
        while True:
            if check():
                return
            rc = _peek(self.proc)
            if rc is not None or time.monotonic() >= deadline:
                error = _failure(self.what, rc, timeout, self.tail(), what)
                self.kill()
                raise error
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    def _start_drain(self, leftover: bytes) -> None:
        """Read stdout until EOF in a daemon thread, keeping its last lines for :meth:`tail`,
        so that a child that goes on printing never blocks on a full pipe."""
        out = self.proc.stdout
        if out is None:
            return
        if leftover:
            self._stdout_tail.append(leftover.decode(errors="replace"))
        fd = out.fileno()

        def drain() -> None:
            with contextlib.suppress(OSError):
                while chunk := os.read(fd, 65536):
                    self._stdout_tail.append(chunk.decode(errors="replace"))

        self._drain = threading.Thread(target=drain, name=f"drain {self.what}", daemon=True)
        self._drain.start()

    # -- ending ------------------------------------------------------------------------------
    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def stop(self, timeout: float = 10.0) -> int:
        """End the child and reap it; idempotent. With a stdin pipe, closing it comes first
        (``timeout`` seconds to exit on EOF); then SIGTERM to its process group (``timeout``
        seconds), then SIGKILL. Returns its exit status."""
        if _peek(self.proc) is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            _wait_peek(self.proc, timeout)
        if _peek(self.proc) is None:
            self._signal_group(signal.SIGTERM)
            _wait_peek(self.proc, timeout)
        return self.kill()

    def kill(self) -> int:
        """SIGKILL the child's process group (resuming it first, if stopped) and reap it;
        idempotent. Returns its exit status."""
        if self.proc.returncode is None:
            # Not reaped yet (running, or a zombie): its pid is still the group's id and ours,
            # so the signal reaches its own children too and nobody else's.
            self._signal_group(signal.SIGCONT)
            self._signal_group(signal.SIGKILL)
        rc = self.proc.wait()
        if self._drain is not None:
            self._drain.join(timeout=5)  # EOF now that every writer is gone
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self.log_path is None and not self._log.closed:
            self._log.close()  # an unnamed file: its tail goes with it
        return rc

    def close(self) -> None:
        """:meth:`stop`, for ``contextlib.closing`` and ``ExitStack.callback``."""
        self.stop()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch(
    argv: Sequence[str],
    ready: Match,
    timeout: float,
    *,
    what: str | None = None,
    output: Literal["pipe", "log"] = "pipe",
    log: str | os.PathLike[str] | None = None,
    stdin: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> tuple[Child, str]:
    """Start ``argv`` (see :class:`Child`) and wait for its ready line; returns the child and
    the line. The caller stops the child (``with child:`` or ``child.stop()``).

    Raises:
        LaunchError: it exited first or was not ready within ``timeout`` seconds (it is killed
            and reaped; the message has its exit status and the tail of its stderr or log).
        OSError: the command cannot be started.
    """
    child = Child(argv, what=what, output=output, log=log, stdin=stdin, env=env, cwd=cwd)
    try:
        return child, child.ready_line(ready, timeout)
    except BaseException:
        child.kill()
        raise
