"""The doctor's measuring probes: each does one small real thing and times it.

Owns the wake-up latency of a sleeping thread (and the ``transfer.grace_period_ns`` it
suggests), the Redis round trip, a TCP connect to a service, and the pinned host-to-device copy
speed. Each is seconds at most and leaves nothing behind; none needs root. The ``O_DIRECT``
probe is the disk tier's own (:func:`kvferry.backends.disk_format.probe_direct_io`), so the
doctor and the tier cannot disagree. Statuses and thresholds are the checks' (:mod:`.checks`).
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from kvferry.bench.stats import percentile
from kvferry.errors import ConfigError, MissingDependency

__all__ = [
    "GRACE_MAX_NS",
    "GRACE_STEP_NS",
    "WAKEUP_GAP_S",
    "H2dSpeed",
    "Latency",
    "connect_time",
    "h2d_speed",
    "redis_round_trip",
    "suggest_grace_period_ns",
    "wakeup_latency",
]

GRACE_STEP_NS = 10_000
"""Suggested grace periods are whole multiples of 10 us: the probe's spread on a shared VM is
about that, so a finer suggestion would be noise."""
GRACE_MAX_NS = 200_000
"""The largest grace period suggested: past 200 us of spinning per wait, a waiter burns more
CPU than most replies are worth, whatever the wake-up costs."""


@dataclass(frozen=True)
class Latency:
    """Samples of one latency, in microseconds, with p50 and p99 (linear interpolation)."""

    samples: int
    p50_us: float
    p99_us: float
    max_us: float

    @classmethod
    def of(cls, values_us: list[float]) -> Latency:
        v = sorted(values_us)
        return cls(len(v), percentile(v, 50), percentile(v, 99), v[-1])


WAKEUP_GAP_S = 0.001
"""The probe's sleep between samples: past KVM's default halt polling (200 us) an idle vCPU
halts, and waking a halted vCPU is the cost a blocking wait after the grace period pays (waits
of 50 us measured about half of it here: 15 us against 24-50 us)."""


def wakeup_latency(samples: int = 300, gap_s: float = WAKEUP_GAP_S) -> Latency:
    """How long a thread asleep on an event takes to run after another thread sets it.

    The waiter blocks in ``Event.wait`` (a futex) as a kvferry waiter blocks after its grace
    period; the setter stamps the time and sets the event; the waiter stamps again when it
    runs. The difference is the kernel's wake-up plus the handover of the interpreter lock:
    what a blocking wait costs kvferry on this machine. ``gap_s`` between samples lets the
    waiter fall asleep for real (a vCPU that idles is halted, which is the costly case).

    Raises:
        ConfigError: ``samples`` below 10.
    """
    if samples < 10:
        raise ConfigError(f"wake-up samples {samples} is too few: use at least 10")
    go = threading.Event()
    back = threading.Event()
    woke: list[int] = []
    stop = False

    def waiter() -> None:
        while True:
            go.wait()
            woke.append(time.perf_counter_ns())
            go.clear()
            back.set()
            if stop:
                return

    thread = threading.Thread(target=waiter, name="kvferry-doctor-wakeup", daemon=True)
    thread.start()
    deltas: list[float] = []
    try:
        for i in range(samples + 5):  # the first few warm the thread up: not counted
            time.sleep(gap_s)
            if i == samples + 4:
                stop = True
            t0 = time.perf_counter_ns()
            go.set()
            back.wait()
            back.clear()
            if i >= 5:
                deltas.append((woke[-1] - t0) / 1e3)
    finally:
        stop = True
        go.set()
        thread.join(timeout=5)
    return Latency.of(deltas)


def suggest_grace_period_ns(wakeup: Latency) -> int:
    """The ``transfer.grace_period_ns`` that the measured wake-up cost suggests.

    Spinning for as long as blocking would cost, then blocking, never costs more than twice the
    best choice made in hindsight (the classic spin-then-block bound): so the grace period is
    the median wake-up, rounded up to :data:`GRACE_STEP_NS`, capped at :data:`GRACE_MAX_NS`.
    A reply that comes within it is caught without paying the wake-up; one that comes later
    has cost at most one wake-up of spinning on top.
    """
    ns = wakeup.p50_us * 1e3
    steps = max(1, -(-int(ns) // GRACE_STEP_NS))
    return min(GRACE_MAX_NS, steps * GRACE_STEP_NS)


def redis_round_trip(url: str, samples: int = 50, timeout_s: float = 2.0) -> Latency:
    """PING ``url`` ``samples`` times over one connection (after one untimed PING).

    Raises:
        MissingDependency: the redis package is not installed (the ``redis`` extra).
        OSError: the server cannot be reached or answers with an error (redis' own
            ConnectionError and ResponseError are re-raised as OSError).
    """
    try:
        import redis
    except ImportError as e:
        raise MissingDependency("redis", "redis") from e
    try:
        client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
    except ValueError as e:
        raise OSError(f"bad redis url: {e}") from e
    try:
        client.ping()
        values = []
        for _ in range(samples):
            t0 = time.perf_counter_ns()
            client.ping()
            values.append((time.perf_counter_ns() - t0) / 1e3)
    except redis.RedisError as e:
        raise OSError(str(e) or type(e).__name__) from e
    finally:
        client.close()
    return Latency.of(values)


def connect_time(address: str, timeout_s: float = 2.0) -> float:
    """Microseconds to open (and close) a TCP connection to ``host:port`` or a URL.

    Raises:
        OSError: the address is malformed or nothing answers there.
    """
    host, port = _host_port(address)
    t0 = time.perf_counter_ns()
    with socket.create_connection((host, port), timeout=timeout_s):
        pass
    return (time.perf_counter_ns() - t0) / 1e3


def _host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "//" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError as e:
        raise OSError(f"{address!r}: {e}") from e
    if not parts.hostname or port is None:
        raise OSError(f"{address!r} is not host:port")
    return parts.hostname, port


@dataclass(frozen=True)
class H2dSpeed:
    """Pinned host-to-device copy speed of GPU 0 (GB/s = 1e9 bytes per second)."""

    device: str
    cuda: str
    bytes: int
    gbps: float


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def h2d_speed(size: int = 256 << 20, rounds: int = 5) -> H2dSpeed | None:
    """The best of ``rounds`` copies of ``size`` pinned bytes to GPU 0; None without CUDA.

    Imports torch (seconds): call it only when a GPU device node is present.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(size, dtype=torch.uint8, device="cuda:0")
    device.copy_(host, non_blocking=True)  # warm-up: context, first-touch
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, size / (time.perf_counter() - t0) / 1e9)
    return H2dSpeed(torch.cuda.get_device_name(0), str(torch.version.cuda), size, best)
