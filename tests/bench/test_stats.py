"""Tests for kvferry.bench.stats against hand-computed values and numpy's linear percentile."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvferry.bench.stats import Samples, Summary, percentile

# --- percentile -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        # rank = p/100 * (n-1) with n = 4
        (50, 2.5),  # rank 1.5  -> 2 + 0.5 * (3 - 2)
        (90, 3.7),  # rank 2.7  -> 3 + 0.7 * (4 - 3)
        (95, 3.85),  # rank 2.85
        (99, 3.97),  # rank 2.97
        (99.9, 3.997),  # rank 2.997
        (25, 1.75),  # rank 0.75
        (100 / 3, 2.0),  # rank exactly 1 -> v[1]
        (0, 1.0),
        (100, 4.0),
        (-5, 1.0),  # below 0 clamps to min
        (250, 4.0),  # above 100 clamps to max
    ],
)
def test_percentile_hand_computed(p: float, expected: float) -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], p) == pytest.approx(expected, rel=1e-12)


def test_percentile_interpolates_unequal_gaps() -> None:
    # rank = 0.9 * 2 = 1.8 -> 10 + 0.8 * (100 - 10) = 82
    assert percentile([0.0, 10.0, 100.0], 90) == pytest.approx(82.0)


def test_percentile_single_value_is_that_value_for_every_p() -> None:
    for p in (0, 1, 50, 99, 99.9, 100):
        assert percentile([7.5], p) == 7.5


def test_percentile_accepts_numpy_array() -> None:
    assert percentile(np.array([1.0, 2.0, 3.0, 4.0]), 90) == pytest.approx(3.7)


def test_percentile_empty_raises_clear_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


def test_percentile_nan_p_raises() -> None:
    with pytest.raises(ValueError, match="NaN"):
        percentile([1.0], math.nan)


_finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)


@given(
    values=st.lists(_finite, min_size=1, max_size=200),
    p=st.floats(min_value=0, max_value=100, allow_nan=False),
)
def test_percentile_matches_numpy_linear(values: list[float], p: float) -> None:
    s = sorted(values)
    expected = float(np.percentile(np.array(s), p, method="linear"))
    scale = max(abs(s[0]), abs(s[-1]), 1.0)
    # The two formulas round differently (numpy lerps a + (b - a) * f); allow a few ulps.
    assert math.isclose(percentile(s, p), expected, rel_tol=1e-9, abs_tol=1e-12 * scale)


# --- Summary ----------------------------------------------------------------------------------


def test_summary_of_hand_computed() -> None:
    s = Summary.of([4.0, 1.0, 3.0, 2.0])  # unsorted on purpose
    assert s.count == 4
    assert s.min == 1.0
    assert s.max == 4.0
    assert s.avg == pytest.approx(2.5)
    # population std: sqrt(((1.5^2 + 0.5^2) * 2) / 4) = sqrt(1.25)
    assert s.std == pytest.approx(math.sqrt(1.25))
    assert s.p50 == pytest.approx(2.5)
    assert s.p90 == pytest.approx(3.7)
    assert s.p95 == pytest.approx(3.85)
    assert s.p99 == pytest.approx(3.97)
    assert s.p999 == pytest.approx(3.997)


def test_summary_std_is_population_not_sample() -> None:
    # values 2, 4, 4, 4, 5, 5, 7, 9: mean 5, population variance 4 -> std 2 (sample std ~2.138)
    s = Summary.of([2, 4, 4, 4, 5, 5, 7, 9])
    assert s.avg == pytest.approx(5.0)
    assert s.std == pytest.approx(2.0)


def test_summary_single_value() -> None:
    s = Summary.of([3.0])
    assert (s.count, s.min, s.max, s.avg, s.std) == (1, 3.0, 3.0, 3.0, 0.0)
    assert s.p50 == s.p90 == s.p95 == s.p99 == s.p999 == 3.0


def test_summary_of_generator_and_array_agree_and_leave_input_unsorted() -> None:
    arr = np.array([5.0, 1.0, 4.0, 2.0, 3.0])
    from_array = Summary.of(arr)
    from_gen = Summary.of(float(x) for x in [5.0, 1.0, 4.0, 2.0, 3.0])
    assert from_array == from_gen
    assert arr.tolist() == [5.0, 1.0, 4.0, 2.0, 3.0]
    assert from_array.p50 == 3.0


def test_summary_of_empty_raises() -> None:
    with pytest.raises(ValueError, match="zero samples"):
        Summary.of([])


def test_summary_of_nan_raises() -> None:
    with pytest.raises(ValueError, match="NaN"):
        Summary.of([1.0, math.nan])


def test_summary_empty_is_zeros() -> None:
    e = Summary.empty()
    assert e.count == 0
    d = e.to_dict()
    assert all(v == 0 for v in d.values())


def test_summary_to_dict_keys_and_values() -> None:
    d = Summary.of([1.0, 2.0, 3.0, 4.0]).to_dict()
    assert list(d) == [
        "count",
        "min",
        "max",
        "avg",
        "std",
        "p50",
        "p90",
        "p95",
        "p99",
        "p999",
    ]
    assert d["count"] == 4
    assert d["p90"] == pytest.approx(3.7)


# --- Samples ----------------------------------------------------------------------------------


def test_samples_add_grows_past_capacity_and_keeps_order() -> None:
    s = Samples(capacity=2)
    for x in range(10):
        s.add(float(x))
    assert len(s) == 10
    assert s.values().tolist() == [float(x) for x in range(10)]


def test_samples_extend_and_merge() -> None:
    a = Samples(capacity=1)
    a.extend(np.array([1.0, 2.0]))
    a.extend([3.0])
    b = Samples()
    b.extend(range(4, 9))
    a.merge(b)
    assert a.values().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert len(b) == 5  # merge leaves the other buffer as it was


def test_samples_values_is_read_only() -> None:
    s = Samples()
    s.extend([2.0, 1.0])
    v = s.values()
    with pytest.raises(ValueError):
        v.sort()
    assert s.values().tolist() == [2.0, 1.0]
    s.add(0.5)  # adding after taking a view still works
    assert s.values().tolist() == [2.0, 1.0, 0.5]


def test_samples_summary() -> None:
    s = Samples()
    s.extend([4.0, 3.0, 2.0, 1.0])
    assert s.summary() == Summary.of([1.0, 2.0, 3.0, 4.0])
    assert Samples().summary() == Summary.empty()
