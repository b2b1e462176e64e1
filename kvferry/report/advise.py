"""``kvferry advise``: the report's rules as advice, and each suggested change measured on this
machine before it is recommended.

Owns turning findings (:mod:`kvferry.report.findings`, where the rules live and where
``kvferry report`` shows them too) into :class:`Advice`, and :func:`verify`: measuring one
:class:`~kvferry.report.model.Candidate` against the config the result ran with, in the same
run, and keeping it only when it helped beyond noise:

- ``transfer``: the bench's two contenders ``kvferry+KEY=VALUE`` and ``kvferry`` on the case the
  finding names, ``rounds`` alternating rounds (the order rotates each round). ``bw``: kept when
  every round's BW ratio (change / current) is above 1 and the median at least ``1 +
  MIN_GAIN``; ``p99``: the same, below 1 and at most ``1 / (1 + MIN_GAIN)`` (the tuner's rule,
  :func:`kvferry.bench.tune.search.helped`). Every round must
  agree, so a lucky minute cannot make a winner.
- ``store``: the result's own store bench (its options, its effective config's non-default
  keys), once with the change and once without, alternating for ``rounds`` pairs. ``no_space``:
  kept when every pair's refused puts fall and the median ops/s of the timed phase does not
  fall beyond :data:`~kvferry.report.compare.DEFAULT_BAND`; ``ops``: the timed phase's ops/s,
  decided as for transfer.
- ``hitrate``: one simulation with the change and one without on the same trace and capacity.
  A simulation is exact (the same count every run), so one run each decides: kept when the
  block hit rate rises.

A candidate that cannot be measured here (its result's target is gone, a trace file moved) is
``not measured`` with the reason, never kept. Nothing is recommended that was not measured.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvferry.bench.result import BenchResult
from kvferry.bench.tune.search import MIN_GAIN, helped
from kvferry.errors import ConfigError, KvferryError
from kvferry.report.compare import DEFAULT_BAND
from kvferry.report.findings import findings
from kvferry.report.inputs import LoadedResult
from kvferry.report.model import Candidate, Finding

__all__ = [
    "DROPPED",
    "KEPT",
    "NOT_MEASURED",
    "Advice",
    "Measured",
    "advise",
    "decide",
    "verify",
]

KEPT = "kept"
DROPPED = "dropped"
NOT_MEASURED = "not measured"

Progress = Callable[[str], None]


@dataclass
class Measured:
    """One candidate measured: the verdict, the ratio (change / current) and its rounds."""

    candidate: Candidate
    verdict: str
    """:data:`KEPT`, :data:`DROPPED` or :data:`NOT_MEASURED`."""
    ratio: float | None = None
    rounds: list[float] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0


@dataclass
class Advice:
    """A finding of a rule, and (after ``--verify``) what measuring its candidates showed."""

    finding: Finding
    source: str
    """The result file it follows from."""
    measured: list[Measured] = field(default_factory=list)

    @property
    def kept(self) -> list[Measured]:
        return [m for m in self.measured if m.verdict == KEPT]

    def to_json(self) -> dict[str, Any]:
        f = self.finding
        return {
            "rule": f.rule,
            "severity": f.severity,
            "title": f.title,
            "detail": f.detail,
            "evidence": f.evidence,
            "recommendation": f.recommendation,
            "source": self.source,
            "candidates": [
                {
                    "overrides": dict(c.overrides),
                    "bench": c.bench,
                    "objective": c.objective,
                    "command": c.command,
                }
                for c in f.candidates
            ],
            "measured": [
                {
                    "overrides": dict(m.candidate.overrides),
                    "verdict": m.verdict,
                    "ratio": m.ratio,
                    "rounds": m.rounds,
                    "reason": m.reason,
                    "seconds": round(m.seconds, 2),
                }
                for m in self.measured
            ],
        }


def advise(items: Sequence[LoadedResult]) -> list[Advice]:
    """Every rule's finding over ``items`` as advice (worst first), nothing measured yet.
    Rules across results (a doctor's wake-up against a transfer run) see all of ``items``."""
    return [Advice(finding=f, source=f.source) for f in findings(items)]


def verify(
    candidate: Candidate,
    result: BenchResult,
    *,
    rounds: int = 3,
    duration: float = 1.0,
    progress: Progress | None = None,
) -> Measured:
    """Measure ``candidate`` against the config ``result`` ran with (module docstring)."""
    if rounds < 1:
        raise ConfigError(f"--rounds {rounds} is invalid: must be at least 1")
    if not duration > 0:
        raise ConfigError(f"--duration {duration} is invalid: must be above 0 seconds")
    started = time.monotonic()
    try:
        measure = _MEASURES[candidate.bench]
    except KeyError:
        return Measured(candidate, NOT_MEASURED, reason=f"no way to measure {candidate.bench}")
    try:
        out = measure(candidate, result, rounds, duration, progress or (lambda _: None))
    except KvferryError as e:
        out = Measured(candidate, NOT_MEASURED, reason=str(e))
    out.seconds = time.monotonic() - started
    return out


def _base_flags(result: BenchResult) -> dict[str, object]:
    """The keys the result's run set away from their defaults (its flags, file, bench)."""
    if result.config is None:
        return {}
    return {
        key: value
        for key, value in result.config.values.items()
        if result.config.sources.get(key, "default") != "default" and value is not None
    }


def decide(candidate: Candidate, ratios: list[float], higher_better: bool) -> Measured:
    """The verdict on same-run ratios (change / current), one per round (module docstring)."""
    median = statistics.median(ratios)
    won = helped(ratios, higher_better, MIN_GAIN)  # the tuner's rule, so both agree
    worse = median < 1.0 if higher_better else median > 1.0
    what = "higher" if higher_better else "lower"
    if won:
        reason = f"every round {what} with the change (median {median:.3f})"
    elif worse:
        reason = f"worse with the change (median {median:.3f})"
    else:
        reason = (
            f"not beyond noise: median {median:.3f}, rounds {min(ratios):.3f}-{max(ratios):.3f} "
            f"(needs every round {what} and the median {what} by {MIN_GAIN:.0%})"
        )
    return Measured(candidate, KEPT if won else DROPPED, median, ratios, reason)


def _transfer(
    candidate: Candidate, result: BenchResult, rounds: int, duration: float, tell: Progress
) -> Measured:
    from kvferry.bench.transfer import TransferBenchOptions
    from kvferry.bench.transfer import run as run_transfer
    from kvferry.bench.transfer.report import BW, P99
    from kvferry.config.loader import load_config

    p: dict[str, Any] = dict(candidate.params)
    block, batch, threads = int(p["block_size"]), int(p["batch_size"]), int(p["threads"])
    change = "kvferry+" + "+".join(f"{k}={v}" for k, v in candidate.overrides)
    options = TransferBenchOptions(
        backend=f"{change},kvferry",
        transport=str(p["transport"]),
        op=str(p["op"]),
        seg_type=str(p["seg_type"]),
        start_block_size=block,
        max_block_size=block,
        start_batch_size=batch,
        max_batch_size=batch,
        max_threads=threads,
        total_buffer_size=max(64 << 20, 2 * block * batch * threads),
        duration=duration,
        warmup=min(0.3, duration),
        rounds=rounds,
    )
    base = {k: v for k, v in _base_flags(result).items() if k.startswith("transfer.")}
    loaded = load_config(flags=base, environ={})
    tell(f"transfer {candidate.label}: {rounds} rounds of {duration:g} s")
    report = run_transfer(options, config=loaded.config, sources=loaded.sources)
    metric = BW if candidate.objective == "bw" else P99
    case = f"{block}x{batch}x{threads}"
    found = [
        r for r in report.ratios if r.metric == metric and r.case == case and r.subject == change
    ]
    if not found:
        raise KvferryError(f"the transfer bench measured no {metric} ratio for {change}")
    ratio = found[-1]
    return decide(candidate, ratio.rounds or [ratio.value], candidate.objective == "bw")


def _store(
    candidate: Candidate, result: BenchResult, rounds: int, duration: float, tell: Progress
) -> Measured:
    import dataclasses

    from kvferry.bench.store import StoreBenchReport
    from kvferry.bench.tune.store import alternate, timed

    if not isinstance(result, StoreBenchReport):
        raise KvferryError("a store candidate needs a store bench result")
    options = dataclasses.replace(
        result.options, duration=duration, warmup=min(0.3, duration), verify=False
    )
    base = _base_flags(result)
    changed = {**base, **dict(candidate.overrides)}
    pairs = alternate(
        options, base, changed, rounds, lambda what: tell(f"store {candidate.label}: {what}")
    )
    refused = [(int(c.store.get("no_space", 0)), int(b.store.get("no_space", 0))) for b, c in pairs]
    speed = [timed(c) / timed(b) for b, c in pairs if timed(b) > 0]
    if candidate.objective == "ops":
        if not speed:
            raise KvferryError("the store bench measured no ops/s in its timed phase")
        return decide(candidate, speed, higher_better=True)
    fewer = all(c < b for c, b in refused)
    ops_ratio = statistics.median(speed) if speed else 1.0
    detail = "; ".join(f"{b:,} -> {c:,}" for c, b in refused)
    ratios = [c / b if b else float(c > 0) for c, b in refused]
    if fewer and ops_ratio >= 1.0 - DEFAULT_BAND:
        return Measured(
            candidate,
            KEPT,
            statistics.median(ratios),
            ratios,
            f"refused puts fell in every round ({detail}); ops/s x{ops_ratio:.3f}",
        )
    why = (
        f"refused puts did not fall in every round ({detail})"
        if not fewer
        else f"ops/s fell x{ops_ratio:.3f}, beyond the {DEFAULT_BAND:.0%} band"
    )
    return Measured(candidate, DROPPED, statistics.median(ratios), ratios, why)


def _hitrate(
    candidate: Candidate, result: BenchResult, rounds: int, duration: float, tell: Progress
) -> Measured:
    from kvferry.bench.hitrate import HitRateOptions
    from kvferry.bench.hitrate import run as run_hitrate

    p: dict[str, Any] = dict(candidate.params)
    policy = dict(candidate.overrides)["store.eviction_policy"]
    current = str(p["current"])
    capacity = int(p["capacity"])
    tell(f"hitrate {candidate.label}: {policy} and {current} at {capacity:,} blocks")
    options = HitRateOptions(
        trace=p.get("trace"),
        workload=p.get("workload"),
        block_tokens=int(p["block_tokens"]),
        policies=[policy, current],
        capacities=[capacity],
    )
    report = run_hitrate(options)
    rate = {c.policy: c.block_hit_rate for c in report.cases}
    if current not in rate or policy not in rate or rate[current] <= 0:
        raise KvferryError(f"the simulation gave no hit rate for {policy} and {current}")
    ratio = rate[policy] / rate[current]
    verdict = KEPT if rate[policy] > rate[current] else DROPPED
    return Measured(
        candidate,
        verdict,
        ratio,
        [ratio],
        f"block hit rate {rate[policy]:.4f} with {policy} against {rate[current]:.4f} with "
        f"{current} (exact: one simulation each)",
    )


_MEASURES: dict[str, Callable[[Candidate, BenchResult, int, float, Progress], Measured]] = {
    "transfer": _transfer,
    "store": _store,
    "hitrate": _hitrate,
}
