"""Tests for the Mooncake bench backend: real bytes between two processes over Mooncake's TCP
transport (target in a child process, initiator in the test process).

Child processes serve until their stdin reaches EOF, so they exit when the test closes the pipe
and also when the test process dies for any reason: no orphans.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mooncake")

from kvferry.bench.transfer.backends.mooncake import MooncakeBenchBackend, find_readable_size
from kvferry.errors import PeerClosed, SegmentError, TransferError
from kvferry.launcher import launch

pytestmark = pytest.mark.mooncake

KIB = 1024
MIB = 1024 * KIB
TARGET_BYTES = 4 * MIB
LOCAL_BYTES = 4 * MIB
# The last UNTOUCHED_BYTES of the target are never written by any test, so reads there must
# return the zeros the target started with.
UNTOUCHED_BYTES = 256 * KIB
REPO_ROOT = Path(__file__).resolve().parents[2]

_KVFERRY_TARGET = """
import sys
from kvferry.bench.transfer.backends.mooncake import MooncakeBenchBackend, find_readable_size
backend = MooncakeBenchBackend()
try:
    print(backend.start_target(int(sys.argv[1])), flush=True)
    sys.stdin.read()  # serve until EOF: the test closed the pipe, or the test process died
finally:
    backend.close()
"""

# A plain Mooncake target with no kvferry header, like Mooncake's own tebench target: the
# initiator must probe its capacity. Its buffer holds (i % 251) at byte i.
_FOREIGN_TARGET = """
import sys
import numpy as np
from mooncake.engine import TransferEngine
engine = TransferEngine()
if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
    sys.exit("initialize failed")
buf = (np.arange(int(sys.argv[1])) % 251).astype(np.uint8)
if engine.register_memory(buf.ctypes.data, buf.nbytes) != 0:
    sys.exit("register_memory failed")
print(f"127.0.0.1:{engine.get_rpc_port()}", flush=True)
sys.stdin.read()
engine.unregister_memory(buf.ctypes.data)
"""


def _serving(code: str, arg: int, log: Path) -> Iterator[str]:
    """Run ``code`` in a child Python; yield the segment name it prints; stop it afterwards
    (EOF on its stdin first, then signals if it lingers). Its stderr goes to ``log``, a file:
    nobody has to drain Mooncake's log lines."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-c", code, str(arg)]
    child, line = launch(
        argv, lambda text: bool(text.strip()), 60.0, what="target", log=log, stdin=True, env=env
    )
    with child:
        yield line.strip()


@pytest.fixture(scope="module")
def target_seg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("mooncake") / "target.log"
    yield from _serving(_KVFERRY_TARGET, TARGET_BYTES, log)


@pytest.fixture(scope="module")
def initiator(target_seg: str) -> Iterator[MooncakeBenchBackend]:
    backend = MooncakeBenchBackend()
    try:
        backend.connect(target_seg, LOCAL_BYTES)
        yield backend
    finally:
        backend.close()


def _local(backend: MooncakeBenchBackend) -> np.ndarray:
    return np.frombuffer(backend.local_buffer(), dtype=np.uint8)


def test_segment_name_capacity_and_describe(
    target_seg: str, initiator: MooncakeBenchBackend
) -> None:
    host, _, port = target_seg.rpartition(":")
    assert host == "127.0.0.1"
    assert int(port) > 0
    assert initiator.target_capacity() == TARGET_BYTES
    info = initiator.describe()
    assert info["backend"] == "mooncake"
    assert info["protocol"] == "tcp"
    assert info["mooncake_version"] not in ("", "unknown")
    assert info["target_capacity"] == TARGET_BYTES


def test_local_buffer_is_writable_and_sized(initiator: MooncakeBenchBackend) -> None:
    view = initiator.local_buffer()
    assert view.nbytes == LOCAL_BYTES
    assert not view.readonly


def test_write_zero_read_back_every_byte(initiator: MooncakeBenchBackend) -> None:
    block, batch = 64 * KIB, 16
    local = _local(initiator)
    rng = np.random.default_rng(1)
    # Target blocks in a shuffled order, so a mixed-up address shows as a mismatch.
    target_offsets = [int(i) * block for i in rng.permutation(batch)]
    local_offsets = [i * block for i in range(batch)]
    pattern = rng.integers(0, 256, size=batch * block, dtype=np.uint8)
    local[: batch * block] = pattern

    initiator.run_batch("write", local_offsets, target_offsets, block)
    local[:] = 0
    initiator.run_batch("read", local_offsets, target_offsets, block)
    assert np.array_equal(local[: batch * block], pattern)

    # Read the same target blocks back in target order into the second MiB of the local buffer.
    local[:] = 0
    base = batch * block
    initiator.run_batch("read", [base + t for t in target_offsets], target_offsets, block)
    for i, t in enumerate(target_offsets):
        got = local[base + t : base + t + block]
        assert np.array_equal(got, pattern[i * block : (i + 1) * block]), f"block {i}"


def test_read_of_never_written_region_gives_zeros(initiator: MooncakeBenchBackend) -> None:
    local = _local(initiator)
    local[:] = 0xFF
    start = TARGET_BYTES - UNTOUCHED_BYTES
    block = 4 * KIB
    n = UNTOUCHED_BYTES // block
    initiator.run_batch(
        "read", [i * block for i in range(n)], [start + i * block for i in range(n)], block
    )
    assert not local[:UNTOUCHED_BYTES].any()
    assert (local[UNTOUCHED_BYTES:] == 0xFF).all()  # nothing outside the batch was touched


