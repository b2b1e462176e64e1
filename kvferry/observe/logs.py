"""Log lines that a peer can provoke, held to a rate.

A listener logs why it refused a peer; a hostile peer can make it refuse thousands of frames a
second, and one warning per frame floods the log (and, when stderr is a pipe nobody reads,
blocks the logging thread). :class:`RateLimitedLog` lets at most ``burst`` lines of one kind
through per ``interval`` seconds and says, in the next line of that kind it lets through, how
many it held back. The refusals themselves are still counted in full by the metrics.

It keeps no thread: the count is reported when the next line of its kind comes.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Warnings of a few fixed kinds (``key``), each at most ``burst`` per ``interval`` s.

    Keys name a kind of event ("refused frame"), never a peer, so the table stays small.
    """

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0, burst: int = 5) -> None:
        self._logger = logger
        self._interval = interval
        self._burst = burst
        self._lock = threading.Lock()
        self._kinds: dict[str, list[float]] = {}  # key -> [window start, lines let through, held]

    def warning(self, key: str, msg: str, *args: object) -> None:
        """Log ``msg % args`` at WARNING unless ``key`` already had ``burst`` lines in this
        window; the first line of a new window carries the number held back before it."""
        if not self._logger.isEnabledFor(logging.WARNING):
            return
        now = time.monotonic()
        with self._lock:
            window = self._kinds.get(key)
            if window is None or now - window[0] >= self._interval:
                held = int(window[2]) if window is not None else 0
                self._kinds[key] = [now, 1, 0]
            elif window[1] < self._burst:
                window[1] += 1
                held = 0
            else:
                window[2] += 1
                return
        if held:
            msg += " (%d more like this were not logged in the %gs before)"
            args = (*args, held, self._interval)
        self._logger.warning(msg, *args)

    def held(self, key: str) -> int:
        """Lines of ``key`` held back in the current window (not logged yet)."""
        with self._lock:
            window = self._kinds.get(key)
            return int(window[2]) if window is not None else 0
