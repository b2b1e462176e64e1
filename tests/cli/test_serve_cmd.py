"""``kvferry serve store`` as a real process: validation before allocation, signals while it
starts, and a graceful SIGTERM that keeps the cpu tier's blocks on disk."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.server.client import ServerTier
from kvferry.config.models import ServerTierConfig
from kvferry.testing.redis_server import free_port
from kvferry.testing.tier_kit import key, value

REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs the CLI and reports its own peak RSS (shared memory included) on the last stderr line.
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a big pytest process
# would report the parent's peak; VmHWM belongs to the new address space.
_MEASURED = (
    "import sys\n"
    "from kvferry.cli.main import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
    "print('maxrss_kib', hwm, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("KVFERRY_")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), out.get("PYTHONPATH")]))
    return out


def serve_store(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvferry", "serve", "store", "--quiet", *args]


def run_measured(*args: str) -> tuple[int, str, int]:
    """(exit status, stderr without the measurement, peak RSS in bytes) of ``serve store``."""
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURED, "serve", "store", "--quiet", *args],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
        check=False,
    )
    *lines, last = proc.stderr.strip().splitlines()
    assert last.startswith("maxrss_kib "), proc.stderr
    return proc.returncode, "\n".join(lines), int(last.split()[1]) * 1024


POOL = "1GiB"
"""Big enough that allocating it shows in the peak RSS; allowed on any machine that runs this."""


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--tiers", "cpu,redis"], "local tiers only (cpu, disk), not 'redis'"),
        (["--bind", "192.0.2.1"], "cannot listen on 192.0.2.1:0"),  # TEST-NET-1: not this host
        (["--tiers", "cpu,disk", "--disk-path", "/proc/version/slots"], "is not a directory"),
        (["--tiers", "cpu,disk", "--set", "disk.capacity=1000TiB"], "disk.force_capacity"),
    ],
)
def test_everything_is_validated_before_the_pool_is_allocated(
    args: list[str], fragment: str
) -> None:
    rc, err, peak = run_measured("--port", "0", "--capacity", POOL, *args)
    assert rc == 2, err
    assert err.startswith("error: ") and fragment in err and "Traceback" not in err, err
    assert peak < (1 << 30) // 2, f"peak RSS {peak >> 20} MiB: the pool was allocated first"


def test_a_port_in_use_is_refused_before_the_pool_is_allocated() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, err, peak = run_measured("--port", str(port), "--capacity", POOL, "--tiers", "cpu")
    assert rc == 2 and f"cannot listen on 127.0.0.1:{port}" in err, err
    assert peak < (1 << 30) // 2


def test_a_capacity_above_the_available_memory_names_the_flag() -> None:
    rc, err, _ = run_measured("--port", "0", "--tiers", "cpu", "--capacity", "1000TiB")
    assert rc == 2
    assert "1000TiB" in err and "MemAvailable" in err and "--force-capacity" in err


def shmem_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    return 0


def test_sigterm_while_the_pool_is_being_touched_exits_promptly() -> None:
    proc = subprocess.Popen(
        serve_store("--port", "0", "--tiers", "cpu", "--capacity", "4GiB"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        deadline = time.monotonic() + 30
        while shmem_of(proc.pid) < 128 << 20:  # the pool is being touched now
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the pool was never touched"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "kvferry-store-ready" not in out  # it never finished starting
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM while the store server was starting" in err, err
    assert "Traceback" not in err
    assert took < 3.0, f"took {took:.1f}s to stop"


SLOT = 4096


def start_ready(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        serve_store(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("kvferry-store-ready "):
        proc.kill()
        raise AssertionError(f"no ready line: {line!r} {proc.communicate()[1]}")
    return proc, line.split()[1]


def client(address: str) -> ServerTier:
    return ServerTier(ServerTierConfig(addresses=[address]), TierContext(slot_size=SLOT))


def test_a_graceful_sigterm_keeps_the_cpu_tiers_blocks_on_disk(tmp_path: Path) -> None:
    # 64 cpu slots (eviction from about 57) in front of 256 disk slots: of 200 blocks, the
    # newest stay only in the cpu tier until shutdown.
    args = ["--port", "0", "--tiers", "cpu,disk", "--capacity", str(64 * SLOT)]
    args += ["--slot-size", str(SLOT), "--disk-path", str(tmp_path / "disk")]
    args += ["--set", "disk.capacity=2MiB"]
    keys, values = [key(i) for i in range(200)], [value(i, SLOT) for i in range(200)]
    proc, address = start_ready(args)
    try:
        tier = client(address)
        for i in range(0, 200, 8):
            assert tier.put(keys[i : i + 8], values[i : i + 8]) == [PutStatus.STORED] * 8
        stats = next(iter(tier.server_stats().values()))
        only_in_cpu = stats["usage"]["cpu"]["used_blocks"]
        assert only_in_cpu > 0 and stats["usage"]["disk"]["used_blocks"] == 200 - only_in_cpu
        tier.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    proc, address = start_ready(args)  # the same disk directory: its index is rebuilt
    try:
        tier = client(address)
        assert sorted(tier.keys()) == sorted(keys)
        outs = [memoryview(bytearray(SLOT)) for _ in keys]
        assert tier.get(keys, outs) == [SLOT] * 200
        assert [bytes(o) for o in outs] == values
        tier.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


# ---- defaults: no disk unless asked, one directory per server, layouts that do not trap ----


def home_env(home: Path, **extra: str) -> dict[str, str]:
    """``env()`` with ``home`` as HOME (where ``~/.cache/kvferry`` lands) and ``extra`` set."""
    out = env()
    out["HOME"] = str(home)
    out.update(extra)
    return out


def start_in(home: Path, args: list[str], **extra: str) -> tuple[subprocess.Popen[str], str, str]:
    """``serve store ARGS`` (not quiet) with ``home`` as HOME: (process, address, the line that
    describes it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvferry", "serve", "store", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=home_env(home, **extra),
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if not line.startswith("kvferry-store-ready "):
        proc.kill()
        raise AssertionError(f"no ready line: {line!r} {proc.communicate()[1]}")
    # its one-line description follows on stderr (after any log lines)
    said = ""
    while not said.startswith("store server on "):
        said = proc.stderr.readline()
        assert said, "stderr ended before the description"
    return proc, line.split()[1], said.strip()


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM and wait; the rest of stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err


def round_trip(address: str, i: int) -> None:
    tier = client(address)
    try:
        assert tier.put([key(i)], [value(i, SLOT)]) == [PutStatus.STORED]
        out = memoryview(bytearray(SLOT))
        assert tier.get([key(i)], [out]) == [SLOT] and bytes(out) == value(i, SLOT)
    finally:
        tier.close()


def test_two_default_servers_on_one_host_both_serve_and_take_no_disk(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    first, a, said = start_in(home, ["--port", "0", "--capacity", "64MiB"])
    try:
        assert "no disk tier" in said and "--tiers cpu,disk" in said, said
        second, b, _ = start_in(home, ["--port", "0", "--capacity", "64MiB"])
        try:
            round_trip(a, 1)
            round_trip(b, 2)
            assert list(home.iterdir()) == [], "a default server wrote under HOME"
        finally:
            assert second.poll() is None, stop(second)
            stop(second)
    finally:
        stop(first)
    assert first.returncode == second.returncode == 0


def test_servers_with_a_disk_tier_get_a_directory_per_port(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ports = [free_port(), free_port()]
    args = ["--tiers", "cpu,disk", "--capacity", "1MiB", "--slot-size", str(SLOT)]
    args += ["--disk-capacity", "1MiB"]
    procs = []
    try:
        for port in ports:
            proc, address, said = start_in(home, ["--port", str(port), *args])
            procs.append(proc)
            where = home / ".cache" / "kvferry" / "disk" / f"store-{port}"
            assert f"disk 1MiB in {where} " in said, said  # where, and how much
            assert "--disk-path" in said and "--disk-capacity" in said, said  # and how to change

            assert (where / "layout.json").is_file()
            round_trip(address, port)
    finally:
        for proc in procs:
            stop(proc)
    # a restart on the same port finds its blocks
    proc, address, _ = start_in(home, ["--port", str(ports[0]), *args])
    try:
        tier = client(address)
        assert tier.contains([key(ports[0]), key(ports[1])]) == [True, False]
        tier.close()
    finally:
        stop(proc)


def test_a_disk_directory_of_another_layout_is_one_error_naming_the_flags(
    tmp_path: Path,
) -> None:
    where = tmp_path / "disk"
    common = ["--port", "0", "--tiers", "cpu,disk", "--disk-path", str(where)]
    common += ["--capacity", "4MiB", "--set", "disk.capacity=8MiB"]
    proc, _, _ = start_in(tmp_path, [*common, "--slot-size", "1MiB"])
    assert stop(proc) is not None and proc.returncode == 0
    for _ in range(2):  # a refused start changes nothing: the same error again
        refused = subprocess.run(
            serve_store(*common), capture_output=True, text=True, env=env(), timeout=60
        )
        err = refused.stderr.strip()
        assert refused.returncode == 2 and len(err.splitlines()) == 1, err
        assert err.startswith("error: ") and str(where) in err and "another layout" in err, err
        assert "--disk-path" in err and "--wipe-disk" in err, err
    proc, address, _ = start_in(tmp_path, [*common, "--slot-size", str(SLOT), "--wipe-disk"])
    try:
        round_trip(address, 3)
    finally:
        stop(proc)
    proc, address, _ = start_in(tmp_path, [*common, "--slot-size", str(SLOT)])  # no flag needed now
    try:
        tier = client(address)
        assert tier.contains([key(3)]) == [True]
        tier.close()
    finally:
        stop(proc)


README_STORE = """
from kvferry import TieredStore, load_config
config = load_config(flags={"store.tiers": ["cpu", "disk"], "cpu.capacity": "16MiB"}).config
with TieredStore(config) as store:
    print("tiers", store.names, store.put([bytes(16)], [b"x" * 100])[0].value)
"""


def test_the_readme_store_examples_run_after_a_1mib_server_ran(tmp_path: Path) -> None:
    # README: `kvferry serve store --port 15500 --capacity 2GiB --slot-size 1MiB &`, then the
    # Python API's TieredStore example and examples/store_quickstart.py.
    home = tmp_path / "home"
    small = {"KVFERRY_DISK_CAPACITY": "16MiB"}  # what the README's 4 GiB would be, smaller
    proc, _, _ = start_in(home, ["--port", "0", "--capacity", "16MiB", "--slot-size", "1MiB"])
    stop(proc)
    assert proc.returncode == 0
    outputs = []
    for cmd in (
        [sys.executable, "-c", README_STORE],
        [sys.executable, str(REPO_ROOT / "examples" / "store_quickstart.py")],
    ):
        ran = subprocess.run(
            cmd, capture_output=True, text=True, env=home_env(home, **small), timeout=60
        )
        assert ran.returncode == 0 and "Traceback" not in ran.stderr, ran.stderr
        outputs.append(ran.stdout)
    assert "tiers ['cpu', 'disk'] stored" in outputs[0]
    assert "lookup (all tiers): 40 of 40" in outputs[1]
    # the store's disk tier was this process's own: nothing of it is left behind
    disk = home / ".cache" / "kvferry" / "disk"
    assert not disk.exists() or list(disk.iterdir()) == []
