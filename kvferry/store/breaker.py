"""A circuit breaker for each shared tier (redis, server, mooncake): a tier that keeps failing
is skipped at once instead of costing a timeout per call.

Owns only the state machine, in plain Python with an injectable clock: no sockets, no logging,
no counters of its own. The store (``kvferry.store.tiered``) asks it before each call into a
shared tier, reports the outcome, and counts and logs the state changes it returns.

States::

    CLOSED ──N consecutive failures──> OPEN ──open interval passed, one call let through──>
    HALF_OPEN ──the probe succeeds──> CLOSED
    HALF_OPEN ──the probe fails──> OPEN, the interval doubled (up to max_open_seconds)

- CLOSED: every call goes through; a success resets the count of consecutive failures.
- OPEN: ``allow`` answers False (the store reads the call as a miss, or NO_SPACE) until the
  interval has passed; then exactly one call, the probe, is let through.
- HALF_OPEN: the probe is in flight; every other call is refused until its verdict.

A call that ends without a verdict on the tier (the caller's own error, an interrupt) calls
``cancel``: a probe gives its turn back and the next call probes. Reports of calls let through
before the breaker opened change nothing while it is open.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """See the module docstring. Safe to call from several threads at once.

    Args:
        failures: consecutive failures that open the breaker (at least 1).
        open_seconds: seconds an open breaker refuses calls before its first probe.
        max_open_seconds: the cap of the interval, which doubles after each failed probe.
        clock: monotonic seconds (a fake clock in tests).

    Raises:
        ValueError: a setting out of range.
    """

    def __init__(
        self,
        failures: int,
        open_seconds: float,
        max_open_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1:
            raise ValueError(f"failures must be at least 1, got {failures}")
        if open_seconds <= 0:
            raise ValueError(f"open_seconds must be positive, got {open_seconds}")
        if max_open_seconds < open_seconds:
            raise ValueError(
                f"max_open_seconds {max_open_seconds} is below open_seconds {open_seconds}"
            )
        self.failures = failures
        self.base_seconds = open_seconds
        self.max_seconds = max_open_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failed = 0  # consecutive failures while closed
        self._interval = open_seconds
        self._due = 0.0  # when an open breaker lets its probe through

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def open_seconds(self) -> float:
        """The interval the breaker waits (or will wait) before its next probe."""
        return self._interval

    def ready(self) -> bool:
        """Whether ``allow`` would let a call through now; takes nothing."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            return self._state is BreakerState.OPEN and self._clock() >= self._due

    def allow(self) -> bool:
        """Whether to make the call: True while closed, and once (the probe) when an open
        breaker's interval has passed."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN and self._clock() >= self._due:
                self._state = BreakerState.HALF_OPEN
                return True
            return False

    def success(self) -> bool:
        """A call let through succeeded; True when this closed the breaker."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._state = BreakerState.CLOSED
                self._failed = 0
                self._interval = self.base_seconds
                return True
            if self._state is BreakerState.CLOSED:
                self._failed = 0
            return False

    def failure(self) -> bool:
        """A call let through failed (an error or a timeout); True when this opened the
        breaker (the N-th failure in a row, or a failed probe)."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._interval = min(self._interval * 2, self.max_seconds)
                self._open()
                return True
            if self._state is BreakerState.CLOSED:
                self._failed += 1
                if self._failed >= self.failures:
                    self._open()
                    return True
            return False

    def cancel(self) -> None:
        """A call let through ended without a verdict on the tier: a probe's turn goes back."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._state = BreakerState.OPEN
                self._due = self._clock()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._failed = 0
        self._due = self._clock() + self._interval

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self._state.value} interval={self._interval}s>"
