"""Prometheus metric families from kvferry's statistics: the translation half of the exporter.

Owns the mapping from kvferry's own statistics (``StoreStats`` of a tiered store, the
``MetricSet.snapshot()`` dict of a transfer engine) to Prometheus metric families, names, labels
and help texts. Pure functions over snapshots: no server, no registry, nothing global;
:mod:`kvferry.telemetry.prometheus` serves what these build.

Translation happens at scrape time (the exporter's collector calls :func:`add_store` and
:func:`add_transfer` on each source's fresh snapshot). Every kvferry metric is prefixed
``kvferry_``; those read from a source carry a ``source`` label (the name given to
``add_source``); tier metrics add ``tier``, transfer metrics add ``transport``. Latency
histograms become Prometheus histograms whose ``le`` bounds are the power-of-two microsecond
bounds of :class:`~kvferry.observe.counters.LatencyHistogram`, in seconds.

Names follow Prometheus' conventions: base units (bytes, seconds), counters end in ``_total``,
and no ratio or speed is exported, because a lifetime average cannot be windowed: a hit rate is
``rate(kvferry_store_hit_blocks_total[5m]) / rate(kvferry_store_lookup_blocks_total[5m])``, a
tier's load speed ``rate(kvferry_tier_bytes_out_total[5m])`` (``docs/grafana/kvferry.json`` has
these and more). Metric names and their meaning:

- store (every request the store serves, its own calls and a store server's, see
  :mod:`kvferry.store.stats`): ``kvferry_store_{lookups,lookup_blocks,hit_blocks,
  lookup_hit_fractions,puts,put_blocks,gets,get_blocks,get_hit_blocks,leases_expired}_total``,
  ``kvferry_store_leases_active`` (gauge), ``kvferry_store_{lookup,get,put}_latency_seconds``
  (histograms);
- tier traffic: ``kvferry_tier_{lookup_blocks,hit_blocks,blocks_in,blocks_out,bytes_in,bytes_out,
  save_seconds,load_seconds,evictions,demotions,dropped_blocks,promotions,no_space_blocks,errors,
  corrupt_blocks,breaker_skipped_calls,breaker_opens,breaker_closes}_total``,
  ``kvferry_tier_breaker_open`` (gauge; 1 while a shared tier's circuit breaker is open);
- tier usage: ``kvferry_tier_{used,total,peak}_blocks``, ``kvferry_tier_{used,total}_bytes``
  (gauges; ``total_*`` absent for tiers without a fixed capacity), and what a tier reports of its
  own, each where that tier has it: ``kvferry_tier_{reserved_blocks,guarded_slots}`` (cpu),
  ``kvferry_tier_{direct_io,recovered_blocks}`` (disk), ``kvferry_tier_servers`` (server)
  (gauges), ``kvferry_tier_dropped_corrupt_blocks_total`` (cpu, disk, server),
  ``kvferry_tier_foreign_blocks_total`` (redis), ``kvferry_tier_dropped_reads_total`` (mooncake);
- transfer: ``kvferry_transfer_{bytes_read,bytes_written,requests,slices,errors,retries,
  protocol_errors,timeouts,evicted}_total``, ``kvferry_transfer_latency_seconds`` (histogram);
- the exporter itself: ``kvferry_exporter_source_up`` (1 when the last scrape read the source),
  ``kvferry_exporter_source_errors_total``, ``kvferry_build_info{version,python,commit}``
  (always 1), and prometheus_client's ``process_*`` and ``python_info``.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final, TypeVar, cast

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from kvferry.observe.counters import LatencyHistogram
from kvferry.store.stats import StoreStats, TierCounters

__all__ = [
    "PREFIX",
    "BuildInfoCollector",
    "Families",
    "Source",
    "TransferSnapshot",
    "add_store",
    "add_transfer",
    "build_info",
    "histogram_buckets",
]

TransferSnapshot = Mapping[str, Mapping[str, object]]
"""``MetricSet.snapshot()``: transport name -> ``TransportCounters.snapshot()``."""

Source = Callable[[], StoreStats | TransferSnapshot]
"""What ``add_source`` takes: a function returning a fresh snapshot at each scrape."""

PREFIX: Final = "kvferry_"

# The library's own formatting of "le" values (untyped upstream, hence the cast).
_le = cast(Callable[[float], str], floatToGoString)

# (field of StoreStats, metric stem, help) for the store's monotonic counters.
_STORE_COUNTERS: Final = (
    ("lookups", "lookups", "lookup() calls."),
    ("lookup_blocks", "lookup_blocks", "Blocks asked for by lookups."),
    ("hit_blocks", "hit_blocks", "Leading blocks found by lookups."),
    ("puts", "puts", "Store (put) calls."),
    ("put_blocks", "put_blocks", "Blocks offered to store calls."),
    ("gets", "gets", "Load (get) calls."),
    ("get_blocks", "get_blocks", "Blocks asked for by load calls."),
    ("get_hit_blocks", "get_hit_blocks", "Blocks load calls found."),
    ("leases_expired", "leases_expired", "Pins released because their lease ran out."),
    (
        "request_hit_fraction_sum",
        "lookup_hit_fractions",
        "Sum over lookups of each one's hit fraction; over lookups_total, the per-request mean "
        "hit rate (aiperf's definition).",
    ),
)

_LATENCY_DOCS: Final = {
    "lookup": "Seconds from a lookup's start to its answer.",
    "get": "Seconds from a load's start to its answer (views lent or bytes copied).",
    "put": "Seconds from a store call's start to its blocks being published.",
}

# (field of TierCounters, metric stem, help) for the per-tier monotonic counters.
_TIER_COUNTERS: Final = (
    ("lookups", "lookup_blocks", "Blocks looked up in the tier."),
    ("hits", "hit_blocks", "Blocks found in the tier (at the first tier that had them)."),
    ("blocks_in", "blocks_in", "Blocks stored into the tier."),
    ("blocks_out", "blocks_out", "Blocks read out of the tier."),
    ("bytes_in", "bytes_in", "Bytes stored into the tier (puts, promotions, demotions)."),
    ("bytes_out", "bytes_out", "Bytes read out of the tier."),
    ("save_seconds", "save_seconds", "Seconds spent storing into the tier."),
    ("load_seconds", "load_seconds", "Seconds spent reading out of the tier."),
    ("evictions", "evictions", "Blocks evicted from the tier (demoted or dropped)."),
    ("demotions", "demotions", "Evicted blocks that moved on to the next tier."),
    ("dropped", "dropped_blocks", "Evicted blocks lost: the next tier could not take them."),
    ("promotions", "promotions", "Blocks copied into the tier from a lower one."),
    ("no_space", "no_space_blocks", "Blocks a put could not place even after eviction."),
    ("errors", "errors", "Tier calls that failed (counted as misses)."),
    ("breaker_skipped", "breaker_skipped_calls", "Calls skipped while the breaker was open."),
    ("breaker_opens", "breaker_opens", "Times the tier's circuit breaker opened."),
    ("breaker_closes", "breaker_closes", "Times a probe closed the tier's circuit breaker."),
    ("corrupt", "corrupt_blocks", "Blocks that failed their checksum (read as misses)."),
)

# Metric stem -> (a counter?, help): the numbers tiers report in ``TierStats.extra``, each under
# a name of its own.
_TIER_EXTRA: Final = {
    "tier_reserved_blocks": (False, "Slots reserved by writers that have not committed yet."),
    "tier_guarded_slots": (
        False,
        "Slots whose next writer must declare a checksum (an earlier writer vanished).",
    ),
    "tier_dropped_corrupt_blocks": (
        True,
        "Blocks the tier found corrupt (failed checksum, torn write) and dropped; a server "
        "tier counts those it received from a server, which is told to drop them.",
    ),
    "tier_direct_io": (False, "1 when the disk tier uses O_DIRECT, 0 on the page cache."),
    "tier_recovered_blocks": (False, "Blocks the tier found at start (kept over a restart)."),
    "tier_foreign_blocks": (True, "Values under the tier's key prefix that were no block."),
    "tier_servers": (False, "Store servers the server tier spreads blocks over."),
    "tier_dropped_reads": (True, "Reads whose object's lease ran out mid-read (misses)."),
}

# ``TierStats.extra`` key -> metric stem. Keys not here are not exported: a tier's
# configuration (disk io_threads, file_bytes; mooncake segment_bytes, staging_slots; server
# server_slots) or what the store counts itself (redis hits, misses, errors, no_space;
# mooncake no_space_blocks).
_TIER_EXTRA_KEYS: Final = {
    "reserved": "tier_reserved_blocks",  # cpu
    "guarded_slots": "tier_guarded_slots",  # cpu
    "corrupt_dropped": "tier_dropped_corrupt_blocks",  # cpu, disk
    "corrupt": "tier_dropped_corrupt_blocks",  # server
    "direct_io": "tier_direct_io",  # disk
    "recovered_blocks": "tier_recovered_blocks",  # disk
    "foreign": "tier_foreign_blocks",  # redis
    "servers": "tier_servers",  # server
    "dropped_reads": "tier_dropped_reads",  # mooncake
}

# (key of TransportCounters.snapshot(), help) for the transfer counters.
_TRANSFER_COUNTERS: Final = (
    ("bytes_read", "Bytes moved by READ requests."),
    ("bytes_written", "Bytes moved by WRITE requests."),
    ("requests", "Transfer requests completed."),
    ("slices", "Slices the requests were cut into."),
    ("errors", "Requests that failed."),
    ("retries", "Slices retried."),
    ("protocol_errors", "Malformed or unauthorised frames seen."),
    ("timeouts", "Connections closed by a handshake deadline or an idle or stall timeout."),
    ("evicted", "Connections dropped in their handshake for a newer one (listener full)."),
)


def histogram_buckets(bounds_us: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets, ``le`` in seconds, from per-bucket microsecond counts.

    ``counts`` has one more entry than ``bounds_us``: the last is the overflow (``+Inf``)
    bucket. A :class:`LatencyHistogram` bucket ``i`` only holds values below
    ``bounds_us[i]``, so ``le = bounds_us[i]`` is a true upper bound.

    Raises:
        ValueError: the lengths do not match.
    """
    if len(counts) != len(bounds_us) + 1:
        raise ValueError(
            f"histogram has {len(counts)} counts for {len(bounds_us)} bounds; "
            "expected one more count than bounds (the +Inf bucket)"
        )
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound_us, n in zip(bounds_us, counts[:-1]):
        total += n
        buckets.append((_le(bound_us / 1e6), float(total)))
    total += counts[-1]
    buckets.append(("+Inf", float(total)))
    return buckets


