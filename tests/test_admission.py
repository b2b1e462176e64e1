"""The slowloris bookkeeping (:mod:`kvferry.admission`) on a fake clock; the listeners that use
it are attacked for real in tests/serving/test_http_front.py and tests/observe/."""

from __future__ import annotations

import pytest

from kvferry.admission import EVICT_AFTER_S, PendingConnections


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pending(clock: Clock, **kwargs: int) -> tuple[PendingConnections, list[str]]:
    closed: list[str] = []
    limits = {"max_pending": 4, "max_per_address": 3} | kwargs
    p = PendingConnections(5.0, limits["max_pending"], limits["max_per_address"], clock=clock)
    return p, closed


def connect(p: PendingConnections, closed: list[str], name: str, address: str = "a") -> None:
    p.waiting(name, address, lambda: closed.append(name))


def test_a_connection_is_closed_at_its_deadline_unless_its_request_arrived() -> None:
    clock = Clock()
    p, closed = pending(clock)
    connect(p, closed, "slow")
    connect(p, closed, "good")
    clock.now += 2
    connect(p, closed, "later")
    p.arrived("good")
    clock.now += 3  # slow: 5 s
    assert p.sweep() == 1 and closed == ["slow"]
    assert (p.timed_out, len(p)) == (1, 1)
    clock.now += 2  # later: 5 s
    assert p.sweep() == 1 and closed == ["slow", "later"]
    p.closed("later")  # the listener reports the close: no-op, already gone
    assert len(p) == 0 and p.sweep() == 0


def test_waiting_again_restarts_the_clock_only_after_the_request_arrived() -> None:
    clock = Clock()
    p, closed = pending(clock)
    connect(p, closed, "c")
    clock.now += 4
    connect(p, closed, "c")  # still the same wait: keeps its start
    clock.now += 1
    assert p.sweep() == 1
    connect(p, closed, "k")
    p.arrived("k")  # a request, then a kept-alive connection starts the next one
    clock.now += 4
    connect(p, closed, "k")
    clock.now += 4
    assert p.sweep() == 0 and closed == ["c"]


def test_over_a_bound_the_longest_waiting_goes_first_never_the_newcomer() -> None:
    clock = Clock()
    p, closed = pending(clock)
    for i in range(3):
        connect(p, closed, f"a{i}", "a")
        clock.now += 0.5
    clock.now += EVICT_AFTER_S
    connect(p, closed, "a3", "a")  # a fourth from "a": over max_per_address 3
    assert closed == ["a0"] and p.from_address("a") == 3
    connect(p, closed, "b0", "b")
    connect(p, closed, "b1", "b")  # five waiting: over max_pending 4
    assert closed == ["a0", "a1"] and len(p) == 4 and p.evicted == 2


def test_a_burst_of_young_connections_is_left_alone_until_it_ages() -> None:
    clock = Clock()
    p, closed = pending(clock)
    for i in range(10):
        connect(p, closed, f"c{i}", "a")
    assert closed == [] and len(p) == 10
    clock.now += EVICT_AFTER_S / 2
    for i in range(6):
        p.arrived(f"c{i}")  # most of the burst sends its request
    clock.now += EVICT_AFTER_S / 2
    assert p.sweep() == 1 and closed == ["c6"]  # 4 left, 3 allowed from one address


@pytest.mark.parametrize(
    ("args", "match"), [((0.0, 4, 3), "header_timeout"), ((5.0, 0, 3), "at least 1")]
)
def test_bad_bounds_are_refused(args: tuple[float, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PendingConnections(*args)
