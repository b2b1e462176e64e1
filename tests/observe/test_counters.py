"""Latency histograms: the batch form counts exactly what value-by-value observation counts."""

from __future__ import annotations

import random

import pytest

from kvferry.observe.counters import LatencyHistogram


@pytest.mark.parametrize("distinct", [1, 3, 128])
def test_observe_many_equals_one_by_one(distinct: int) -> None:
    rnd = random.Random(distinct)
    pool = [rnd.randrange(0, 10**12) for _ in range(distinct)] + [0, 999, 1000, 2**40 * 1000]
    values = [rnd.choice(pool) for _ in range(500)]
    one, many = LatencyHistogram(), LatencyHistogram()
    for v in values:
        one.observe_ns(v)
    many.observe_many_ns(values[:3])  # a few: key by key
    many.observe_many_ns(values[3:250])
    many.observe_many_ns(values[250:])
    a, b = one.snapshot(), many.snapshot()
    assert a["counts"] == b["counts"] and a["count"] == b["count"] == 500
    assert b["sum_us"] == pytest.approx(a["sum_us"], rel=1e-12)
    many.observe_many_ns([])
    assert many.snapshot()["count"] == 500
