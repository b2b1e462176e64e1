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

What it reads is a function returning ``StoreStats`` (an embedded store's ``stats``) or a
:class:`~kvferry.telemetry.sources.MonitorSource` (a running store server, a Prometheus
endpoint), whose ``read`` is that function. Each report also carries the interval's error rate
(tier errors over requests) and ``warnings``: lines for what crossed a :class:`Thresholds` (hit
rate low, a pool near full, errors, a tier that loads slower than the engine would recompute).
``kvferry monitor`` (:mod:`kvferry.cli.monitor_cmd`) shows the reports live with
:func:`format_sample`.
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
from kvferry.telemetry.sources import MonitorSource

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


@dataclass(frozen=True)
class Thresholds:
    """Where a report gets a warning line (``kvferry monitor --warn-*``).

    Args:
        hit_rate: warn when an interval's block-weighted hit rate is below this (intervals
            with lookups only).
        pool: warn when a tier's used/total blocks reaches this fraction.
        error_rate: warn when an interval's tier errors over requests (lookups + gets + puts)
            exceed this.
        prefill_tokens_per_s: the engine's prefill speed; with ``kv_bytes_per_token``, a tier
            that loads slower than ``prefill_tokens_per_s * kv_bytes_per_token`` bytes/s is
            slower than recomputing its blocks. Either unset: that check is off.
        kv_bytes_per_token: KV-cache bytes of one token (all layers, K and V).

    Raises:
        ConfigError: a fraction outside [0, 1], or a speed or size that is not > 0.
    """

    hit_rate: float = 0.2
    pool: float = 0.9
    error_rate: float = 0.01
    prefill_tokens_per_s: float | None = None
    kv_bytes_per_token: int | None = None

    def __post_init__(self) -> None:
        for name, flag in (
            ("hit_rate", "--warn-hit-rate"),
            ("pool", "--warn-pool"),
            ("error_rate", "--warn-error-rate"),
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(
                    f"monitor threshold {name} ({flag}) = {value!r} is invalid; it must be a "
                    "fraction in [0, 1]"
                )
        for name, flag in (
            ("prefill_tokens_per_s", "--prefill-tokens-per-s"),
            ("kv_bytes_per_token", "--kv-bytes-per-token"),
        ):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"monitor {name} ({flag}) = {value!r} is invalid; it must be > 0")

    @property
    def recompute_gbps(self) -> float | None:
        """The speed, in GB/s of KV bytes, at which the engine recomputes KV; None if unknown."""
        if self.prefill_tokens_per_s is None or self.kv_bytes_per_token is None:
            return None
        return self.prefill_tokens_per_s * self.kv_bytes_per_token / 1e9


def check(report: Sample, thresholds: Thresholds) -> list[str]:
    """The warning lines for one report (see :class:`Thresholds`); empty when all is well."""
    out: list[str] = []
    lookup_blocks = _num(report.get("lookup_blocks"))
    hit_rate = _num(report.get("hit_rate"))
    if lookup_blocks > 0 and hit_rate < thresholds.hit_rate:
        out.append(
            f"hit rate low: {hit_rate:.1%} this interval ({int(_num(report.get('hit_blocks')))}/"
            f"{int(lookup_blocks)} blocks) < {thresholds.hit_rate:.0%} (--warn-hit-rate)"
        )
    requests = _num(report.get("requests"))
    errors = _num(report.get("errors"))
    if errors > 0 and (requests == 0 or errors / requests > thresholds.error_rate):
        out.append(
            f"error rate high: {int(errors)} tier errors for {int(requests)} requests this "
            f"interval > {thresholds.error_rate:.1%} (--warn-error-rate)"
        )
    tiers = report.get("tiers")
    recompute = thresholds.recompute_gbps
    for name, row in (tiers if isinstance(tiers, dict) else {}).items():
        total = row.get("total_blocks")
        if total:
            used = row.get("used_blocks", 0.0)
            if used / total >= thresholds.pool:
                out.append(
                    f"{name} pool near full: {int(used)}/{int(total)} blocks "
                    f"({used / total:.0%} >= {thresholds.pool:.0%}, --warn-pool)"
                )
        # A tier that lent its bytes (a store server's GET) spent no seconds loading: no speed.
        if recompute is not None and row.get("load_seconds", 0.0) > 0:
            load = row.get("load_gbps", 0.0)
            if load < recompute:
                out.append(
                    f"{name} loads slower than recompute: {load:.3f} GB/s < {recompute:.3f} "
                    f"GB/s ({thresholds.prefill_tokens_per_s:g} tokens/s x "
                    f"{thresholds.kv_bytes_per_token} B/token)"
                )
    return out


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


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
    sum_errors = sum_evictions = 0.0
    for name, t in cur.tiers.items():
        p = base.tiers.get(name, _TierTotals())
        bytes_in = _delta(t.bytes_in, p.bytes_in)
        bytes_out = _delta(t.bytes_out, p.bytes_out)
        save_s = _delta(t.save_seconds, p.save_seconds)
        load_s = _delta(t.load_seconds, p.load_seconds)
        sum_in, sum_out = sum_in + bytes_in, sum_out + bytes_out
        sum_save_s, sum_load_s = sum_save_s + save_s, sum_load_s + load_s
        errors, evictions = _delta(t.errors, p.errors), _delta(t.evictions, p.evictions)
        sum_errors, sum_evictions = sum_errors + errors, sum_evictions + evictions
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
            "evictions": evictions,
            "errors": errors,
        }
        usage = stats.usage.get(name)
        if usage is not None:
            row["used_blocks"] = usage.used_blocks
            if usage.total_blocks is not None:
                row["total_blocks"] = usage.total_blocks
        tiers[name] = row

    puts = _delta(cur.puts, base.puts)
    gets = _delta(cur.gets, base.gets)
    requests = lookups + gets + puts
    return {
        "time": cur.time,
        "interval_s": dt,
        "requests": requests,
        "lookups": lookups,
        "lookup_blocks": lookup_blocks,
        "hit_blocks": hit_blocks,
        "hit_rate": _ratio(hit_blocks, lookup_blocks),
        "request_hit_rate_mean": _ratio(fraction_sum, lookups),
        "puts": puts,
        "put_blocks": _delta(cur.put_blocks, base.put_blocks),
        "gets": gets,
        "get_blocks": _delta(cur.get_blocks, base.get_blocks),
        "bytes_in": sum_in,
        "bytes_out": sum_out,
        # Speeds while moving (bytes / seconds spent moving), as UCM's load_speed/save_speed...
        "save_gbps": _ratio(sum_in, sum_save_s) / 1e9,
        "load_gbps": _ratio(sum_out, sum_load_s) / 1e9,
        # ...and throughput over the wall-clock interval, which idle time dilutes.
        "save_wall_gbps": _ratio(sum_in, dt) / 1e9,
        "load_wall_gbps": _ratio(sum_out, dt) / 1e9,
        "evictions": sum_evictions,
        "errors": sum_errors,
        "error_rate": _ratio(sum_errors, requests),
        "total_hit_rate": stats.hit_rate,
        "total_request_hit_rate_mean": stats.request_hit_rate_mean,
        "total_lookup_blocks": stats.lookup_blocks,
        "total_hit_blocks": stats.hit_blocks,
        "total_bytes_in": sum(t.bytes_in for t in cur.tiers.values()),
        "total_bytes_out": sum(t.bytes_out for t in cur.tiers.values()),
        "total_evictions": sum(t.evictions for t in cur.tiers.values()),
        "total_errors": sum(t.errors for t in cur.tiers.values()),
        "leases_active": stats.leases_active,
        "tiers": tiers,
    }