_F = TypeVar("_F", CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)


class Families:
    """Metric families of one scrape, created on first use and filled across sources."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def _get(self, kind: type[_F], stem: str, doc: str, labels: dict[str, str]) -> _F:
        family = self._families.get(stem)
        if family is None:
            family = self._families[stem] = kind(PREFIX + stem, doc, labels=list(labels))
        if not isinstance(family, kind):  # a stem used for two kinds: a bug in this module
            raise TypeError(f"metric {PREFIX + stem} is a {family.type}, not a {kind.__name__}")
        return family

    def counter(self, stem: str, doc: str, labels: dict[str, str], value: float) -> None:
        family = self._get(CounterMetricFamily, stem, doc, labels)
        family.add_metric(list(labels.values()), value)

    def gauge(self, stem: str, doc: str, labels: dict[str, str], value: float) -> None:
        family = self._get(GaugeMetricFamily, stem, doc, labels)
        family.add_metric(list(labels.values()), value)

    def histogram(
        self,
        stem: str,
        doc: str,
        labels: dict[str, str],
        bounds_us: Sequence[float],
        counts: Sequence[int],
        sum_us: float,
    ) -> None:
        buckets = histogram_buckets(bounds_us, counts)
        family = self._get(HistogramMetricFamily, stem, doc, labels)
        family.add_metric(list(labels.values()), buckets, sum_us / 1e6)

    def latency(self, stem: str, doc: str, labels: dict[str, str], h: LatencyHistogram) -> None:
        snap = h.snapshot()
        self.histogram(
            stem,
            doc,
            labels,
            _floats(snap["bounds_us"], "bounds_us"),
            _ints(snap["counts"], "counts"),
            _number(snap["sum_us"], "sum_us"),
        )

    def merge(self, other: Families) -> None:
        """Add the samples of ``other`` (another source's families) to these."""
        for stem, family in other._families.items():
            mine = self._families.get(stem)
            if mine is None:
                self._families[stem] = family
            else:
                mine.samples.extend(family.samples)

    def metrics(self) -> list[Metric]:
        return list(self._families.values())


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} is {type(value).__name__}, expected a number")
    return float(value)


