"""The simulated engine's clock: when each step of ``kvferry serve mock`` ends on the wall clock.

:class:`StepClock` keeps the engine on its timing model's time at any ``speedup_ratio``, as a
streaming client measures it (TTFT, and ITL = (latency - TTFT) / (OSL - 1)), without spinning.
Four rules:

1. **Deadline clock.** ``due`` is the model time at which the last scheduled step ends, in
   ``time.monotonic()`` seconds: each step's due time is the previous one's plus its modelled
   length, never "now + length", so a wake-up that comes late does not make every later step
   late too; the next steps start at once and the clock catches up. An idle engine's next step
   starts when its first request arrived (:meth:`StepClock.start_at`), not when the engine got
   round to it, and a step admits only requests that arrived before it starts (the engine's
   part, :mod:`kvferry.serving.mock.scheduler`), so a request is never served before it came.
2. **Precise wake-ups.** The engine waits for a due time with a Linux timerfd that the event
   loop watches (:class:`_TimerFd`): the loop wakes 0.05-0.1 ms after the due time, where
   ``asyncio.sleep`` rounds its epoll timeout up to whole milliseconds (any sleep under 1 ms
   took 1.13 ms, 5.3 ms took 6.25 ms). Elsewhere, or if no timerfd can be made,
   ``asyncio.sleep`` (correct on average by rule 1, coarser per token).
3. **Never early.** A step's tokens are handed out when its due time has come on the wall clock,
   never before: a client cannot see a token before the model says it exists.
4. **Catching up in batches.** While the clock is behind (the loop was busy writing tokens or
   reading requests, or steps are shorter than a wake-up), due steps run back to back without
   yielding, so each HTTP writer sends the tokens of several steps in one write instead of
   paying a loop iteration and a write per token; the engine still yields after ``slice_s`` of
   such work so the writers and new requests are served. If it falls more than ``max_lag_s``
   behind (the host is too slow or was stalled), it stops catching up: the clock moves to now
   and the time given up is added to ``slipped_s``.

Neither is free, and the engine says when it could not keep up: ``late_s`` sums how late each
step ended (``kvferry_mock_clock_late_seconds_total``; divided by the steps, the mean lag) and
``slipped_s`` is ``kvferry_mock_clock_slip_seconds_total``. Measured on a shared 2-core VM
(Python 3.11, default event loop): an engine step costs about 5 us of CPU per decoding
request; serving costs the mock about 46 us of CPU per token when each token is its own SSE
write (``speedup_ratio`` 100, one stream: 0.07 ms steps, mean lag 0.4 ms) and about 10 us when
writes carry many tokens. So one mock process streams at most some 20,000-100,000 tokens/s, and
a model that asks for more (``speedup_ratio`` 1000 with one stream asks for 140,000) runs
behind it; the mean lag shows by how much.

The engine (:mod:`kvferry.serving.mock.scheduler`) owns what a step is; this module owns only when
it ends. It reads no configuration and holds one file descriptor (closed by :meth:`close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import sys
import time
from collections.abc import Callable
from typing import Final, Protocol

__all__ = ["MAX_LAG_S", "SLICE_S", "StepClock", "Timer", "make_timer"]

MAX_LAG_S: Final = 0.01
"""Seconds the clock may run behind before it gives the time up (rule 4): enough to make up a
late wake-up, a burst of HTTP writes or a short stall of a shared host (up to ~5 ms here); past
it, a host too slow for the model makes each step late, as a real engine short of CPU would,
rather than holding every token back by a growing backlog."""

SLICE_S: Final = 0.001
"""Seconds of back-to-back steps before the engine yields to the event loop (rule 4)."""


class Timer(Protocol):
    """Wakes a coroutine at an absolute ``time.monotonic()`` time."""

    async def sleep_until(self, when: float) -> None:
        """Return at ``when`` or later (as soon after as the timer can)."""

    def close(self) -> None:
        """Release what the timer holds; idempotent."""


class StepClock:
    """The engine's deadline clock (module docstring).

    Args:
        timer: how to wait for a due time; :func:`make_timer` of the running loop if None.
        now: the wall clock, ``time.monotonic`` unless a test fakes it.
        max_lag_s: how far behind the clock may fall before giving the time up.
        slice_s: seconds of back-to-back steps between yields to the event loop.
    """

    def __init__(
        self,
        timer: Timer | None = None,
        *,
        now: Callable[[], float] = time.monotonic,
        max_lag_s: float = MAX_LAG_S,
        slice_s: float = SLICE_S,
    ) -> None:
        self._timer = timer
        self._now = now
        self.max_lag_s = max_lag_s
        self.slice_s = slice_s
        self.due = now()
        """Model time at which the last scheduled step ends (monotonic seconds)."""
        self.slipped_s = 0.0
        """Model time given up because the engine fell more than ``max_lag_s`` behind."""
        self.late_s = 0.0
        """Sum over steps of how long after its due time :meth:`step` returned."""
        self._slice_start = self.due

    def now(self) -> float:
        """The wall clock this clock keeps up with (monotonic seconds)."""
        return self._now()

    def start_at(self, when: float) -> None:
        """The engine was idle: its next step starts at ``when`` (an arrival) if that is later
        than the last step's end."""
        self.due = max(self.due, when)

    async def step(self, seconds: float) -> None:
        """Advance by one step of ``seconds`` and return when it has ended on the wall clock.

        Sleeps (precisely) while the step's end is ahead; returns at once while the clock is
        behind, yielding to the event loop once per ``slice_s`` of back-to-back steps.
        """
        self.due += seconds
        now = self._now()
        if self.due > now:
            if self._timer is None:
                self._timer = make_timer()
            await self._timer.sleep_until(self.due)
            self._slice_start = now = self._now()
            self.late_s += now - self.due
            return
        lag = now - self.due
        if lag > self.max_lag_s:
            self.slipped_s += lag
            self.due = now
            lag = 0.0
        self.late_s += lag
        if now - self._slice_start >= self.slice_s:
            await asyncio.sleep(0)
            self._slice_start = self._now()

    def close(self) -> None:
        """Release the timer; the clock can be used again (it makes a new one)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.close()


# --- timers ----------------------------------------------------------------------------------


class _SleepTimer:
    """``asyncio.sleep`` until the time has come: coarse (the loop's timeout granularity) but
    never early, even on a loop that rounds short sleeps down."""

    async def sleep_until(self, when: float) -> None:
        while (left := when - time.monotonic()) > 0:
            await asyncio.sleep(left)

    def close(self) -> None:
        pass


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC: Final = 1
_TFD_TIMER_ABSTIME: Final = 1


class _TimerFd:
    """A Linux timerfd armed at absolute ``CLOCK_MONOTONIC`` times (``time.monotonic()``'s
    clock) and watched by the event loop: the loop's poll returns when it fires, to the
    microsecond, whatever timeout the loop computed.

    Raises:
        OSError: the timerfd cannot be made or watched.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._settime = libc.timerfd_settime
        self._settime.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.c_void_p,
        ]
        fd: int = libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self._fd = fd
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        try:
            loop.add_reader(fd, self._fired)
        except BaseException:
            os.close(fd)
            raise

    def _fired(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 8)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def sleep_until(self, when: float) -> None:
        # A fire left over from an earlier, cancelled wait may wake this one early: check.
        while when > time.monotonic():
            ns = round(when * 1e9)
            spec = _Itimerspec(_Timespec(0, 0), _Timespec(ns // 1_000_000_000, ns % 1_000_000_000))
            if self._settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1


def make_timer(loop: asyncio.AbstractEventLoop | None = None) -> Timer:
    """The most precise timer for ``loop`` (the running loop if None): a timerfd on Linux,
    else ``asyncio.sleep``."""
    loop = loop or asyncio.get_running_loop()
    if sys.platform.startswith("linux"):
        try:
            return _TimerFd(loop)
        except (OSError, AttributeError, NotImplementedError):
            pass  # no timerfd (old libc, a loop without add_reader): the coarse timer
    return _SleepTimer()