def test_four_threads_with_disjoint_offsets(initiator: MooncakeBenchBackend) -> None:
    threads, block, batch, rounds = 4, 16 * KIB, 8, 5
    region = block * batch * 2  # each thread owns this much of the local buffer and the target
    assert threads * region <= TARGET_BYTES - UNTOUCHED_BYTES
    local = _local(initiator)
    barrier = threading.Barrier(threads)
    errors: list[str] = []

    def work(t: int) -> None:
        try:
            rng = np.random.default_rng(100 + t)
            lo = t * region
            barrier.wait(timeout=30)
            for r in range(rounds):
                # Alternate halves of the region and shuffle the target side per round.
                local_offsets = [lo + i * block for i in range(batch)]
                target_offsets = [
                    lo + (r % 2) * (region // 2) + int(i) * block for i in rng.permutation(batch)
                ]
                pattern = rng.integers(0, 256, size=batch * block, dtype=np.uint8)
                local[lo : lo + batch * block] = pattern
                initiator.run_batch("write", local_offsets, target_offsets, block)
                local[lo : lo + batch * block] = 0
                initiator.run_batch("read", local_offsets, target_offsets, block)
                if not np.array_equal(local[lo : lo + batch * block], pattern):
                    errors.append(f"thread {t} round {r}: data mismatch")
        except Exception as e:  # report in the main thread: an assert here would be lost
            errors.append(f"thread {t}: {e!r}")

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not any(w.is_alive() for w in workers), "a bench thread hung"
    assert errors == []


def test_out_of_bounds_offsets_raise_segment_error(initiator: MooncakeBenchBackend) -> None:
    with pytest.raises(SegmentError, match="target capacity"):
        initiator.run_batch("read", [0], [TARGET_BYTES - 100], 4 * KIB)
    with pytest.raises(SegmentError, match="local buffer"):
        initiator.run_batch("read", [LOCAL_BYTES], [0], 4 * KIB)
    with pytest.raises(SegmentError):
        initiator.run_batch("write", [-1], [0], 4 * KIB)


def test_mooncake_failure_raises_transfer_error(
    initiator: MooncakeBenchBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend the target is larger than it is, so the range check here passes and the request
    # reaches Mooncake, whose target rejects it: the real failure path, with its return code.
    monkeypatch.setattr(initiator, "_target_capacity", TARGET_BYTES + 1 * MIB)
    with pytest.raises(TransferError, match="code -1"):
        initiator.run_batch("read", [0], [TARGET_BYTES + 64 * KIB], 4 * KIB)
    monkeypatch.undo()
    initiator.run_batch("read", [0], [0], 4 * KIB)  # the session still works afterwards


def test_bad_arguments_raise_value_error(initiator: MooncakeBenchBackend) -> None:
    with pytest.raises(ValueError, match="entries"):
        initiator.run_batch("read", [0, 4096], [0], 4096)
    with pytest.raises(ValueError, match="op="):
        initiator.run_batch("copy", [0], [0], 4096)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "size",
    [1, 2, 23, 4095, 4096, 4097, 1 * MIB, 1 * MIB + 12345, 2**30 - 1, 2**30, 2**30 + 1, 10**12],
)
def test_find_readable_size_is_exact_with_at_most_four_failures(size: int) -> None:
    probes: list[int] = []

    def readable(n: int) -> bool:
        assert n >= 1
        probes.append(n)
        return n <= size

    assert find_readable_size(readable, max_failures=4) == size
    failures = [n for n in probes if n > size]
    assert len(failures) <= 4
    # Nothing is sent after the 4th failure: that request would fail spuriously in Mooncake.
    if len(failures) == 4:
        assert probes[-1] == failures[-1]
    assert len(probes) < 20_000


def test_foreign_target_capacity_is_probed(tmp_path: Path) -> None:
    size = 1 * MIB + 12345  # not a power of two: the probe must find the exact end
    for seg in _serving(_FOREIGN_TARGET, size, tmp_path / "foreign.log"):
        backend = MooncakeBenchBackend()
        try:
            backend.connect(seg, 64 * KIB)
            assert backend.target_capacity() == size
            # No header on a foreign target: offset 0 is the start of its buffer.
            block = 4 * KIB
            offsets = [0, size - block]
            backend.run_batch("read", [0, block], offsets, block)
            local = _local(backend)
            for i, off in enumerate(offsets):
                expected = (np.arange(off, off + block) % 251).astype(np.uint8)
                assert np.array_equal(local[i * block : (i + 1) * block], expected)
            # The rejected probes ran on a throwaway engine, so this session has no failures on
            # its count (after 4, Mooncake fails the next request spuriously: TransferError).
            for _ in range(5):
                backend.run_batch("read", [0], [0], block)
        finally:
            backend.close()


def test_connect_to_dead_segment_raises_peer_closed() -> None:
    backend = MooncakeBenchBackend()
    try:
        with pytest.raises(PeerClosed, match=re.escape("127.0.0.1:1")):
            backend.connect("127.0.0.1:1", 64 * KIB)  # port 1: nothing listens there
    finally:
        backend.close()


def test_close_is_idempotent(target_seg: str) -> None:
    backend = MooncakeBenchBackend()
    backend.connect(target_seg, 64 * KIB)
    backend.close()
    backend.close()
    with pytest.raises(SegmentError, match="connect"):
        backend.local_buffer()
    with pytest.raises(SegmentError, match="connect"):
        backend.run_batch("read", [0], [0], 4 * KIB)
