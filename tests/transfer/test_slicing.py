"""plan_slices (kvferry/transfer/slicing.py): the MC_SLICE_SIZE / MC_FRAGMENT_RATIO rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvferry.config.models import TransferConfig
from kvferry.transfer.slicing import count_slices, plan_slices


def assert_tiles(slices: list[tuple[int, int]], length: int) -> None:
    """Slices are in order, contiguous, non-empty and cover [0, length) exactly."""
    cursor = 0
    for offset, size in slices:
        assert offset == cursor
        assert size > 0
        cursor += size
    assert cursor == length


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (1, [(0, 1)]),  # shorter than a fragment, but alone: sent as is
        (1000, [(0, 1000)]),
        (1024, [(0, 1024)]),
        (2048, [(0, 1024), (1024, 1024)]),
        (1024 + 255, [(0, 1024 + 255)]),  # tail 255 < limit 256: merged
        (1024 + 256, [(0, 1024), (1024, 256)]),  # tail == limit: its own slice
        (3 * 1024 + 1, [(0, 1024), (1024, 1024), (2048, 1025)]),
        (3 * 1024 + 700, [(0, 1024), (1024, 1024), (2048, 1024), (3072, 700)]),
    ],
)
def test_tail_rule(length: int, expected: list[tuple[int, int]]) -> None:
    # slice 1024, ratio 4 -> fragment limit 256
    assert plan_slices(length, 1024, 4) == expected


def test_ratio_above_slice_size_never_merges() -> None:
    # limit = max(1, 512 // 1024) = 1: no tail is short enough to merge
    assert plan_slices(513, 512, 1024) == [(0, 512), (512, 1)]


def test_ratio_one_merges_every_tail() -> None:
    # limit == slice_size: any tail joins the last full slice
    assert plan_slices(2 * 512 + 511, 512, 1) == [(0, 512), (512, 1023)]


@pytest.mark.parametrize(
    ("length", "slice_size", "ratio"),
    [(0, 512, 4), (-1, 512, 4), (10, 0, 4), (10, -512, 4), (10, 512, 0), (10, 512, -1)],
)
def test_non_positive_arguments_raise(length: int, slice_size: int, ratio: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        plan_slices(length, slice_size, ratio)


def test_config_fragment_limit_matches_the_slicer() -> None:
    cfg = TransferConfig(slice_size="64KiB", fragment_ratio=8)
    limit = cfg.fragment_limit
    assert limit == 8192
    merged = plan_slices(cfg.slice_size + limit - 1, cfg.slice_size, cfg.fragment_ratio)
    kept = plan_slices(cfg.slice_size + limit, cfg.slice_size, cfg.fragment_ratio)
    assert len(merged) == 1
    assert len(kept) == 2


@st.composite
def slicing_cases(draw: st.DrawFn) -> tuple[int, int, int]:
    """(length, slice_size, ratio) with lengths of a few slices around every tail size."""
    slice_size = draw(st.integers(1, 1 << 20))
    ratio = draw(st.integers(1, 1024))
    full = draw(st.integers(0, 40))
    tail = draw(st.integers(0, slice_size - 1))
    return max(1, full * slice_size + tail), slice_size, ratio


@settings(max_examples=300, deadline=None)
@given(case=slicing_cases())
def test_slices_tile_exactly_and_respect_bounds(case: tuple[int, int, int]) -> None:
    length, slice_size, ratio = case
    limit = max(1, slice_size // ratio)
    slices = plan_slices(length, slice_size, ratio)
    assert_tiles(slices, length)
    sizes = [size for _, size in slices]
    if len(slices) == 1:
        assert sizes[0] == length
    else:
        assert min(sizes) >= limit, "a tail below the fragment limit was sent alone"
    assert max(sizes) <= max(length if length < slice_size else 0, slice_size + limit - 1)
    # every slice but the last is exactly slice_size
    assert all(size == slice_size for size in sizes[:-1])
    # count: full slices, plus one for a tail at or above the limit (or a lone short request)
    full, tail = divmod(length, slice_size)
    expected = full + (1 if tail and (tail >= limit or full == 0) else 0)
    assert len(slices) == expected


@settings(max_examples=300, deadline=None)
@given(case=slicing_cases())
def test_count_slices_matches_the_plan(case: tuple[int, int, int]) -> None:
    length, slice_size, ratio = case
    assert count_slices(length, slice_size, ratio) == len(plan_slices(length, slice_size, ratio))


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"device_slice_size": "1KiB"}, "between 4KiB and 1GiB"),
        ({"device_slice_size": "64MiB"}, "device_slice_size .* exceeds max_frame_size"),
    ],
)
def test_device_slice_size_is_validated(update: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TransferConfig(**update)  # type: ignore[arg-type]
