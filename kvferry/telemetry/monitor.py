"""StatsMonitor: samples a store's statistics on an interval and reports per-interval rates.

Owns the arithmetic that turns cumulative ``StoreStats`` counters into what an operator watches
(the way UCM's StatsMonitor reports them): per interval, the hit rate (block-weighted from the
deltas of hit and looked-up blocks, with the per-request mean beside it, labelled), and the load
and save speeds in GB/s (1e9 bytes) from the deltas of bytes moved over the deltas of seconds
spent moving them. It also renders a snapshot as a rich table for the CLI. It reads statistics
only through the function it was given and never changes the store.

Sampling: ``start()`` runs a daemon thread that samples at once and then every ``interval_s``;
``sample()`` takes one sample now (tests drive it with a fake ``clock`` instead of sleeping).
The first sample has no predecessor, so its deltas are the totals so far (everything the store
did before the monitor started) and its wall-clock interval is 0. A counter that goes backwards
(the store was reopened) is treated as reset: its delta is its new value, as Prometheus' rate()
does. The last ``history`` samples are kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from kvferry.errors import ConfigError
from kvferry.store.stats import StoreStats, TierCounters
from kvferry.tables import FitTable

log = logging.getLogger("kvferry.telemetry.monitor")

Sample = dict[str, object]
"""One interval's report (see ``StatsMonitor.sample`` for the keys)."""


@dataclass(frozen=True)
class _TierTotals:
    bytes_in: int = 0
    bytes_out: int = 0
    save_seconds: float = 0.0
    load_seconds: float = 0.0
    blocks_in: int = 0
    blocks_out: int = 0
    hits: int = 0
    evictions: int = 0
    errors: int = 0

    @classmethod
    def of(cls, t: TierCounters) -> _TierTotals:
        return cls(
            t.bytes_in,
            t.bytes_out,
            t.save_seconds,
            t.load_seconds,
            t.blocks_in,
            t.blocks_out,
            t.hits,
            t.evictions,
            t.errors,
        )


@dataclass(frozen=True)
class _Totals:
    """The cumulative numbers a sample needs, copied out of a StoreStats at sampling time.

    Copied rather than kept: ``fn`` may hand back the store's live object, whose counters would
    move under us and make every delta zero.
    """

    time: float = 0.0
    lookups: int = 0
    lookup_blocks: int = 0
    hit_blocks: int = 0
    request_hit_fraction_sum: float = 0.0
    puts: int = 0
    put_blocks: int = 0
    gets: int = 0
    get_blocks: int = 0
    tiers: dict[str, _TierTotals] = field(default_factory=dict)

    @classmethod
    def of(cls, stats: StoreStats, now: float) -> _Totals:
        return cls(
            now,
            stats.lookups,
            stats.lookup_blocks,
            stats.hit_blocks,
            stats.request_hit_fraction_sum,
            stats.puts,
            stats.put_blocks,
            stats.gets,
            stats.get_blocks,
            {name: _TierTotals.of(t) for name, t in stats.tiers.items()},
        )


