"""The shm transport (kvferry/transfer/transports/shm.py) against real target processes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from kvferry import KvferryConfig, OpCode, SegmentError, TransferEngine, TransferRequest
from kvferry.testing import TargetProcess, check_transport

StartTarget = Callable[..., TargetProcess]
MiB = 1 << 20


def engine(transport: str) -> TransferEngine:
    return TransferEngine(KvferryConfig(transfer={"transport": transport}))


def test_kit(target_process: StartTarget) -> None:
    target = target_process()
    with engine("shm") as ini:
        h = ini.open_segment(target.name)
        assert h.transport == "shm"
        check_transport(ini, h, ini.allocate(8 * MiB), h.size)
        counters = ini.metrics()["shm"]
        assert counters["errors"] == 0 and counters["requests"] != 0
        assert "tcp" not in ini.metrics(), "no byte should have gone over tcp"


def test_auto_picks_shm_for_a_same_host_allocated_segment(target_process: StartTarget) -> None:
    target = target_process()
    with engine("auto") as ini:
        local = ini.allocate(8 * MiB)
        h = ini.open_segment(target.name)
        assert h.transport == "shm"
        ini.transfer_sync([TransferRequest(OpCode.READ, local, 0, h, 0, 8 * MiB)], timeout=10)
        assert np.array_equal(local.array, target.expected(0))


def test_shm_writes_are_what_the_target_serves_over_tcp(target_process: StartTarget) -> None:
    target = target_process()
    data = np.random.default_rng(5).integers(0, 256, 2 * MiB, dtype=np.uint8)
    with engine("shm") as writer, engine("tcp") as reader:
        src = writer.register(data.copy())  # a registered (non-shm) local buffer is fine
        h = writer.open_segment(target.name)
        writer.transfer_sync([TransferRequest(OpCode.WRITE, src, 0, h, 12345, 2 * MiB)])
        dst = reader.allocate(2 * MiB)
        h2 = reader.open_segment(target.name)
        assert h2.transport == "tcp"
        reader.transfer_sync([TransferRequest(OpCode.READ, dst, 0, h2, 12345, 2 * MiB)], 10)
        assert np.array_equal(dst.array, data), "the target's memory did not get the shm write"


def test_segment_with_a_registered_region_is_not_shm_reachable(
    target_process: StartTarget,
) -> None:
    target = target_process(registered_size=MiB)
    with engine("shm") as forced, pytest.raises(SegmentError) as info:
        forced.open_segment(target.name)
    message = str(info.value)
    assert "'shm' cannot reach" in message and "tcp" in message
    with engine("auto") as auto:
        h = auto.open_segment(target.name)
        assert h.transport == "tcp"  # shm needs every region to be shared memory
        local = auto.allocate(MiB)
        auto.transfer_sync(
            [TransferRequest(OpCode.READ, local, 0, h, 0, MiB, target.region_id(1))], timeout=10
        )
        assert np.array_equal(local.array, target.expected(1))