class StatsMonitor:
    """Samples ``fn()`` every ``interval_s`` seconds in a daemon thread; keeps the last samples.

    Args:
        fn: returns the store's statistics now (called from the monitor thread), or a
            :class:`~kvferry.telemetry.sources.MonitorSource`, whose ``read`` is called.
        interval_s: seconds between samples.
        history: samples kept (the oldest are dropped).
        clock: monotonic seconds; a fake one lets tests step time without sleeping.
        thresholds: where a report gets ``warnings`` (default :class:`Thresholds`).

    Raises:
        ConfigError: ``interval_s`` <= 0 or ``history`` < 1.
    """

    def __init__(
        self,
        fn: Callable[[], StoreStats] | MonitorSource,
        interval_s: float = 10.0,
        *,
        history: int = 360,
        clock: Callable[[], float] = time.monotonic,
        thresholds: Thresholds | None = None,
    ) -> None:
        if not interval_s > 0:
            raise ConfigError(f"monitor interval_s={interval_s!r} is invalid; it must be > 0")
        if history < 1:
            raise ConfigError(f"monitor history={history!r} is invalid; it must be >= 1")
        self._fn: Callable[[], StoreStats] = fn.read if isinstance(fn, MonitorSource) else fn
        self.thresholds = thresholds if thresholds is not None else Thresholds()
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
            ``bytes_out``, ``requests`` (lookups + gets + puts), ``evictions``, ``errors`` (tier
            errors) and ``error_rate`` (errors / requests); interval ``hit_rate``
            (block-weighted) and ``request_hit_rate_mean``
            (per-request); ``save_gbps`` / ``load_gbps`` (bytes over seconds spent moving) and
            ``save_wall_gbps`` / ``load_wall_gbps`` (bytes over the interval); cumulative
            ``total_hit_rate``, ``total_request_hit_rate_mean``, ``total_lookup_blocks``,
            ``total_hit_blocks``, ``total_bytes_in``, ``total_bytes_out``,
            ``total_evictions``, ``total_errors``; ``leases_active``; ``tiers``: per tier the
            same deltas and speeds plus ``used_blocks`` and ``total_blocks`` when known; and
            ``warnings``: the lines of :func:`check` with the monitor's thresholds.

        Raises:
            Whatever ``fn`` raises; nothing is recorded then.
        """
        stats = self._fn()
        with self._lock:
            # Clock read under the lock: two concurrent samples still get ordered intervals.
            cur = _Totals.of(stats, self._clock())
            report = _interval_report(self._prev, cur, stats)
            report["warnings"] = check(report, self.thresholds)
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


_SAMPLE_DROP = {"bytes in": 3, "bytes out": 3, "save GB/s": 2, "evictions": 1}
"""Columns of :func:`format_sample` a narrow console leaves out, the highest first."""


def _speed(row: dict[str, float], moved: str, seconds: str) -> str:
    # Bytes moved in no measured time (a server lending views, not copying): no speed to show.
    if row.get(seconds, 0.0) > 0:
        return f"{row.get(moved, 0.0) / row[seconds] / 1e9:.3f}"
    return "-" if row.get(moved, 0.0) > 0 else "0.000"


def format_sample(report: Sample, *, source: str = "", wide: bool = False) -> FitTable:
    """A rich table of one report (what ``kvferry monitor`` shows live): the interval and
    cumulative hit rates and the interval's request count in the title; one row per tier with
    its pool usage, this interval's load and save speeds (GB/s = 1e9 bytes/s over the seconds
    spent moving; "-" where bytes moved in no measured time, as a store server lends blocks
    without copying them), bytes, evictions and errors. Warnings are not in it (print them
    below)."""
    interval = _num(report.get("interval_s"))
    lookup_blocks, hit_blocks = _num(report.get("lookup_blocks")), _num(report.get("hit_blocks"))
    since = "since start" if interval == 0 else f"last {interval:.1f}s"
    title = (
        f"{source + ' | ' if source else ''}{since}: hit rate "
        f"{_num(report.get('hit_rate')):.1%} ({int(hit_blocks)}/{int(lookup_blocks)} blocks), "
        f"{int(_num(report.get('requests')))} requests | cumulative "
        f"{_num(report.get('total_hit_rate')):.1%} ({int(_num(report.get('total_hit_blocks')))}/"
        f"{int(_num(report.get('total_lookup_blocks')))})"
    )
    table = FitTable(
        title=title, wide=wide, hint="a wider console shows every column", title_justify="left"
    )
    table.add_column("tier", justify="left")
    for header in (
        "pool",
        "load GB/s",
        "save GB/s",
        "bytes out",
        "bytes in",
        "evictions",
        "errors",
    ):
        table.add_column(header, drop=_SAMPLE_DROP.get(header, 0))
    tiers = report.get("tiers")
    for name, row in (tiers if isinstance(tiers, dict) else {}).items():
        used = row.get("used_blocks")
        total = row.get("total_blocks")
        if used is None:
            pool = "-"
        elif total:
            pool = f"{int(used)}/{int(total)} ({used / total:.0%})"
        else:
            pool = f"{int(used)}/-"
        table.add_row(
            str(name),
            pool,
            _speed(row, "bytes_out", "load_seconds"),
            _speed(row, "bytes_in", "save_seconds"),
            _decimal_bytes(row.get("bytes_out", 0.0)),
            _decimal_bytes(row.get("bytes_in", 0.0)),
            str(int(row.get("evictions", 0))),
            str(int(row.get("errors", 0))),
        )
    return table
