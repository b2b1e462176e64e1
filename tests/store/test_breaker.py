"""The circuit breaker's state machine, on a fake clock (the store's use of it against a hung
redis-server is in test_tiered_remote.py)."""

from __future__ import annotations

import threading

import pytest

from kvferry.store.breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(
    failures: int = 3, open_s: float = 1.0, max_s: float = 5.0
) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(failures, open_s, max_s, clock=clock), clock


def test_opens_after_n_consecutive_failures_only() -> None:
    br, _ = make(failures=3)
    assert br.state is BreakerState.CLOSED and br.allow()
    assert not br.failure() and not br.failure()
    assert not br.success(), "a success while closed changes no state"
    assert not br.failure() and not br.failure(), "the success reset the count"
    assert br.state is BreakerState.CLOSED and br.allow()
    assert br.failure(), "the third failure in a row opens it"
    assert br.state is BreakerState.OPEN
    assert not br.allow() and not br.ready()


def test_open_lets_exactly_one_probe_through_after_the_interval() -> None:
    br, clock = make(failures=1, open_s=1.0)
    assert br.failure()
    clock.now += 0.999
    assert not br.allow()
    clock.now += 0.001
    assert br.ready() and br.ready(), "ready() does not take the probe"
    assert br.allow(), "the probe"
    assert br.state is BreakerState.HALF_OPEN
    assert not br.ready() and not br.allow(), "one probe at a time"
    clock.now += 60
    assert not br.allow(), "still waiting for the probe's verdict"


def test_a_failed_probe_reopens_with_backoff_up_to_the_cap() -> None:
    br, clock = make(failures=1, open_s=1.0, max_s=5.0)
    br.failure()
    waits = []
    for _ in range(5):
        waited = 0.0
        while not br.allow():
            clock.now += 0.5
            waited += 0.5
        waits.append(waited)
        assert br.failure(), "a failed probe reopens the breaker"
        assert br.state is BreakerState.OPEN
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_successful_probe_closes_and_resets_the_interval() -> None:
    br, clock = make(failures=2, open_s=1.0)
    br.failure()
    br.failure()
    clock.now += 1.0
    assert br.allow() and br.failure()  # reopened: next wait 2 s
    clock.now += 2.0
    assert br.allow()
    assert br.success(), "the probe's success closes it"
    assert br.state is BreakerState.CLOSED and br.allow()
    assert not br.failure(), "closed again: it takes N failures in a row to open"
    assert br.failure()
    clock.now += 1.0
    assert br.allow(), "the interval is back to open_seconds"


def test_a_probe_without_verdict_gives_the_probe_back() -> None:
    br, clock = make(failures=1, open_s=1.0)
    br.failure()
    clock.now += 1.0
    assert br.allow()
    br.cancel()  # the probe ended in the caller's own error: it says nothing about the tier
    assert br.state is BreakerState.OPEN
    assert br.allow(), "the next call is the probe"


def test_late_reports_of_calls_let_through_before_opening() -> None:
    br, _ = make(failures=1, open_s=1.0)
    assert br.allow() and br.allow()  # two calls in flight while closed
    assert br.failure()
    assert not br.failure(), "already open: a second failure changes nothing"
    assert not br.success(), "a late success does not close an open breaker"
    assert br.state is BreakerState.OPEN and not br.allow()


def test_one_probe_among_many_threads() -> None:
    br, clock = make(failures=1, open_s=1.0)
    br.failure()
    clock.now += 1.0
    start = threading.Barrier(8)
    allowed: list[bool] = []

    def call() -> None:
        start.wait()
        allowed.append(br.allow())

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert allowed.count(True) == 1


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 1.0, 5.0), "failures must be at least 1"),
        ((1, 0.0, 5.0), "open_seconds must be positive"),
        ((1, 2.0, 1.0), "max_open_seconds 1.0 is below open_seconds 2.0"),
    ],
)
def test_bad_settings(args: tuple[int, float, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CircuitBreaker(*args)
