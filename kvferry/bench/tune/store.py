"""``kvferry tune store``: the store's knobs for one store-bench workload, searched by
alternating runs of the store bench on this machine.

Owns :class:`StoreTuneOptions`, :data:`SPACES` (per backend: the knobs and the values tried,
each with why), :func:`measure_change` and :func:`tune` (the coordinate search of
:mod:`kvferry.bench.tune.search`, then a final alternating run of the tuned config against the
defaults).

One measurement is ``rounds`` pairs of store-bench runs (fill, then the timed phase), one with
the change and one without, the order swapped every pair so neither side always runs on a warm
machine; the ratio of a pair is the timed phase's ops/s (``throughput``) or its P99 per call
(``latency``), change over base. ``bench.overfill`` makes it a churn workload (more keys than
fit, the store evicting as it runs) and adds :data:`EVICTION_SPACE` to the search. A store
bench run starts its own backend (a server, for ``server``), so every run starts from the same
empty state. Verify is off while tuning (the final run keeps it on: a tuned config that loses
bytes fails there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kvferry.bench.store import StoreBenchOptions, StoreBenchReport
from kvferry.bench.store import run as run_store
from kvferry.bench.store.options import PERF_PHASE
from kvferry.bench.tune.search import MIN_GAIN, SearchResult, Step, coordinate_search, helped
from kvferry.config.loader import load_config
from kvferry.errors import ConfigError, KvferryError

__all__ = [
    "EVICTION_SPACE",
    "OBJECTIVES",
    "SPACES",
    "StoreTuneOptions",
    "StoreTuneResult",
    "alternate",
    "measure_change",
    "timed",
    "tune",
]

OBJECTIVES = ("throughput", "latency")

SPACES: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {
        # a checksum per block costs a hash of every byte put and got; auto guards only slots a
        # stalled writer may still touch, off guards none (trust every same-host writer)
        "cpu.checksum": ("off",),
        # huge pages: fewer TLB misses over a large pool
        "cpu.use_hugepages": ("true",),
    },
    "disk": {
        # threads doing the disk I/O: parallel requests keep an NVMe queue busy
        "disk.io_threads": ("1", "8", "16"),
        # the page cache instead of O_DIRECT: faster while the data fits in RAM, unbounded
        # memory and no durability ordering otherwise
        "disk.direct_io": ("false",),
        # slot files the capacity is spread over: fewer writers per inode lock
        "disk.files": ("4",),
    },
    "server": {
        # the server's cpu tier: as for cpu
        "cpu.checksum": ("off",),
        # blocks fetched from the next tier ahead of a lookup's reader
        "store.prefetch_depth": ("0", "8"),
    },
}
"""Per backend, the knobs ``kvferry tune store`` searches and the values it tries (the default
is the start, so it is never listed)."""

EVICTION_SPACE: dict[str, tuple[str, ...]] = {
    # when an eviction round starts: earlier keeps room free for a burst of puts, later keeps
    # more blocks cached
    "store.evict_start_threshold": ("0.7", "0.95"),
    # how much one round frees: more per round means fewer rounds on a churning store
    "store.evict_ratio": ("0", "0.2"),
}
"""Searched too on a churn workload (``bench.overfill``: more keys than the capacity holds),
where the store evicts while it is measured."""


@dataclass(frozen=True)
class StoreTuneOptions:
    """One tuning run: the store bench's workload and the search. Validated on construction."""

    bench: StoreBenchOptions = field(default_factory=StoreBenchOptions)
    capacity: int = 256 << 20
    """cpu.capacity (cpu, server) or disk.capacity (disk), for every run."""
    objective: str = "throughput"
    budget_s: float = 120.0
    rounds: int = 3
    space: Mapping[str, Sequence[str]] | None = None
    """None: :data:`SPACES` of the bench's backend."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"--objective {self.objective!r} is invalid for store: must be one of "
                + ", ".join(OBJECTIVES)
            )
        if self.rounds < 1:
            raise ConfigError(f"--rounds {self.rounds} is invalid: must be at least 1")
        if not self.budget_s > 0:
            raise ConfigError(f"--budget {self.budget_s:g} is invalid: must be above 0 seconds")
        if self.space is None and self.bench.backend not in SPACES:
            raise ConfigError(
                f"no built-in knobs for backend {self.bench.backend!r} (have: "
                + ", ".join(SPACES)
                + "): give them with --knob KEY=V1,V2"
            )
        for key, values in self.knobs.items():
            for value in values:
                load_config(flags={key: value}, environ={})  # a value the key rejects: here

    @property
    def knobs(self) -> Mapping[str, Sequence[str]]:
        if self.space is not None:
            return self.space
        extra = EVICTION_SPACE if self.bench.overfill else {}
        return {**SPACES[self.bench.backend], **extra}

    @property
    def higher_better(self) -> bool:
        return self.objective == "throughput"

    def flags(self, overrides: Mapping[str, str]) -> dict[str, object]:
        where = "disk.capacity" if self.bench.backend == "disk" else "cpu.capacity"
        return {where: self.capacity, **overrides}


@dataclass
class StoreTuneResult:
    options: StoreTuneOptions
    search: SearchResult
    final_rounds: list[float] = field(default_factory=list)
    """Tuned over defaults, per alternating pair of the final run (empty: nothing adopted)."""
    final: list[StoreBenchReport] = field(default_factory=list)

    @property
    def confirmed(self) -> bool:
        """The search's pick beat the defaults in the final alternating run too."""
        return helped(self.final_rounds, self.options.higher_better)

    @property
    def tuned(self) -> dict[str, str]:
        """The recommendation: the search's pick when the final run confirmed it, else none."""
        return dict(self.search.best) if self.confirmed else {}

    @property
    def caveats(self) -> list[str]:
        """What the measurement cannot show about a tuned value (printed beside it)."""
        out = []
        if self.tuned.get("disk.direct_io") == "false":
            working = self.options.bench.num_keys * self.options.bench.value_size
            out.append(
                f"disk.direct_io=false reads through the page cache: this workload's "
                f"{working / 2**20:,.0f} MiB fit in RAM, so its gets were memory copies; a disk "
                "tier larger than the free RAM does not keep this gain, and the page cache it "
                "fills is not bounded by any kvferry capacity"
            )
        threshold = self.tuned.get("store.evict_start_threshold")
        if threshold is not None and float(threshold) < 0.9:
            out.append(
                f"store.evict_start_threshold={threshold} starts evicting with "
                f"{1 - float(threshold):.0%} of the tier still free: puts find room sooner, and "
                "that share of the tier no longer holds cached blocks (measure the hit-rate cost "
                "with kvferry bench hitrate or kvferry tune cache)"
            )
        return out