def _delta(current: float, previous: float) -> float:
    # A counter that went backwards was reset: everything it holds now happened since.
    d = current - previous
    return current if d < 0 else d


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _interval_report(prev: _Totals | None, cur: _Totals, stats: StoreStats) -> Sample:
    """The report for the interval from ``prev`` (None: from zero) to ``cur``."""
    base = prev if prev is not None else _Totals(time=cur.time)
    dt = max(0.0, cur.time - base.time)
    lookups = _delta(cur.lookups, base.lookups)
    lookup_blocks = _delta(cur.lookup_blocks, base.lookup_blocks)
    hit_blocks = _delta(cur.hit_blocks, base.hit_blocks)
    fraction_sum = _delta(cur.request_hit_fraction_sum, base.request_hit_fraction_sum)

    tiers: dict[str, dict[str, float]] = {}
    sum_in = sum_out = sum_save_s = sum_load_s = 0.0
    for name, t in cur.tiers.items():
        p = base.tiers.get(name, _TierTotals())
        bytes_in = _delta(t.bytes_in, p.bytes_in)
        bytes_out = _delta(t.bytes_out, p.bytes_out)
        save_s = _delta(t.save_seconds, p.save_seconds)
        load_s = _delta(t.load_seconds, p.load_seconds)
        sum_in, sum_out = sum_in + bytes_in, sum_out + bytes_out
        sum_save_s, sum_load_s = sum_save_s + save_s, sum_load_s + load_s
        row: dict[str, float] = {
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "save_seconds": save_s,
            "load_seconds": load_s,
            "save_gbps": _ratio(bytes_in, save_s) / 1e9,
            "load_gbps": _ratio(bytes_out, load_s) / 1e9,
            "blocks_in": _delta(t.blocks_in, p.blocks_in),
            "blocks_out": _delta(t.blocks_out, p.blocks_out),
            "hit_blocks": _delta(t.hits, p.hits),
            "evictions": _delta(t.evictions, p.evictions),
            "errors": _delta(t.errors, p.errors),
        }
        usage = stats.usage.get(name)
        if usage is not None:
            row["used_blocks"] = usage.used_blocks
            if usage.total_blocks is not None:
                row["total_blocks"] = usage.total_blocks
        tiers[name] = row

    return {
        "time": cur.time,
        "interval_s": dt,
        "lookups": lookups,
        "lookup_blocks": lookup_blocks,
        "hit_blocks": hit_blocks,
        "hit_rate": _ratio(hit_blocks, lookup_blocks),
        "request_hit_rate_mean": _ratio(fraction_sum, lookups),
        "puts": _delta(cur.puts, base.puts),
        "put_blocks": _delta(cur.put_blocks, base.put_blocks),
        "gets": _delta(cur.gets, base.gets),
        "get_blocks": _delta(cur.get_blocks, base.get_blocks),
        "bytes_in": sum_in,
        "bytes_out": sum_out,
        # Speeds while moving (bytes / seconds spent moving), as UCM's load_speed/save_speed...
        "save_gbps": _ratio(sum_in, sum_save_s) / 1e9,
        "load_gbps": _ratio(sum_out, sum_load_s) / 1e9,
        # ...and throughput over the wall-clock interval, which idle time dilutes.
        "save_wall_gbps": _ratio(sum_in, dt) / 1e9,
        "load_wall_gbps": _ratio(sum_out, dt) / 1e9,
        "total_hit_rate": stats.hit_rate,
        "total_request_hit_rate_mean": stats.request_hit_rate_mean,
        "leases_active": stats.leases_active,
        "tiers": tiers,
    }


