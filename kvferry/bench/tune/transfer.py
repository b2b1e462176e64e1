"""``kvferry tune transfer``: the transfer engine's knobs for the caller's workload, searched
by same-run comparisons on this machine.

Owns :class:`TransferTuneOptions`, :data:`SPACE` (the knobs and the values tried, each with
why), :func:`measure_change` (one change against a base config in alternating rounds: the
transfer bench's contenders ``kvferry+CHANGE`` and ``kvferry+BASE``) and :func:`tune` (the
coordinate search of :mod:`kvferry.bench.tune.search` over :data:`SPACE`, then one final
interleaved run of the tuned config against the defaults for the before/after table).

The workload is one case (``block_size`` x ``batch_size`` x ``threads`` over ``transport``),
the one the caller moves; the objective is its bandwidth (``throughput``) or its P99 per-batch
time (``latency``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kvferry.bench.result import Ratio
from kvferry.bench.transfer import TransferBenchOptions
from kvferry.bench.transfer import run as run_transfer
from kvferry.bench.transfer.report import BW, P99, TransferBenchReport
from kvferry.bench.tune.search import MIN_GAIN, SearchResult, Step, coordinate_search, helped
from kvferry.config.loader import load_config
from kvferry.errors import ConfigError, KvferryError

__all__ = [
    "OBJECTIVES",
    "SPACE",
    "TransferTuneOptions",
    "TransferTuneResult",
    "measure_change",
    "tune",
]

OBJECTIVES = ("throughput", "latency")

SPACE: dict[str, tuple[str, ...]] = {
    # bigger slices: fewer frames and syscalls per byte; smaller: a large block's slices
    # pipeline across the connection instead of waiting for one another
    "transfer.slice_size": ("16KiB", "256KiB", "1MiB"),
    # more connections per peer: parallel streams; on a small machine they contend instead
    "transfer.workers": ("2",),
    # slices in flight per connection: a shallower pipe queues a batch less behind itself
    "transfer.max_inflight": ("32",),
    # busy-poll before sleeping: longer avoids a wake-up per reply, shorter frees the core
    "transfer.grace_period_ns": ("10000", "200000"),
    # one READV frame for a run of small blocks, or one frame each
    "transfer.vectored_io": ("false",),
}
"""The knobs ``kvferry tune transfer`` searches, each with the values it tries (the default is
the start, so it is never listed)."""


@dataclass(frozen=True)
class TransferTuneOptions:
    """One tuning run. Validated on construction (ConfigError names the flag)."""

    block_size: int = 1 << 20
    batch_size: int = 16
    threads: int = 1
    transport: str = "tcp"
    op: str = "read"
    objective: str = "throughput"
    budget_s: float = 120.0
    rounds: int = 3
    duration: float = 1.0
    """Seconds per round of each contender."""
    space: Mapping[str, Sequence[str]] = field(default_factory=lambda: dict(SPACE))

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"--objective {self.objective!r} is invalid for transfer: must be one of "
                + ", ".join(OBJECTIVES)
            )
        for flag, value in (
            ("--block-size", self.block_size),
            ("--batch-size", self.batch_size),
            ("--threads", self.threads),
            ("--rounds", self.rounds),
        ):
            if value < 1:
                raise ConfigError(f"{flag} {value} is invalid: must be at least 1")
        if not self.duration > 0:
            raise ConfigError(f"--duration {self.duration:g} is invalid: must be above 0")
        if not self.budget_s > 0:
            raise ConfigError(f"--budget {self.budget_s:g} is invalid: must be above 0 seconds")
        for key in self.space:
            if not key.startswith("transfer."):
                raise ConfigError(f"{key!r} is not a transfer key (transfer.NAME)")
            for text in self.space[key]:
                load_config(flags={key: text}, environ={})  # a value the key rejects: here

    @property
    def higher_better(self) -> bool:
        return self.objective == "throughput"

    @property
    def case(self) -> str:
        return f"{self.block_size}x{self.batch_size}x{self.threads}"


@dataclass
class TransferTuneResult:
    options: TransferTuneOptions
    search: SearchResult
    final: TransferBenchReport | None = None
    """The tuned config against the defaults, interleaved (None when nothing was adopted)."""
    final_ratio: Ratio | None = None

    @property
    def final_rounds(self) -> list[float]:
        r = self.final_ratio
        return [] if r is None else (list(r.rounds) or [r.value])

    @property
    def confirmed(self) -> bool:
        """The search's pick beat the defaults in the final interleaved run too (every round,
        by the margin): steps adopted one at a time can each win by a hair and together not."""
        return helped(self.final_rounds, self.options.higher_better)

    @property
    def tuned(self) -> dict[str, str]:
        """The recommendation: the search's pick when the final run confirmed it, else none
        (keep the defaults)."""
        return dict(self.search.best) if self.confirmed else {}


def _label(overrides: Mapping[str, str]) -> str:
    return "kvferry" + "".join(f"+{k}={v}" for k, v in sorted(overrides.items()))


def _bench(
    options: TransferTuneOptions, contenders: Sequence[str], rounds: int
) -> TransferBenchReport:
    bench = TransferBenchOptions(
        backend=",".join(contenders),
        transport=options.transport,
        op=options.op,
        start_block_size=options.block_size,
        max_block_size=options.block_size,
        start_batch_size=options.batch_size,
        max_batch_size=options.batch_size,
        max_threads=options.threads,
        total_buffer_size=max(
            64 << 20, 2 * options.block_size * options.batch_size * options.threads
        ),
        duration=options.duration,
        warmup=min(0.3, options.duration),
        rounds=rounds,
    )
    return run_transfer(bench)


def _ratio(report: TransferBenchReport, options: TransferTuneOptions, subject: str) -> Ratio:
    metric = BW if options.higher_better else P99
    found = [
        r
        for r in report.ratios
        if r.metric == metric and r.case == options.case and r.subject == subject
    ]
    if not found:
        raise KvferryError(f"the transfer bench measured no {metric} ratio of {subject}")
    return found[-1]


def measure_change(
    options: TransferTuneOptions, base: Mapping[str, str], change: Mapping[str, str]
) -> list[float]:
    """Per-round ratios of ``change`` over ``base`` (both overrides of the defaults) on the
    options' case: BW for ``throughput``, P99 per-batch time for ``latency``."""
    subject = _label(change)
    report = _bench(options, [subject, _label(base)], options.rounds)
    ratio = _ratio(report, options, subject)
    return list(ratio.rounds) or [ratio.value]


def tune(
    options: TransferTuneOptions,
    on_step: Callable[[Step, int, int], None] | None = None,
    measure: Callable[[Mapping[str, str], Mapping[str, str]], list[float]] | None = None,
) -> TransferTuneResult:
    """Search :data:`SPACE` (or ``options.space``) and measure the winner against the defaults
    once more, interleaved, for the before/after table."""
    search = coordinate_search(
        options.space,
        measure or (lambda base, change: measure_change(options, base, change)),
        higher_better=options.higher_better,
        budget_s=options.budget_s,
        min_gain=MIN_GAIN,
        on_step=on_step,
    )
    result = TransferTuneResult(options=options, search=search)
    if search.best and measure is None:
        tuned = _label(search.best)
        result.final = _bench(options, [tuned, "kvferry"], max(options.rounds, 3))
        result.final_ratio = _ratio(result.final, options, tuned)
    return result