def timed(report: StoreBenchReport, higher_better: bool = True) -> float:
    """The timed phase's ops/s (``higher_better``) or its P99 per call in microseconds."""
    perf = PERF_PHASE[report.options.op]
    phase = [p for p in report.phases if p.phase == perf]
    if not phase:
        raise KvferryError("the store bench reported no timed phase")
    return phase[0].ops_per_s if higher_better else phase[0].latency_us.p99


def alternate(
    bench: StoreBenchOptions,
    base: Mapping[str, object],
    change: Mapping[str, object],
    rounds: int,
    tell: Callable[[str], None] | None = None,
) -> list[tuple[StoreBenchReport, StoreBenchReport]]:
    """``rounds`` pairs of store-bench runs, (base, change) per pair, from the config keys
    ``base`` and ``change`` (dotted key -> value); the order swaps every pair so neither side
    always runs second on a warm machine. A run that fails its verify raises."""
    pairs = []
    for r in range(rounds):
        got: dict[str, StoreBenchReport] = {}
        sides = (("base", base), ("change", change))
        for name, flags in sides if r % 2 == 0 else sides[::-1]:
            if tell is not None:
                tell(f"round {r + 1}/{rounds}, {name}")
            loaded = load_config(flags=flags, environ={})
            report = run_store(bench, config=loaded.config, sources=loaded.sources)
            report.raise_for_failures()
            got[name] = report
        pairs.append((got["base"], got["change"]))
    return pairs


def _pairs(
    options: StoreTuneOptions,
    base: Mapping[str, str],
    change: Mapping[str, str],
    rounds: int,
    bench: StoreBenchOptions,
) -> tuple[list[float], list[StoreBenchReport]]:
    ratios, reports = [], []
    for b, c in alternate(bench, options.flags(base), options.flags(change), rounds):
        before = timed(b, options.higher_better)
        if before <= 0:
            raise KvferryError("the store bench measured nothing in its timed phase")
        ratios.append(timed(c, options.higher_better) / before)
        reports += [b, c]
    return ratios, reports


def measure_change(
    options: StoreTuneOptions, base: Mapping[str, str], change: Mapping[str, str]
) -> list[float]:
    """Per-pair ratios of ``change`` over ``base`` (module docstring)."""
    bench = dataclasses.replace(options.bench, verify=False)
    return _pairs(options, base, change, options.rounds, bench)[0]


def tune(
    options: StoreTuneOptions,
    on_step: Callable[[Step, int, int], None] | None = None,
    measure: Callable[[Mapping[str, str], Mapping[str, str]], list[float]] | None = None,
) -> StoreTuneResult:
    """Search the backend's knobs, then run tuned against defaults once more (verify on)."""
    search = coordinate_search(
        options.knobs,
        measure or (lambda base, change: measure_change(options, base, change)),
        higher_better=options.higher_better,
        budget_s=options.budget_s,
        min_gain=MIN_GAIN,
        on_step=on_step,
    )
    result = StoreTuneResult(options=options, search=search)
    if search.best and measure is None:
        bench = dataclasses.replace(options.bench, verify=True)
        result.final_rounds, result.final = _pairs(
            options, {}, search.best, max(options.rounds, 3), bench
        )
    return result