class StatsMonitor:
    """Samples ``fn()`` every ``interval_s`` seconds in a daemon thread; keeps the last samples.

    Args:
        fn: returns the store's statistics now; called from the monitor thread.
        interval_s: seconds between samples.
        history: samples kept (the oldest are dropped).
        clock: monotonic seconds; a fake one lets tests step time without sleeping.

    Raises:
        ConfigError: ``interval_s`` <= 0 or ``history`` < 1.
    """

    def __init__(
        self,
        fn: Callable[[], StoreStats],
        interval_s: float = 10.0,
        *,
        history: int = 360,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval_s > 0:
            raise ConfigError(f"monitor interval_s={interval_s!r} is invalid; it must be > 0")
        if history < 1:
            raise ConfigError(f"monitor history={history!r} is invalid; it must be >= 1")
        self._fn = fn
        self.interval_s = float(interval_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: deque[Sample] = deque(maxlen=history)
        self._prev: _Totals | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0
        """Samples that failed because ``fn`` raised (the thread logs them and goes on)."""
        self.last_error: str | None = None

    def sample(self) -> Sample:
        """Read the statistics now and record the report for the interval since the last sample.

        Returns:
            The report: ``time``, ``interval_s``; interval deltas ``lookups``, ``lookup_blocks``,
            ``hit_blocks``, ``puts``, ``put_blocks``, ``gets``, ``get_blocks``, ``bytes_in``,
            ``bytes_out``; interval ``hit_rate`` (block-weighted) and ``request_hit_rate_mean``
            (per-request); ``save_gbps`` / ``load_gbps`` (bytes over seconds spent moving) and
            ``save_wall_gbps`` / ``load_wall_gbps`` (bytes over the interval); cumulative
            ``total_hit_rate`` and ``total_request_hit_rate_mean``; ``leases_active``; and
            ``tiers``: per tier the same deltas and speeds plus ``used_blocks`` and
            ``total_blocks`` when known.

        Raises:
            Whatever ``fn`` raises; nothing is recorded then.
        """
        stats = self._fn()
        with self._lock:
            # Clock read under the lock: two concurrent samples still get ordered intervals.
            cur = _Totals.of(stats, self._clock())
            report = _interval_report(self._prev, cur, stats)
            self._prev = cur
            self._samples.append(report)
        return report

    def latest(self) -> Sample:
        """The most recent report; an empty dict before the first sample."""
        with self._lock:
            return dict(self._samples[-1]) if self._samples else {}

    def history(self) -> list[Sample]:
        """The kept reports, oldest first."""
        with self._lock:
            return list(self._samples)

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self) -> None:
        """Start sampling in a daemon thread (a first sample at once); no-op if running.

        Raises:
            RuntimeError: the monitor was stopped (make a new one).
        """
        if self.running:
            return
        if self._stop.is_set():
            raise RuntimeError("StatsMonitor was stopped; create a new one")
        self._thread = threading.Thread(target=self._run, name="kvferry-stats-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it; idempotent. Samples stay readable."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception as e:  # isolation boundary: a failing read must not end monitoring
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("stats monitor: reading stats failed: %s", self.last_error)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> StatsMonitor:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _decimal_bytes(n: float) -> str:
    # Decimal units, matching GB/s = 1e9 bytes per second.
    for unit, factor in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{int(n)} B"


_DROP = {"peak": 3, "bytes in": 2, "bytes out": 2, "evictions": 1}
"""Columns a narrow console leaves out, the highest first."""


def format_table(stats: StoreStats, *, wide: bool = False) -> FitTable:
    """A rich table of a store snapshot: one row per tier, hit rates in the title. It fits the
    console it is printed on (:class:`~kvferry.tables.FitTable`).

    Speeds are cumulative (bytes over all seconds spent moving), in GB/s = 1e9 bytes/s.
    """
    table = FitTable(
        title=(
            f"hit rate {stats.hit_rate:.1%} (block-weighted, {stats.hit_blocks}/"
            f"{stats.lookup_blocks} blocks) | per-request mean {stats.request_hit_rate_mean:.1%} "
            f"({stats.lookups} lookups)"
        ),
        wide=wide,
        hint="a wider console shows every column",
        title_justify="left",
    )
    table.add_column("tier", justify="left")
    for header in (
        "used/total blocks",
        "peak",
        "hit blocks",
        "bytes in",
        "bytes out",
        "save GB/s",
        "load GB/s",
        "evictions",
        "errors",
    ):
        table.add_column(header, drop=_DROP.get(header, 0))
    for name in list(dict.fromkeys([*stats.tiers, *stats.usage])):
        t = stats.tiers.get(name, TierCounters())
        usage = stats.usage.get(name)
        if usage is None:
            used, peak = "-", "-"
        else:
            total = "-" if usage.total_blocks is None else str(usage.total_blocks)
            used, peak = f"{usage.used_blocks}/{total}", str(usage.peak_blocks)
        table.add_row(
            name,
            used,
            peak,
            str(t.hits),
            _decimal_bytes(t.bytes_in),
            _decimal_bytes(t.bytes_out),
            f"{t.save_gbps:.2f}",
            f"{t.load_gbps:.2f}",
            str(t.evictions),
            str(t.errors),
        )
    return table