def _floats(value: object, what: str) -> list[float]:
    if not isinstance(value, list | tuple):
        raise TypeError(f"{what} is {type(value).__name__}, expected a list of numbers")
    return [_number(v, what) for v in value]


def _ints(value: object, what: str) -> list[int]:
    return [int(v) for v in _floats(value, what)]


def add_store(out: Families, source: str, stats: StoreStats) -> None:
    """Add a store's statistics to ``out``, labelled ``source``."""
    labels = {"source": source}
    for field, stem, doc in _STORE_COUNTERS:
        out.counter(f"store_{stem}", doc, labels, getattr(stats, field))
    out.gauge("store_leases_active", "Pins held now.", labels, stats.leases_active)
    for kind, h in (
        ("lookup", stats.lookup_latency),
        ("get", stats.get_latency),
        ("put", stats.put_latency),
    ):
        out.latency(f"store_{kind}_latency_seconds", _LATENCY_DOCS[kind], labels, h)
    for tier, counters in stats.tiers.items():
        _add_tier_counters(out, {"source": source, "tier": tier}, counters)
    for tier, usage in stats.usage.items():
        tl = {"source": source, "tier": tier}
        out.gauge("tier_used_blocks", "Blocks stored in the tier now.", tl, usage.used_blocks)
        out.gauge("tier_peak_blocks", "Most blocks the tier has held.", tl, usage.peak_blocks)
        if usage.total_blocks is not None:
            out.gauge("tier_total_blocks", "Block capacity of the tier.", tl, usage.total_blocks)
        out.gauge("tier_used_bytes", "Bytes stored in the tier now.", tl, usage.used_bytes)
        if usage.total_bytes is not None:
            out.gauge("tier_total_bytes", "Byte capacity of the tier.", tl, usage.total_bytes)
        for key, value in usage.extra.items():
            own = _TIER_EXTRA_KEYS.get(key)
            if own is None:
                continue  # configuration, or a count the store keeps itself (see the table)
            counter, doc = _TIER_EXTRA[own]
            if counter:
                out.counter(own, doc, tl, value)
            else:
                out.gauge(own, doc, tl, value)


