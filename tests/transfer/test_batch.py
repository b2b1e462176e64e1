"""Batch bookkeeping (kvferry/transfer/batch.py): states, counts and status snapshots."""

from __future__ import annotations

from kvferry.errors import RemoteError
from kvferry.transfer.batch import Batch, BatchStatus, RequestStatus, TransferState


def test_status_is_a_snapshot_taken_when_asked() -> None:
    batch = Batch(1, 3)
    a, b, c = batch._add_many([(10, 1), (20, 2), (30, 1)])
    a.slice_done(10)
    b.slice_done(10)  # one of two slices
    pending = batch.status()
    b.slice_done(10)
    error = RemoteError("refused")
    c.fail(error)
    done = batch.status()
    # the first snapshot did not move with the batch, even read after it finished
    assert pending.state is TransferState.PENDING
    assert pending.requests == [
        RequestStatus(TransferState.COMPLETED, 10),
        RequestStatus(TransferState.PENDING, 10),
        RequestStatus(TransferState.PENDING, 0),
    ]
    assert done.state is TransferState.FAILED
    assert done.errors == [error]
    assert [r.transferred_bytes for r in done.requests] == [10, 20, 0]
    assert done == BatchStatus(TransferState.FAILED, list(done.requests))
    assert done != pending


def test_overall_state() -> None:
    batch = Batch(1, 2)
    assert batch.status().state is TransferState.COMPLETED  # empty: nothing pending
    a, b = batch._add_many([(1, 1), (1, 1)])
    assert batch.status().state is TransferState.PENDING
    a.slice_done(1)
    b.slice_done(1)
    status = batch.status()
    assert (status.state, status.errors) == (TransferState.COMPLETED, [])
    assert "COMPLETED" in repr(status)


def _world(seed: int) -> tuple[list[Batch], list[tuple[int, int, int]], list[int]]:
    """Three batches of requests (1-3 slices each), a shuffled list of finished slices
    (batch, request, bytes) with some repeats after completion, and requests to fail first."""
    import random

    rng = random.Random(seed)
    batches, slices = [], []
    for b in range(3):
        shapes = [(rng.randint(1, 100), rng.randint(1, 3)) for _ in range(rng.randint(1, 8))]
        batch = Batch(b, len(shapes))
        batch._add_many(shapes)
        batches.append(batch)
        for r, (_, k) in enumerate(shapes):
            slices += [(b, r, rng.randint(1, 50)) for _ in range(k)]
    rng.shuffle(slices)
    slices += slices[: rng.randint(0, 3)]  # late duplicates: ignored once done
    fail = [rng.randrange(len(slices)) for _ in range(rng.randint(0, 2))]
    return batches, slices, fail


def test_finish_slices_is_slice_done_per_slice() -> None:
    from kvferry.transfer.batch import finish_slices

    for seed in range(200):
        ref, slices, fail = _world(seed)
        got, _, _ = _world(seed)
        for at in fail:  # the same requests fail first in both worlds
            b, r, _ = slices[at]
            ref[b].requests[r].fail(RemoteError("x"))
            got[b].requests[r].fail(RemoteError("x"))
        want = [i for i, (b, r, n) in enumerate(slices) if ref[b].requests[r].slice_done(n)]
        done = [(got[b].requests[r], n) for b, r, n in slices]
        assert finish_slices(done) == want, seed
        for rb, gb in zip(ref, got):
            assert [(r.state, r.transferred_bytes, str(r.error)) for r in rb.status().requests] == [
                (r.state, r.transferred_bytes, str(r.error)) for r in gb.status().requests
            ], seed
            assert rb.status().state is gb.status().state, seed
            assert rb.is_done() == gb.is_done(), seed
            assert gb.wait_done(0) == gb.is_done()


def test_finish_slices_runs_the_staging_hook_before_completing() -> None:
    from kvferry.transfer.batch import finish_slices

    batch = Batch(1, 2)
    a, b = batch._add_many([(8, 1), (8, 1)])
    seen: list[TransferState] = []
    a.on_complete = lambda: seen.append(a.state)

    def broken() -> None:
        raise RuntimeError("device gone")

    b.on_complete = broken
    assert finish_slices([(a, 8), (b, 8)]) == [0]
    assert seen == [TransferState.PENDING]  # the copy ran before the request completed
    assert (a.state, b.state) == (TransferState.COMPLETED, TransferState.FAILED)
    assert "device gone" in str(b.error) and batch.is_done()
