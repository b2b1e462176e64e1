"""Connection slots for clients that have not sent a request yet: the slowloris defence every
kvferry HTTP listener shares (``serve mock``, ``serve router``, the Prometheus exporter).

A client that connects and then trickles its request's headers a byte at a time holds a
connection (a file descriptor, buffers, for the exporter a thread) for as long as it likes
unless something stops it, and a thousand such clients lock everyone else out.
:class:`PendingConnections` is that something, as plain bookkeeping: a listener tells it when a
connection starts waiting for a request (:meth:`~PendingConnections.waiting`: it connected, or
a later request began on a kept-alive connection), when the request's headers are in
(:meth:`~PendingConnections.arrived`) and when the connection closed
(:meth:`~PendingConnections.closed`), and it closes, through the callable it was given:

- a connection still waiting ``header_timeout`` seconds after it started (:meth:`sweep`, which
  the listener calls every :attr:`~PendingConnections.sweep_interval` seconds), whatever it
  trickled meanwhile;
- when more than ``max_pending`` connections wait, or more than ``max_per_address`` from one
  IP address, the one that has waited longest, once it has waited :data:`EVICT_AFTER_S`. A
  newcomer is never refused: an attacker's slow connections are the oldest and go first, so
  a good client always gets in. A burst of young connections (a benchmark opening a thousand
  at once, each sending its request a moment later) is left alone.

No sockets and no threads here; it is thread-safe (the exporter calls it from several
threads) and closes connections outside its lock. What the listeners log about bad clients goes
through :class:`~kvferry.observe.logs.RateLimitedLog`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final

__all__ = ["EVICT_AFTER_S", "PendingConnections"]

EVICT_AFTER_S: Final = 1.0
"""Over a bound, only connections that have waited at least this long for their request are
closed: a good client sends its headers within milliseconds of connecting."""


@dataclass(eq=False)
class _Waiting:
    address: str
    since: float
    close: Callable[[], None]


class PendingConnections:
    """The connections of one listener that are waiting for a request's headers (module
    docstring).

    Args:
        header_timeout: seconds a connection may wait before :meth:`sweep` closes it.
        max_pending: connections that may wait at once before the oldest is closed.
        max_per_address: the same bound per client address.
        clock: seconds, monotonic (tests pass a fake one).

    Raises:
        ValueError: a bound is below 1 or the timeout is not positive.
    """

    def __init__(
        self,
        header_timeout: float,
        max_pending: int,
        max_per_address: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not header_timeout > 0:
            raise ValueError(f"header_timeout must be positive, got {header_timeout!r}")
        if max_pending < 1 or max_per_address < 1:
            raise ValueError(
                f"max_pending ({max_pending}) and max_per_address ({max_per_address}) must be "
                "at least 1"
            )
        self.header_timeout = header_timeout
        self.max_pending = max_pending
        self.max_per_address = max_per_address
        self.sweep_interval = min(0.5, header_timeout / 4)
        """How often the listener should call :meth:`sweep` (seconds): a slow connection is
        closed at most this long after its deadline."""
        self.timed_out = 0
        """Connections closed because their request did not arrive within header_timeout."""
        self.evicted = 0
        """Connections closed because too many were waiting (in all, or from one address)."""
        self._clock = clock
        self._lock = threading.Lock()
        # Insertion order is waiting order (a connection that waits again is re-inserted), so
        # the oldest is always first and a sweep stops at the first one still in time.
        self._all: dict[Hashable, _Waiting] = {}
        self._by_address: dict[str, dict[Hashable, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def from_address(self, address: str) -> int:
        """Connections from ``address`` waiting now."""
        with self._lock:
            return len(self._by_address.get(address, ()))

    def waiting(self, conn: Hashable, address: str, close: Callable[[], None]) -> None:
        """``conn`` (from IP ``address``) starts waiting for a request's headers; ``close``
        closes it. A connection already waiting keeps its start time. May close the longest
        waiting connections if a bound is now exceeded."""
        with self._lock:
            if conn in self._all:
                return
            now = self._clock()
            self._all[conn] = _Waiting(address, now, close)
            self._by_address.setdefault(address, {})[conn] = None
            victims = self._over_bounds(now, [address])
        for close_victim in victims:
            close_victim()

    def evict_oldest(self) -> bool:
        """Close the connection that has waited longest, however young: for a listener whose
        pending connections each cost a thread and that must bound them outright. False when
        none waits."""
        with self._lock:
            if not self._all:
                return False
            conn, w = next(iter(self._all.items()))
            self._remove(conn)
            self.evicted += 1
        w.close()
        return True

    def arrived(self, conn: Hashable) -> None:
        """``conn``'s request headers are in: it waits no more (no-op if it did not wait)."""
        with self._lock:
            self._remove(conn)

    closed = arrived
    """``conn`` closed (no-op if it was not waiting)."""

    def sweep(self) -> int:
        """Close every connection past its deadline, and the longest waiting ones while a bound
        is exceeded; returns how many were closed."""
        with self._lock:
            now = self._clock()
            victims: list[Callable[[], None]] = []
            deadline = now - self.header_timeout
            while self._all:
                conn, w = next(iter(self._all.items()))
                if w.since > deadline:
                    break
                self._remove(conn)
                self.timed_out += 1
                victims.append(w.close)
            crowded = [
                a for a, conns in self._by_address.items() if len(conns) > self.max_per_address
            ]
            victims += self._over_bounds(now, crowded)
        for close in victims:
            close()
        return len(victims)

    def _over_bounds(self, now: float, addresses: list[str]) -> list[Callable[[], None]]:
        """Remove (and return the closers of) the longest waiting connections over the bounds;
        the lock is held."""
        victims = []
        for address in addresses:
            group = self._by_address.get(address, {})
            while len(group) > self.max_per_address:
                oldest = next(iter(group))
                victim = self._evict(oldest, now)
                if victim is None:
                    break
                victims.append(victim)
        while len(self._all) > self.max_pending:
            victim = self._evict(next(iter(self._all)), now)
            if victim is None:
                break
            victims.append(victim)
        return victims

    def _evict(self, conn: Hashable, now: float) -> Callable[[], None] | None:
        w = self._all[conn]
        if now - w.since < EVICT_AFTER_S:
            return None  # the oldest is young: a burst of new clients, not an attack
        self._remove(conn)
        self.evicted += 1
        return w.close

    def _remove(self, conn: Hashable) -> None:
        w = self._all.pop(conn, None)
        if w is None:
            return
        group = self._by_address[w.address]
        del group[conn]
        if not group:
            del self._by_address[w.address]
