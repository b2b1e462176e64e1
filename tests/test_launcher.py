"""The process launcher (kvferry.launcher): real child processes, real deadlines, no zombies.

Each test bounds its own time with a wall clock around the call, loosely (several times the
deadline under test): the point is that a deadline fires at all, not how precisely.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvferry.errors import KvferryError
from kvferry.launcher import Child, LaunchError, await_line, launch

PY = sys.executable


def _gone(pid: int) -> bool:
    """No process (not even a zombie) has ``pid`` any more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie still answers kill(0); its state in /proc says so
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state != "Z"


def test_a_child_that_prints_nothing_and_never_exits_times_out_and_is_killed() -> None:
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch([PY, "-c", "import time; time.sleep(60)"], "ready", 1.0, what="sleeper")
    assert time.monotonic() - t0 < 5.0
    error = info.value
    assert error.exit_code is None  # it was still running when the deadline fired
    assert "sleeper was not ready within 1s (still running: killed)" in str(error)
    assert isinstance(error, KvferryError) and isinstance(error, RuntimeError)


def test_a_child_that_prints_other_lines_and_never_the_ready_one_times_out() -> None:
    code = "import time\nwhile True:\n    print('noise', flush=True)\n    time.sleep(0.05)"
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="not ready within 1s"):
        launch([PY, "-c", code], "ready", 1.0)
    assert time.monotonic() - t0 < 5.0


def test_a_child_that_exits_names_its_status_and_its_stderr() -> None:
    code = "import sys; print('bad flag --nope', file=sys.stderr); sys.exit(3)"
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch([PY, "-c", code], "ready", 30.0, what="the server")
    assert time.monotonic() - t0 < 10.0  # EOF ends the wait, not the deadline
    assert info.value.exit_code == 3
    assert "the server exited before it was ready (rc=3)" in str(info.value)
    assert "bad flag --nope" in str(info.value) and "bad flag --nope" in info.value.tail


def test_a_child_killed_by_a_signal_says_so() -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    with pytest.raises(LaunchError, match="killed by signal 9") as info:
        launch([PY, "-c", code], "ready", 30.0)
    assert info.value.exit_code == -signal.SIGKILL


def test_a_good_child_returns_its_ready_line_and_stop_reaps_it() -> None:
    code = (
        "import sys, time\n"
        "print('starting', flush=True)\n"
        "print('my-ready 127.0.0.1:5', flush=True)\n"
        "time.sleep(60)"
    )
    child, line = launch([PY, "-c", code], "my-ready ", 30.0)
    pid = child.pid
    assert line == "my-ready 127.0.0.1:5"  # the lines before it are skipped
    assert child.alive() and child.returncode is None
    assert child.stop(timeout=5.0) == -signal.SIGTERM
    assert _gone(pid) and not child.alive()
    assert child.stop() == -signal.SIGTERM  # idempotent


def test_a_predicate_picks_the_line() -> None:
    code = "print('a 1', flush=True); print('b 2', flush=True); import time; time.sleep(60)"
    child, line = launch([PY, "-c", code], lambda text: text.endswith("2"), 30.0)
    with child:
        assert line == "b 2"
    assert not child.alive()


def test_stop_ends_the_childs_own_children_too() -> None:
    # The child starts a grandchild in its group, prints its pid, and sleeps: stop() must end
    # both (a server's workers must not outlive it).
    code = (
        "import subprocess, sys, time\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('ready', g.pid, flush=True)\n"
        "time.sleep(60)"
    )
    child, line = launch([PY, "-c", code], "ready ", 30.0)
    grandchild = int(line.split()[1])
    child.stop(timeout=5.0)
    deadline = time.monotonic() + 5.0
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)  # init reaps the orphan shortly after the kill
    assert _gone(grandchild)


def test_a_child_that_serves_until_eof_on_stdin_ends_itself_on_stop() -> None:
    code = "import sys; print('ready', flush=True); sys.stdin.read(); sys.exit(7)"
    child, _ = launch([PY, "-c", code], "ready", 30.0, stdin=True)
    assert child.stop(timeout=10.0) == 7  # stdin closed: it exited on its own, not by a signal


def test_output_after_the_ready_line_never_blocks_the_child() -> None:
    # 4 MiB to stdout after the ready line: more than a pipe holds; the drain thread reads it.
    code = (
        "import sys\n"
        "print('ready', flush=True)\n"
        "sys.stdout.write('x' * (4 << 20) + '\\nlast line\\n'); sys.stdout.flush()\n"
        "print('done', file=sys.stderr, flush=True)\n"
        "sys.exit(0)"
    )
    child, _ = launch([PY, "-c", code], "ready", 30.0)
    deadline = time.monotonic() + 20.0
    while child.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.returncode == 0  # it wrote everything and exited: never blocked
    assert child.stop() == 0
    assert "last line" in child.tail()


def test_the_ready_line_from_a_log_file(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    code = (
        "import sys, time\n"
        "print('loading', flush=True)\n"
        "print('Application startup complete', file=sys.stderr, flush=True)\n"
        "time.sleep(60)"
    )
    child, line = launch(
        [PY, "-c", code], "Application startup", 30.0, output="log", log=log, what="server"
    )
    with child:
        assert line == "Application startup complete"
        assert "loading" in log.read_text()
    assert not child.alive()


def test_a_log_file_child_that_never_gets_ready_quotes_its_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    code = "import time; print('stuck on step 2', flush=True); time.sleep(60)"
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="stuck on step 2"):
        launch([PY, "-c", code], "ready", 1.0, output="log", log=log)
    assert time.monotonic() - t0 < 5.0


def test_wait_until_polls_a_condition_and_fails_when_the_child_dies(tmp_path: Path) -> None:
    flag = tmp_path / "up"
    code = f"import pathlib, time; time.sleep(0.2); pathlib.Path({str(flag)!r}).touch()"
    code += "; time.sleep(60)"
    with Child([PY, "-c", code]) as child:
        child.wait_until(flag.exists, 30.0, poll=0.02)
    dying = Child([PY, "-c", "import sys; sys.stderr.write('no GPU'); sys.exit(1)"], what="vllm")
    with pytest.raises(
        LaunchError,
        match=r"(?s)vllm exited before it was ready \(rc=1\) "
        r"\(waiting for GET /health\).*no GPU",
    ):
        dying.wait_until(lambda: False, 30.0, what="GET /health")
    assert not dying.alive()


def test_await_line_has_a_deadline_on_a_popen_it_did_not_start() -> None:
    proc = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        with pytest.raises(LaunchError, match=r"not ready within 0\.5s"):
            await_line(proc, "ready", 0.5, what="it")
        assert time.monotonic() - t0 < 5.0
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_missing_program_is_an_os_error() -> None:
    with pytest.raises(OSError):
        launch(["/nonexistent/kvferry-no-such-program"], "ready", 1.0)
