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
