"""Capacity advice: the smallest capacity of a pipeline's last tier that reaches a target hit
rate, by binary search over simulations.

Owns :class:`Advice` and :func:`advise`. LRU's hit rate never falls as capacity grows (the stack
property), so its answer is exact; for other policies it is where the search landed, and the
advice's ``note`` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvferry.backends.base import Key
from kvferry.bench.hitrate.lru_stack import LruStack
from kvferry.bench.hitrate.simulation import _check_engine, simulate, stack_refusal, trace_keys
from kvferry.bench.hitrate.spec import HitRateError, TierSpec
from kvferry.bench.traces import Trace
from kvferry.config.models import KvferryConfig

__all__ = ["Advice", "advise"]


@dataclass
class Advice:
    """The smallest capacity of the searched tier that reaches a target hit rate."""

    policy: str
    target: float
    reachable: bool
    tiers: list[TierSpec]
    """The pipeline with the searched (last) tier at the answer (or at the trace's distinct
    blocks when unreachable)."""
    block_hit_rate: float
    runs: int
    note: str = ""


def advise(
    trace: Trace,
    tiers: Sequence[TierSpec],
    target: float,
    *,
    policy: str = "lru",
    config: KvferryConfig | None = None,
    keys: list[list[Key]] | None = None,
    engine: str = "auto",
) -> Advice:
    """Binary-search the last tier's capacity for the smallest that reaches ``target``
    (block-weighted), the others fixed. An infinite cache bounds the answer: at the trace's
    distinct block count nothing is ever evicted.

    LRU's hit rate never falls as capacity grows (the stack property), so its answer is exact;
    for other policies it is where the search landed, and ``note`` says so.
    """
    if not 0 < target <= 1:
        raise HitRateError(f"target hit rate must be in (0, 1], got {target}")
    keys = trace_keys(trace) if keys is None else keys
    distinct = len({k for ks in keys for k in ks})
    fixed = list(tiers[:-1])
    name = tiers[-1].name if tiers else "cpu"
    _check_engine(engine)
    shape = [*fixed, TierSpec(name, None)]
    # one LRU pass serves every probe it is exact for (simulate falls back per probe)
    stack = None
    if engine in ("auto", "stack") and stack_refusal(shape, policy, config) is None:
        stack = LruStack(trace)

    def run(cap: int) -> float:
        return simulate(
            trace,
            [*fixed, TierSpec(name, cap)],
            policy=policy,
            config=config,
            keys=keys,
            engine=engine,
            stack=stack,
        ).block_hit_rate

    runs = 1
    top = max(1, distinct)
    best = run(top)
    note = "" if policy == "lru" else f"{policy} may not be monotone in capacity; searched anyway"
    if best < target:
        return Advice(policy, target, False, [*fixed, TierSpec(name, top)], best, runs, note)
    lo, hi = 1, top  # hi reaches the target
    while lo < hi:
        mid = (lo + hi) // 2
        rate = run(mid)
        runs += 1
        if rate >= target:
            hi, best = mid, rate
        else:
            lo = mid + 1
    return Advice(policy, target, True, [*fixed, TierSpec(name, hi)], best, runs, note)
