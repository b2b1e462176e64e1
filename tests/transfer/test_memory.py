"""Memory regions (kvferry/transfer/memory.py) through the engine's allocate/register."""

from __future__ import annotations

import ctypes
import mmap
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kvferry import KvferryConfig, SegmentError, TransferEngine
from kvferry.transfer.memory import PAGE_SIZE, POPULATE_CHUNK, allocate_region

libc = ctypes.CDLL(None, use_errno=True)
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_pages(address: int, size: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """mincore(2): one flag per page, bit 0 set when the page is in memory."""
    pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(address, size, vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    flags: np.ndarray[Any, np.dtype[np.uint8]] = np.frombuffer(bytes(vec), dtype=np.uint8)
    return flags & np.uint8(1)


@pytest.fixture
def engine() -> Iterator[TransferEngine]:
    with TransferEngine(KvferryConfig()) as eng:
        yield eng


def test_register_numpy_shares_memory(engine: TransferEngine) -> None:
    arr = np.arange(1024, dtype=np.float32)
    region = engine.register(arr)
    assert region.size == arr.nbytes == 4096
    assert region.shm is None
    assert region.address == arr.ctypes.data
    region.array[:4] = 0xFF  # writes through to the caller's array, no copy
    assert np.isnan(arr[0])
    assert region in engine.regions


def test_register_2d_numpy(engine: TransferEngine) -> None:
    arr = np.zeros((16, 64), dtype=np.int16)
    region = engine.register(arr)
    assert region.size == 2048
    region.view[-1] = 7
    assert arr.view(np.uint8).reshape(-1)[-1] == 7


def test_register_bytearray(engine: TransferEngine) -> None:
    buf = bytearray(b"hello world")
    region = engine.register(buf)
    assert region.size == len(buf)
    region.view[0:5] = b"HELLO"
    assert buf == bytearray(b"HELLO world")


def test_register_memoryview(engine: TransferEngine) -> None:
    backing = bytearray(100)
    region = engine.register(memoryview(backing)[10:20])
    assert region.size == 10
    region.array[:] = 1
    assert backing[10:20] == b"\x01" * 10
    assert backing[:10] == bytes(10)
    assert backing[20:] == bytes(80)


def test_register_mmap(engine: TransferEngine) -> None:
    m = mmap.mmap(-1, 2 * PAGE_SIZE)
    try:
        region = engine.register(m)
        assert region.size == 2 * PAGE_SIZE
        region.array[PAGE_SIZE] = 42
        assert m[PAGE_SIZE] == 42
        engine.unregister(region)
        del region  # the region object holds the buffer's export until it is dropped
    finally:
        m.close()
    assert m.closed


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: b"immutable bytes", "read-only"),
        (lambda: memoryview(b"immutable bytes"), "read-only"),
        (lambda: np.frombuffer(b"x" * 64, dtype=np.uint8), "writable"),
        (lambda: np.zeros(64, dtype=np.uint8)[::2], "C-contiguous"),
        (lambda: np.zeros((8, 8), dtype=np.uint8, order="F"), "C-contiguous"),
        (lambda: memoryview(bytearray(64))[::2], "C-contiguous"),
        (lambda: bytearray(), "empty"),
        (lambda: np.zeros(0, dtype=np.uint8), "empty"),
        (lambda: [1, 2, 3], "cannot register list"),
        (lambda: 12345, "cannot register int"),
    ],
)
def test_register_refuses(engine: TransferEngine, make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SegmentError, match=message):
        engine.register(make())
    assert engine.regions == []


def test_register_read_only_mmap_refused(engine: TransferEngine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "ro.bin"
    path.write_bytes(b"\x00" * PAGE_SIZE)
    with path.open("rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            with pytest.raises(SegmentError, match="read-only"):
                engine.register(m)
        finally:
            m.close()


def test_read_only_numpy_view_of_writable_array_refused(engine: TransferEngine) -> None:
    arr = np.zeros(64, dtype=np.uint8)
    ro = arr.view()
    ro.flags.writeable = False
    with pytest.raises(SegmentError, match="writable"):
        engine.register(ro)


def test_allocate_zeroes_and_touches_every_page(engine: TransferEngine) -> None:
    size = 64 * PAGE_SIZE + 123  # not a page multiple
    region = engine.allocate(size)
    assert region.size == size
    assert region.shm is not None and region.shm.fd >= 0
    assert region.address % PAGE_SIZE == 0
    assert resident_pages(region.address, size).all(), "allocate left pages untouched"
    assert not region.array.any(), "fresh memory must read as zeros"
    region.array[:] = 0xAB
    assert (region.array == 0xAB).all()


def shmem_bytes() -> int:
    """This process's resident shared memory (memfd pages), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem line in /proc/self/status")


class Stopped(BaseException):
    pass


def test_a_signal_ends_a_large_allocation_promptly_and_frees_it() -> None:
    size = 2 << 30
    seen: list[int] = []

    def stop(signum: int, frame: object) -> None:
        seen.append(shmem_bytes())
        raise Stopped

    before = shmem_bytes()
    old = signal.signal(signal.SIGALRM, stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        with pytest.raises(Stopped):
            allocate_region(1, size)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    # The handler ran while the pages were being touched, not after all 2 GiB were ...
    assert seen and seen[0] - before <= size - POPULATE_CHUNK, seen
    # ... and what had been touched was given back.
    assert shmem_bytes() - before < POPULATE_CHUNK


def test_allocate_gives_distinct_ids_and_memory(engine: TransferEngine) -> None:
    a = engine.allocate(PAGE_SIZE)
    b = engine.allocate(PAGE_SIZE, location="cpu:0")
    assert a.region_id != b.region_id
    a.array[:] = 1
    assert not b.array.any()
    assert {r.region_id for r in engine.regions} == {a.region_id, b.region_id}


@pytest.mark.parametrize("size", [0, -1])
def test_allocate_refuses_non_positive_size(engine: TransferEngine, size: int) -> None:
    with pytest.raises(SegmentError, match="must be positive"):
        engine.allocate(size)


@pytest.mark.parametrize("location", ["gpu", "cpu:", "cpu:x", "cuda:", "cuda:x"])
def test_allocate_refuses_unsupported_location(engine: TransferEngine, location: str) -> None:
    with pytest.raises(SegmentError, match="not supported"):
        engine.allocate(4096, location=location)


def test_unregister(engine: TransferEngine) -> None:
    region = engine.register(bytearray(16))
    engine.unregister(region)
    assert engine.regions == []
    with pytest.raises(SegmentError, match="not registered"):
        engine.unregister(region)
