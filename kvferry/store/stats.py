"""Store statistics: what the StatsMonitor, the Prometheus exporter and the benches report.

Hit rate has two definitions and both are kept apart, labelled (DESIGN.md "Metrics"):
- ``hit_rate`` (the headline): block-weighted ratio of sums, hit blocks / looked-up blocks;
- ``request_hit_rate_mean``: the mean over lookups of each lookup's own hit fraction (aiperf's
  per-request definition).
Load and save speeds are GB/s with GB = 1e9 bytes, over the seconds spent moving the bytes.
Both are derived here for the CLI and JSON; the Prometheus exporter serves only the counters
they come from (a ratio of lifetime sums cannot be windowed by PromQL's ``rate()``).

What counts as a request (``lookups``, ``gets``, ``puts``): each call of the store's own API,
and each request a front end serves through it (the store server's CONTAINS and LOOKUP are
lookups; GET and LOCATE are gets; PUT and RESERVE+COMMIT are puts), counted once however many
store calls serve it.

The counters are plain integers updated under the store's lock; ``snapshot`` copies them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from kvferry.backends.base import TierStats
from kvferry.errors import ProtocolError
from kvferry.observe.counters import LatencyHistogram


@dataclass
class TierCounters:
    """Per-tier traffic counters kept by the store (the tier itself only reports usage)."""

    lookups: int = 0
    """Blocks looked up in this tier."""
    hits: int = 0
    """Blocks found in this tier (counted at the first tier that had them)."""
    blocks_in: int = 0
    blocks_out: int = 0
    bytes_in: int = 0
    """Bytes stored into this tier (puts, promotions, demotions)."""
    bytes_out: int = 0
    """Bytes read out of this tier."""
    save_seconds: float = 0.0
    load_seconds: float = 0.0
    evictions: int = 0
    """Blocks evicted from this tier (demoted or dropped)."""
    demotions: int = 0
    """Evicted blocks that went on to the next tier instead of being lost."""
    dropped: int = 0
    """Evicted blocks that were lost because the next tier could not take them (full or down)
    and the put needed the room."""
    promotions: int = 0
    """Blocks copied into this tier from a lower one on a hit or a prefetch."""
    no_space: int = 0
    """Blocks a put could not place even after eviction."""
    errors: int = 0
    """Tier calls that failed (StorageError); they count as misses."""
    breaker_skipped: int = 0
    """Calls into this shared tier not made because its circuit breaker was open (each reads as
    a miss, or NO_SPACE)."""
    breaker_opens: int = 0
    """Times this shared tier's circuit breaker opened (failures in a row, or a failed probe)."""
    breaker_closes: int = 0
    """Times a probe found this shared tier answering again and closed its breaker."""
    breaker_open: int = 0
    """1 while this shared tier's breaker is open or probing, else 0 (a gauge)."""
    corrupt: int = 0
    """Blocks whose bytes failed their checksum (dropped, read as misses) or did not match the
    writer's checksum at commit (not published)."""

    @property
    def load_gbps(self) -> float:
        return self.bytes_out / self.load_seconds / 1e9 if self.load_seconds > 0 else 0.0

    @property
    def save_gbps(self) -> float:
        return self.bytes_in / self.save_seconds / 1e9 if self.save_seconds > 0 else 0.0


