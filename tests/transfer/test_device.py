"""GPU memory in the transfer engine (DeviceRegion): staged through host memory on every path.

Each test runs twice: ``cuda`` on a real GPU (skipped where none exists; CI has none), and
``staged-cpu``, a DeviceRegion over a CPU tensor, which takes every staging step of the engine,
the local transport and the tcp server with CPU copies, so the staging logic is tested here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from kvferry import (
    KvferryConfig,
    OpCode,
    SegmentError,
    TransferEngine,
    TransferRequest,
    TransferState,
)
from kvferry.errors import RemoteError, TransferError
from kvferry.transfer.memory import DeviceRegion, MemoryRegion

torch = pytest.importorskip("torch")

MiB = 1 << 20
HAS_CUDA = bool(torch.cuda.is_available())
Region = MemoryRegion | DeviceRegion


@pytest.fixture(params=["staged-cpu", "cuda"])
def device_memory(request: pytest.FixtureRequest) -> Callable[[TransferEngine, int], DeviceRegion]:
    """A factory of device regions registered with an engine."""
    if request.param == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device here (this case runs on a GPU machine)")

    def make(engine: TransferEngine, size: int) -> DeviceRegion:
        if request.param == "cuda":
            region = engine.allocate(size, location="cuda:0")
            assert isinstance(region, DeviceRegion)
            return region
        return engine._add_region(
            DeviceRegion(next(engine._region_ids), torch.zeros(size, dtype=torch.uint8))
        )

    return make


def engine_over(transport: str) -> TransferEngine:
    return TransferEngine(KvferryConfig(listen={"port": 0}, transfer={"transport": transport}))


def read_bytes(region: Region, start: int, n: int) -> np.ndarray[Any, Any]:
    if isinstance(region, DeviceRegion):
        return region.tensor[start : start + n].cpu().numpy()
    return region.array[start : start + n].copy()


def write_bytes(region: Region, start: int, data: np.ndarray[Any, Any]) -> None:
    if isinstance(region, DeviceRegion):
        region.tensor[start : start + data.size].copy_(torch.from_numpy(data))
    else:
        region.array[start : start + data.size] = data


def sizes_and_offsets(slice_size: int) -> list[tuple[int, int, int]]:
    """(length, local offset, target offset): unaligned, straddling the slicing rules."""
    lengths = [1, slice_size - 1, slice_size + 1, 3 * slice_size + 5, MiB]
    out, lo, to = [], 3, 11
    for n in lengths:
        out.append((n, lo, to))
        lo += n + 7
        to += n + 13
    return out


@pytest.fixture(params=["local", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("sides", ["device->host", "host->device", "device->device"])
def test_roundtrip(
    device_memory: Callable[[TransferEngine, int], DeviceRegion], transport: str, sides: str
) -> None:
    local_dev, target_dev = sides.split("->")[0] == "device", sides.split("->")[1] == "device"
    with engine_over(transport) as eng:
        local = device_memory(eng, 4 * MiB) if local_dev else eng.allocate(4 * MiB)
        target = device_memory(eng, 4 * MiB) if target_dev else eng.allocate(4 * MiB)
        h = eng.open_segment(eng.listen())
        assert h.transport == transport
        assert h.peer.region(target.region_id).location == target.location
        cases = sizes_and_offsets(int(eng.config.transfer.slice_size))
        rng = np.random.default_rng(7)
        data = [rng.integers(0, 256, n, dtype=np.uint8) for n, _, _ in cases]
        for (_, lo, _), d in zip(cases, data):
            write_bytes(local, lo, d)
        reqs = [
            TransferRequest(OpCode.WRITE, local, lo, h, to, n, target.region_id)
            for n, lo, to in cases
        ]
        eng.transfer_sync(reqs, timeout=30)
        for (_, _, to), d in zip(cases, data):
            assert np.array_equal(read_bytes(target, to, d.size), d)
        write_bytes(local, 0, np.zeros(local.size, dtype=np.uint8))
        reqs = [
            TransferRequest(OpCode.READ, local, lo, h, to, n, target.region_id)
            for n, lo, to in cases
        ]
        batch = eng.allocate_batch(len(reqs))
        eng.submit(batch, reqs)
        status = eng.wait(batch, timeout=30)
        assert status.state is TransferState.COMPLETED, status.errors
        assert [r.transferred_bytes for r in status.requests] == [n for n, _, _ in cases]
        for (_, lo, _), d in zip(cases, data):
            assert np.array_equal(read_bytes(local, lo, d.size), d)
        moved = sum(n for n, _, _ in cases)
        counters = eng.metrics()[transport]
        assert (counters["bytes_written"], counters["bytes_read"]) == (moved, moved)


def test_device_buffer_to_a_target_process(
    device_memory: Callable[[TransferEngine, int], DeviceRegion],
    target_process: Callable[..., Any],
) -> None:
    target = target_process()
    expected = target.expected(0)
    with engine_over("auto") as eng:
        local = device_memory(eng, 8 * MiB)
        h = eng.open_segment(target.name)
        assert h.transport in ("shm", "tcp")  # the target's memory is host memory
        eng.transfer_sync([TransferRequest(OpCode.READ, local, 0, h, 0, 8 * MiB)], timeout=30)
        assert np.array_equal(read_bytes(local, 0, 8 * MiB), expected)
        flipped = 255 - expected[:MiB]
        write_bytes(local, 0, flipped)
        eng.transfer_sync([TransferRequest(OpCode.WRITE, local, 0, h, 5, MiB)], timeout=30)
        write_bytes(local, 0, np.zeros(MiB + 5, dtype=np.uint8))
        eng.transfer_sync([TransferRequest(OpCode.READ, local, 0, h, 0, MiB + 5)], timeout=30)
        assert np.array_equal(read_bytes(local, 0, 5), expected[:5])
        assert np.array_equal(read_bytes(local, 5, MiB), flipped)


def test_out_of_range_on_a_device_region_is_refused_at_submit(
    device_memory: Callable[[TransferEngine, int], DeviceRegion],
) -> None:
    with engine_over("auto") as eng:
        local = device_memory(eng, MiB)
        target = eng.allocate(MiB)
        h = eng.open_segment(eng.listen())
        with pytest.raises(SegmentError, match="outside"):
            eng.submit(
                eng.allocate_batch(1),
                [TransferRequest(OpCode.WRITE, local, MiB - 10, h, 0, 11, target.region_id)],
            )


def _break(region: DeviceRegion) -> None:
    """Make every later copy of the region fail inside torch (its storage is gone)."""
    region.tensor.untyped_storage().resize_(0)


@pytest.mark.parametrize("op", [OpCode.READ, OpCode.WRITE])
def test_a_failed_device_copy_fails_the_request_and_nothing_hangs(op: OpCode) -> None:
    # A staged-cpu region whose storage is gone fails its copies the way a CUDA error does
    # (a RuntimeError out of torch), on each side of a transfer.
    with engine_over("tcp") as eng:
        host = eng.allocate(MiB)
        target = eng._add_region(
            DeviceRegion(next(eng._region_ids), torch.zeros(MiB, dtype=torch.uint8))
        )
        local = eng._add_region(
            DeviceRegion(next(eng._region_ids), torch.zeros(MiB, dtype=torch.uint8))
        )
        h = eng.open_segment(eng.listen())
        # target side: the server answers ERR for that request; the request fails, no retry
        _break(target)
        batch = eng.allocate_batch(1)
        eng.submit(batch, [TransferRequest(op, host, 0, h, 0, 4096, target.region_id)])
        status = eng.wait(batch, timeout=10)
        assert status.state is TransferState.FAILED
        assert isinstance(status.errors[0], RemoteError), status.errors
        assert "device copy" in str(status.errors[0])
        assert eng.metrics()["server"]["errors"] == 1
        # initiator side: a WRITE fails at submit (nothing started), a READ fails on arrival
        _break(local)
        requests = [TransferRequest(op, local, 0, h, 0, 4096, host.region_id)]
        if op is OpCode.WRITE:
            with pytest.raises(TransferError, match="staging"):
                eng.submit(eng.allocate_batch(1), requests)
        else:
            batch = eng.allocate_batch(1)
            eng.submit(batch, requests)
            status = eng.wait(batch, timeout=10)
            assert status.state is TransferState.FAILED
            assert "device memory" in str(status.errors[0])


def test_register_a_cuda_tensor() -> None:
    if not HAS_CUDA:
        pytest.skip("no CUDA device here (this case runs on a GPU machine)")
    with engine_over("auto") as eng:
        tensor = torch.arange(4096, dtype=torch.int32, device="cuda:0")
        region = eng.register(tensor)
        assert isinstance(region, DeviceRegion)
        assert (region.size, region.location) == (4096 * 4, "cuda:0")
        host = eng.allocate(MiB)
        h = eng.open_segment(eng.listen())
        eng.transfer_sync(
            [TransferRequest(OpCode.WRITE, region, 0, h, 0, region.size, host.region_id)]
        )
        assert np.array_equal(host.array[: region.size].view(np.int32), np.arange(4096))
        with pytest.raises(SegmentError, match="contiguous"):
            eng.register(torch.zeros((64, 64), device="cuda:0").t())


def test_allocate_on_a_missing_cuda_device_says_what_exists() -> None:
    count = torch.cuda.device_count() if HAS_CUDA else 0
    with engine_over("auto") as eng, pytest.raises(SegmentError, match=f"has {count} CUDA dev"):
        eng.allocate(MiB, location=f"cuda:{count}")


@pytest.mark.parametrize("device_slice", ["1MiB", "4MiB"])
def test_slices_to_a_gpu_region_are_device_slice_size(device_slice: str) -> None:
    if not HAS_CUDA:
        pytest.skip("no CUDA device here (this case runs on a GPU machine)")
    cfg = KvferryConfig(
        listen={"port": 0},
        transfer={"transport": "tcp", "device_slice_size": device_slice},
    )
    with TransferEngine(cfg) as eng:
        gpu = eng.allocate(8 * MiB, location="cuda:0")
        host = eng.allocate(8 * MiB)
        local = eng.allocate(8 * MiB)
        h = eng.open_segment(eng.listen())
        per = cfg.transfer.device_slice_size
        for target, want in ((gpu, 8 * MiB // per), (host, 8 * MiB // (64 * 1024))):
            before = eng.metrics()["tcp"]["slices"]
            assert h.channel.slice_count(8 * MiB, target.region_id) == want
            eng.transfer_sync(
                [TransferRequest(OpCode.WRITE, local, 0, h, 0, 8 * MiB, target.region_id)]
            )
            assert eng.metrics()["tcp"]["slices"] - before == want


class CountingRegion(DeviceRegion):
    """A device region that counts its copies (to see how a submit was staged)."""

    __slots__ = ("copies",)

    def __init__(self, region_id: int, tensor: Any) -> None:
        super().__init__(region_id, tensor)
        self.copies = {"to_host": 0, "from_host": 0}

    def to_host(self, offset: int, dst: np.ndarray[Any, Any]) -> None:
        self.copies["to_host"] += 1
        super().to_host(offset, dst)

    def from_host(self, offset: int, src: np.ndarray[Any, Any]) -> None:
        self.copies["from_host"] += 1
        super().from_host(offset, src)


@pytest.fixture(params=["staged-cpu", "cuda"])
def counting_memory(request: pytest.FixtureRequest) -> Callable[[TransferEngine, int], Any]:
    if request.param == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device here (this case runs on a GPU machine)")
    where = "cuda:0" if request.param == "cuda" else "cpu"

    def make(engine: TransferEngine, size: int) -> CountingRegion:
        tensor = torch.zeros(size, dtype=torch.uint8, device=where)
        return engine._add_region(CountingRegion(next(engine._region_ids), tensor))

    return make


def test_adjacent_requests_are_staged_with_one_device_copy_per_run(
    counting_memory: Callable[[TransferEngine, int], CountingRegion], transport: str
) -> None:
    block = 4096
    with engine_over(transport) as eng:
        local = counting_memory(eng, 64 * block)
        target = eng.allocate(64 * block)
        h = eng.open_segment(eng.listen())
        rng = np.random.default_rng(3)
        data = rng.integers(0, 256, 64 * block, dtype=np.uint8)
        write_bytes(local, 0, data)
        # blocks 0-15 (one run), 20 and 22 (two runs of one), 30-33 (one run, a READ below)
        blocks = [*range(16), 20, 22, 30, 31, 32, 33]
        reqs = [
            TransferRequest(OpCode.WRITE, local, b * block, h, b * block, block, target.region_id)
            for b in blocks
        ]
        eng.transfer_sync(reqs, timeout=30)
        assert local.copies == {"to_host": 4, "from_host": 0}
        for b in blocks:
            assert np.array_equal(
                target.array[b * block : (b + 1) * block], data[b * block :][:block]
            )
        # read them back shifted by one block: the same runs, one landing copy each
        write_bytes(local, 0, np.zeros(64 * block, dtype=np.uint8))
        reqs = [
            TransferRequest(
                OpCode.READ, local, (b + 1) * block, h, b * block, block, target.region_id
            )
            for b in blocks
        ]
        batch = eng.allocate_batch(len(reqs))
        eng.submit(batch, reqs)
        status = eng.wait(batch, timeout=30)
        assert status.state is TransferState.COMPLETED, status.errors
        assert local.copies == {"to_host": 4, "from_host": 4}
        got = read_bytes(local, 0, 64 * block)
        for b in blocks:
            assert np.array_equal(got[(b + 1) * block :][:block], data[b * block :][:block])
        assert not got[:block].any() and not got[18 * block : 20 * block].any()


def test_a_run_lands_the_requests_that_arrived_and_not_those_that_failed(
    counting_memory: Callable[[TransferEngine, int], CountingRegion],
) -> None:
    block = 4096
    cfg = {"transport": "tcp", "transfer_timeout": 3.0, "retry_count": 1}
    with (
        TransferEngine(KvferryConfig(listen={"port": 0}, transfer=cfg)) as eng,
        TransferEngine(KvferryConfig(listen={"port": 0}, transfer=cfg)) as doomed,
    ):
        local = counting_memory(eng, 8 * block)
        write_bytes(local, 0, np.full(8 * block, 7, dtype=np.uint8))
        alive = eng.allocate(8 * block)
        alive.array[:] = 1
        gone = doomed.allocate(8 * block)
        h_alive = eng.open_segment(eng.listen())
        h_gone = eng.open_segment(doomed.listen())
        doomed.close()  # its requests fail; the run's others still land
        # one run of 8 adjacent blocks in local memory: even ones from the live target
        reqs = [
            TransferRequest(
                OpCode.READ,
                local,
                i * block,
                h_alive if i % 2 == 0 else h_gone,
                i * block,
                block,
                alive.region_id if i % 2 == 0 else gone.region_id,
            )
            for i in range(8)
        ]
        batch = eng.allocate_batch(len(reqs))
        eng.submit(batch, reqs)
        status = eng.wait(batch, timeout=20)
        assert status.state is TransferState.FAILED
        states = [r.state for r in status.requests]
        assert states == [TransferState.COMPLETED, TransferState.FAILED] * 4
        got = read_bytes(local, 0, 8 * block).reshape(8, block)
        assert (got[0::2] == 1).all() and (got[1::2] == 7).all()  # failed ranges untouched
        assert local.copies["from_host"] == 4  # one copy per stretch of arrived requests


def test_vectored_requests_to_a_device_region_cost_one_staging_copy(
    counting_memory: Callable[[TransferEngine, int], CountingRegion],
) -> None:
    block = 4096
    with engine_over("tcp") as eng:
        target = counting_memory(eng, 32 * block)
        local = eng.allocate(32 * block)
        local.array[:] = np.arange(32 * block, dtype=np.uint32).astype(np.uint8)
        h = eng.open_segment(eng.listen())
        write = [
            TransferRequest(OpCode.WRITE, local, i * block, h, i * block, block, target.region_id)
            for i in range(16)
        ]
        eng.transfer_sync(write, timeout=30)
        assert target.copies == {"to_host": 0, "from_host": 1}  # one WRITEV, one stretch
        assert np.array_equal(read_bytes(target, 0, 16 * block), local.array[: 16 * block])
        read = [
            TransferRequest(
                OpCode.READ, local, (16 + i) * block, h, i * block, block, target.region_id
            )
            for i in range(16)
        ]
        eng.transfer_sync(read, timeout=30)
        assert target.copies == {"to_host": 1, "from_host": 1}  # one READV, one stretch
        assert np.array_equal(local.array[16 * block :], local.array[: 16 * block])
        assert eng.metrics()["server"]["frames"] == 2