def _add_tier_counters(out: Families, labels: dict[str, str], t: TierCounters) -> None:
    for field, stem, doc in _TIER_COUNTERS:
        out.counter(f"tier_{stem}", doc, labels, getattr(t, field))
    out.gauge(
        "tier_breaker_open", "1 while the tier's circuit breaker is open.", labels, t.breaker_open
    )


def add_transfer(out: Families, source: str, snapshot: TransferSnapshot) -> None:
    """Add a transfer engine's ``MetricSet.snapshot()`` to ``out``, labelled ``source``.

    Raises:
        TypeError: a value is not of the kind the snapshot has (a number, a list of them).
    """
    for transport, counters in snapshot.items():
        labels = {"source": source, "transport": str(transport)}
        for key, doc in _TRANSFER_COUNTERS:
            if key in counters:
                out.counter(f"transfer_{key}", doc, labels, _number(counters[key], key))
        latency = counters.get("latency")
        if isinstance(latency, Mapping):
            out.histogram(
                "transfer_latency_seconds",
                "Latency of transfer requests.",
                labels,
                _floats(latency.get("bounds_us"), "latency.bounds_us"),
                _ints(latency.get("counts"), "latency.counts"),
                _number(latency.get("sum_us", 0.0), "latency.sum_us"),
            )


@functools.cache
def build_info() -> dict[str, str]:
    """``kvferry_build_info``'s labels: kvferry's version, Python's, and the git commit of the
    checkout kvferry runs from ("unknown" when it is not one, e.g. an installed wheel).

    Asks git once per process, at the first exporter built (never at import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        kvferry_version = version("kvferry")
    except PackageNotFoundError:  # a checkout on sys.path, not installed
        from kvferry.version import __version__ as kvferry_version
    return {
        "version": kvferry_version,
        "python": platform.python_version(),
        "commit": _git_commit(Path(__file__).resolve().parents[2]),
    }


def _git_commit(root: Path) -> str:
    if not (root / ".git").exists():
        return "unknown"
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return "unknown"
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else "unknown"


class BuildInfoCollector:
    """``kvferry_build_info``: always 1, the build in its labels (``build_info``)."""

    def __init__(self) -> None:
        self._labels = build_info()

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            PREFIX + "build_info",
            "kvferry's version, Python's version and the git commit (always 1).",
            labels=list(self._labels),
        )
        family.add_metric(list(self._labels.values()), 1.0)
        return [family]