@dataclass
class StoreStats:
    """A snapshot of a TieredStore's counters."""

    lookups: int = 0
    """lookup() calls."""
    lookup_blocks: int = 0
    """Blocks asked for by lookups."""
    hit_blocks: int = 0
    """Leading blocks found by lookups."""
    request_hit_fraction_sum: float = 0.0
    puts: int = 0
    """Store calls (``put``, ``complete_store``; a server's PUT and COMMIT)."""
    put_blocks: int = 0
    """Blocks offered to store calls."""
    gets: int = 0
    """Load calls (``get``, ``prepare_load``; a server's GET and LOCATE)."""
    get_blocks: int = 0
    """Blocks asked for by loads."""
    get_hit_blocks: int = 0
    """Blocks loads found."""
    leases_active: int = 0
    leases_expired: int = 0
    """Pins released because their lease ran out (a caller that went away)."""
    tiers: dict[str, TierCounters] = field(default_factory=dict)
    usage: dict[str, TierStats] = field(default_factory=dict)
    lookup_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    """Seconds from a lookup's start to its answer."""
    get_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    """Seconds from a load's start to its answer (views lent, or bytes copied)."""
    put_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    """Seconds from a store call's start to its blocks being published (for a two-phase store,
    from ``prepare_store`` to ``complete_store``: the writer's copy included)."""

    def copy(self) -> StoreStats:
        """A snapshot of these counters (histograms and tier counters copied, ``usage``
        left empty)."""
        snap = StoreStats(
            lookups=self.lookups,
            lookup_blocks=self.lookup_blocks,
            hit_blocks=self.hit_blocks,
            request_hit_fraction_sum=self.request_hit_fraction_sum,
            puts=self.puts,
            put_blocks=self.put_blocks,
            gets=self.gets,
            get_blocks=self.get_blocks,
            get_hit_blocks=self.get_hit_blocks,
            leases_active=self.leases_active,
            leases_expired=self.leases_expired,
            lookup_latency=self.lookup_latency.copy(),
            get_latency=self.get_latency.copy(),
            put_latency=self.put_latency.copy(),
        )
        for name, c in self.tiers.items():
            snap.tiers[name] = TierCounters(**vars(c))
        return snap

    @property
    def hit_rate(self) -> float:
        """Headline hit rate: hit blocks / looked-up blocks (block-weighted ratio of sums)."""
        return self.hit_blocks / self.lookup_blocks if self.lookup_blocks else 0.0

    @property
    def request_hit_rate_mean(self) -> float:
        """Per-request mean hit rate (aiperf's definition), labelled as such wherever shown."""
        return self.request_hit_fraction_sum / self.lookups if self.lookups else 0.0

    def to_json(self) -> dict[str, object]:
        """JSON-ready form (histograms as their summaries)."""
        tiers: dict[str, object] = {}
        for name, t in self.tiers.items():
            row: dict[str, object] = dict(asdict(t))
            row["load_gbps"] = t.load_gbps
            row["save_gbps"] = t.save_gbps
            tiers[name] = row
        return {
            "hit_rate": self.hit_rate,
            "request_hit_rate_mean": self.request_hit_rate_mean,
            "lookups": self.lookups,
            "lookup_blocks": self.lookup_blocks,
            "hit_blocks": self.hit_blocks,
            "puts": self.puts,
            "put_blocks": self.put_blocks,
            "gets": self.gets,
            "get_blocks": self.get_blocks,
            "get_hit_blocks": self.get_hit_blocks,
            "leases_active": self.leases_active,
            "leases_expired": self.leases_expired,
            "lookup_latency_us": self.lookup_latency.summary_us(),
            "get_latency_us": self.get_latency.summary_us(),
            "put_latency_us": self.put_latency.summary_us(),
            "tiers": tiers,
            "usage": {name: asdict(u) for name, u in self.usage.items()},
        }

    @classmethod
    def from_json(cls, doc: object) -> StoreStats:
        """The counters and usage of a :meth:`to_json` document (a store server's STATS reply).

        Latency histograms are not rebuilt (the document holds only their summaries) and the
        derived speeds and hit rates are recomputed from the counters, not read.

        Raises:
            ProtocolError: ``doc`` is not such a document (names what was wrong).
        """
        if not isinstance(doc, dict):
            raise ProtocolError(f"store statistics: expected a JSON object, got {_kind(doc)}")
        out = cls(
            lookups=_int(doc, "lookups"),
            lookup_blocks=_int(doc, "lookup_blocks"),
            hit_blocks=_int(doc, "hit_blocks"),
            request_hit_fraction_sum=_num(doc, "request_hit_rate_mean") * _int(doc, "lookups"),
            puts=_int(doc, "puts"),
            put_blocks=_int(doc, "put_blocks"),
            gets=_int(doc, "gets"),
            get_blocks=_int(doc, "get_blocks"),
            get_hit_blocks=_int(doc, "get_hit_blocks"),
            leases_active=_int(doc, "leases_active"),
            leases_expired=_int(doc, "leases_expired"),
        )
        counter_fields = {f.name: f.type for f in fields(TierCounters)}
        for name, row in _obj(doc, "tiers").items():
            row = _obj({"tier": row}, "tier", f"tiers.{name}")
            values: dict[str, float] = {}
            for key, kind in counter_fields.items():
                if key in row:
                    what = f"tiers.{name}.{key}"
                    values[key] = _num(row, key, what) if kind == "float" else _int(row, key, what)
            out.tiers[str(name)] = TierCounters(**values)  # type: ignore[arg-type]
        for name, row in _obj(doc, "usage").items():
            row = _obj({"usage": row}, "usage", f"usage.{name}")
            total_blocks, total_bytes = row.get("total_blocks"), row.get("total_bytes")
            out.usage[str(name)] = TierStats(
                total_blocks=None if total_blocks is None else _int(row, "total_blocks"),
                used_blocks=_int(row, "used_blocks"),
                peak_blocks=_int(row, "peak_blocks"),
                total_bytes=None if total_bytes is None else _int(row, "total_bytes"),
                used_bytes=_int(row, "used_bytes"),
                extra={
                    str(k): float(v)
                    for k, v in _obj(row, "extra", f"usage.{name}.extra").items()
                    if isinstance(v, int | float)
                },
            )
        return out


def _kind(value: object) -> str:
    return type(value).__name__


def _num(doc: dict[str, object], key: str, what: str = "") -> float:
    value = doc.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(
            f"store statistics: {what or key} is {value!r} ({_kind(value)}), expected a number"
        )
    return float(value)


def _int(doc: dict[str, object], key: str, what: str = "") -> int:
    return int(_num(doc, key, what))


def _obj(doc: dict[str, object], key: str, what: str = "") -> dict[str, object]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ProtocolError(
            f"store statistics: {what or key} is {_kind(value)}, expected a JSON object"
        )
    return value
