"""``kvferry tune cache``: the cache's capacity and eviction policy for a trace, from the
hit-rate lab's exact simulations.

Owns :class:`CacheTuneOptions`, :class:`CacheChoice` and :func:`tune`. Two questions:

- ``target_hit_rate``: for each policy, the smallest capacity reaching the target (the lab's
  capacity advice, a binary search over simulations); the answer is the policy needing the
  least memory.
- ``memory_budget`` (bytes): the capacity the budget holds (``budget // block bytes``); each
  policy simulated there; the answer is the policy with the highest block hit rate.

Each choice is priced when ``prefill_tokens_per_s`` is given: the prefill seconds the hits save
over the trace (hit tokens / prefill tokens per second), and those seconds per GB of cache.
Simulations are exact (the same counts every run), so one simulation per question decides and
no noise band is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvferry.bench.hitrate import HitRateOptions
from kvferry.bench.hitrate import run as run_hitrate
from kvferry.bench.hitrate.report import HitRateReport
from kvferry.errors import ConfigError

__all__ = ["POLICIES", "CacheChoice", "CacheTuneOptions", "CacheTuneResult", "tune"]

POLICIES = ("lru", "lfu", "fifo", "length-aware")


@dataclass(frozen=True)
class CacheTuneOptions:
    """One cache tuning question. Validated on construction (ConfigError names the flag)."""

    trace: str | None = None
    workload: str | None = None
    model_kv: str | None = None
    """``layers,kv_heads,head_dim,dtype``: the bytes of a block (needed for a memory budget)."""
    kv_bytes_per_token: int | None = None
    target_hit_rate: float | None = None
    memory_budget: int | None = None
    prefill_tokens_per_s: float | None = None
    policies: Sequence[str] = POLICIES

    def __post_init__(self) -> None:
        if (self.trace is None) == (self.workload is None):
            raise ConfigError("give one of --trace FILE or --workload SPEC")
        if (self.target_hit_rate is None) == (self.memory_budget is None):
            raise ConfigError("give one of --target-hit-rate X or --memory-budget SIZE")
        if self.memory_budget is not None and not (self.model_kv or self.kv_bytes_per_token):
            raise ConfigError(
                "--memory-budget needs the bytes of a block: --model-kv LAYERS,KV_HEADS,"
                "HEAD_DIM,DTYPE or --kv-bytes-per-token N"
            )
        if self.memory_budget is not None and self.memory_budget < 1:
            raise ConfigError(f"--memory-budget {self.memory_budget} is invalid: must be > 0")
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise ConfigError(
                f"--policy {','.join(self.policies)!r} is invalid: use " + ", ".join(POLICIES)
            )

    def hitrate(self, **more: Any) -> HitRateOptions:
        """The hit-rate lab's options for this question, ``more`` on top."""
        given: dict[str, Any] = {
            "trace": self.trace,
            "workload": self.workload,
            "model_kv": self.model_kv,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "policies": list(self.policies),
        }
        return HitRateOptions(**{**given, **more})


@dataclass
class CacheChoice:
    """One policy's answer."""

    policy: str
    capacity_blocks: int | None
    """None: no capacity reaches the target."""
    block_hit_rate: float
    capacity_bytes: int | None = None
    prefill_seconds_saved: float | None = None
    seconds_saved_per_gb: float | None = None
    simulations: int = 1


@dataclass
class CacheTuneResult:
    options: CacheTuneOptions
    choices: list[CacheChoice] = field(default_factory=list)
    best: CacheChoice | None = None
    """None: no policy reaches the target."""
    block_bytes: int | None = None
    report: HitRateReport | None = None


def _price(choice: CacheChoice, report: HitRateReport, hit_tokens: int | None) -> None:
    block = _block_bytes(report)
    if block and choice.capacity_blocks is not None:
        choice.capacity_bytes = choice.capacity_blocks * block
    tps = report.prefill_tokens_per_s
    if tps and hit_tokens is not None:
        choice.prefill_seconds_saved = hit_tokens / tps
        if choice.capacity_bytes:
            choice.seconds_saved_per_gb = choice.prefill_seconds_saved / (
                choice.capacity_bytes / 1e9
            )


def _block_bytes(report: HitRateReport) -> int | None:
    per_token = report.kv_bytes_per_token
    return per_token * report.block_tokens if per_token else None


def tune(options: CacheTuneOptions) -> CacheTuneResult:
    """Answer the options' question for every policy and pick the best (module docstring)."""
    result = CacheTuneResult(options=options)
    if options.target_hit_rate is not None:
        report = run_hitrate(options.hitrate(target_hit_rate=options.target_hit_rate))
        for advice in report.advice:
            capacity = advice.tiers[-1].capacity_blocks if advice.reachable else None
            choice = CacheChoice(
                advice.policy, capacity, advice.block_hit_rate, simulations=advice.runs
            )
            hit_tokens = None
            if capacity is not None and report.prefill_tokens_per_s:
                # the hit tokens at the answer: one more simulation, exact
                at = run_hitrate(options.hitrate(capacities=[capacity], policies=[advice.policy]))
                hit_tokens = at.cases[0].tally.hit_tokens if at.cases else None
            _price(choice, report, hit_tokens)
            result.choices.append(choice)
        reachable = [c for c in result.choices if c.capacity_blocks is not None]
        result.best = min(reachable, key=lambda c: c.capacity_blocks or 0) if reachable else None
    else:
        probe = run_hitrate(options.hitrate(capacities=[1], policies=[options.policies[0]]))
        block = _block_bytes(probe)
        assert block and options.memory_budget is not None  # validated: model_kv given
        capacity = options.memory_budget // block
        if capacity < 1:
            raise ConfigError(
                f"--memory-budget {options.memory_budget} bytes holds no block of {block} bytes"
            )
        report = run_hitrate(options.hitrate(capacities=[capacity]))
        for case in report.cases:
            choice = CacheChoice(case.policy, capacity, case.block_hit_rate)
            _price(choice, report, case.tally.hit_tokens)
            result.choices.append(choice)
        result.best = max(result.choices, key=lambda c: c.block_hit_rate, default=None)
    result.report = report
    result.block_bytes = _block_bytes(report)
    return result
