"""The local transport (kvferry/transfer/transports/local.py): an engine targeting itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest

from kvferry import KvferryConfig, OpCode, SegmentError, TransferEngine, TransferRequest
from kvferry.testing import TargetProcess, check_transport
from kvferry.transfer.transports.base import WorkItem
from kvferry.transfer.transports.local import LocalChannel

MiB = 1 << 20


@pytest.fixture
def engine() -> Iterator[TransferEngine]:
    with TransferEngine(KvferryConfig(listen={"port": 0})) as eng:
        yield eng


def test_kit(engine: TransferEngine) -> None:
    target = engine.allocate(8 * MiB)
    local = engine.allocate(8 * MiB)
    h = engine.open_segment(engine.listen())
    assert h.transport == "local"
    check_transport(engine, h, local, target.size, target_region=target.region_id)
    assert engine.metrics()["local"]["errors"] == 0
    assert "tcp" not in engine.metrics()


def test_kit_on_a_registered_target_region(engine: TransferEngine) -> None:
    backing = np.zeros(4 * MiB, dtype=np.uint8)
    target = engine.register(backing)
    local = engine.register(bytearray(4 * MiB))
    h = engine.open_segment(engine.listen())
    assert h.transport == "local"  # local reaches registered buffers too
    check_transport(engine, h, local, target.size, target_region=target.region_id)
    assert backing.any(), "the kit's writes must land in the caller's own array"


def test_forced_local_on_own_segment() -> None:
    cfg = KvferryConfig(transfer={"transport": "local"}, listen={"port": 0})
    with TransferEngine(cfg) as eng:
        a = eng.allocate(MiB)
        b = eng.allocate(MiB)
        a.array[:] = 3
        h = eng.open_segment(eng.listen())
        assert h.transport == "local"
        eng.transfer_sync([TransferRequest(OpCode.READ, b, 0, h, 0, MiB, a.region_id)])
        assert (b.array == 3).all()


def test_forced_local_cannot_reach_another_process(
    target_process: Callable[..., TargetProcess],
) -> None:
    target = target_process()
    with (
        TransferEngine(KvferryConfig(transfer={"transport": "local"})) as eng,
        pytest.raises(SegmentError, match="'local' cannot reach"),
    ):
        eng.open_segment(target.name)


def test_open_segment_returns_the_cached_handle(engine: TransferEngine) -> None:
    engine.allocate(MiB)
    name = engine.listen()
    assert engine.listen() == name  # idempotent
    h = engine.open_segment(name)
    assert engine.open_segment(name) is h
    fresh = engine.open_segment(name, refresh=True)
    assert fresh is not h
    with pytest.raises(SegmentError, match="not open"):
        engine.submit(
            engine.allocate_batch(1),
            [TransferRequest(OpCode.READ, engine.allocate(16), 0, h, 0, 1)],
        )


@pytest.mark.parametrize("fault", ["flip-a-byte", "complete-without-moving"])
def test_the_kit_catches_a_broken_transport(
    engine: TransferEngine, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """The kit must fail a transport that corrupts or drops bytes yet reports success."""
    original = LocalChannel.post

    def broken_post(self: LocalChannel, items: Sequence[WorkItem]) -> None:
        if fault == "complete-without-moving":
            for item in items:
                if item.op is OpCode.READ and item.length > 1000 and item.request.pending:
                    item.request.slice_done(item.length)  # claims success, moves nothing
                    continue
                original(self, [item])
            return
        original(self, items)
        for item in items:
            if item.op is OpCode.WRITE and item.length > 1000:
                region = self._regions[item.region_id]
                region.array[item.target_offset + item.length // 2] ^= 0x01

    monkeypatch.setattr(LocalChannel, "post", broken_post)
    target = engine.allocate(8 * MiB)
    local = engine.allocate(8 * MiB)
    h = engine.open_segment(engine.listen())
    with pytest.raises(AssertionError, match="differs"):
        check_transport(engine, h, local, target.size, target_region=target.region_id)
