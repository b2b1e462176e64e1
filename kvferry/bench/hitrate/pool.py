"""A sweep: many simulations of one trace, in forked worker processes.

Owns :func:`sweep` and its process pool. The cases LRU's one-pass shortcut counts exactly share
one :class:`~kvferry.bench.hitrate.lru_stack.LruStack` pass in this process; every other case is
independent, so with ``jobs`` > 1 they run in forked workers that inherit the trace and its keys
copy-on-write (never pickled). It must not change what a run counts: a forked sweep equals the
runs one by one (a test holds it).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from kvferry.backends.base import Key
from kvferry.bench.hitrate import direct
from kvferry.bench.hitrate.lru_stack import LruStack
from kvferry.bench.hitrate.simulation import (
    HitRateResult,
    SimCase,
    _check_engine,
    _not_exact,
    simulate,
    stack_refusal,
    stack_result,
    trace_keys,
)
from kvferry.bench.hitrate.spec import HitRateError
from kvferry.bench.traces import Trace
from kvferry.config.models import KvferryConfig

__all__ = ["SweepProgressFn", "default_jobs", "sweep"]

SweepProgressFn = Callable[[int, int, int], None]
"""``(case index, requests done, requests in all)``."""

# What a forked sweep worker runs on: set in the parent just before the pool forks, inherited
# copy-on-write (the trace and its keys are never pickled).
_FORK_STATE: dict[str, Any] = {}
_FORK_LOCK = threading.Lock()


def default_jobs() -> int:
    """Worker processes a sweep uses by default: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def sweep(
    trace: Trace,
    cases: Sequence[SimCase],
    *,
    config: KvferryConfig | None = None,
    keys: list[list[Key]] | None = None,
    jobs: int = 1,
    on_progress: SweepProgressFn | None = None,
    engine: str = "auto",
) -> list[HitRateResult]:
    """:func:`simulate` every case; results in case order.

    The cases LRU's shortcut counts exactly (``engine`` "auto" or "stack") share one
    :class:`LruStack` pass, here; each of their results' ``seconds`` includes that whole pass.
    The other runs (direct or store loop, as ``engine`` says) are independent, so with ``jobs``
    > 1 they run in that many forked worker processes at once: the same code and the same
    results, in less wall time. Each run's ``seconds`` is still its own. ``jobs`` = 1 runs them
    here, one after the other.

    Raises:
        HitRateError: ``jobs`` < 1, an unknown engine, a case the named engine is not exact for;
            or what a run raised.
    """
    if jobs < 1:
        raise HitRateError(f"jobs must be at least 1, got {jobs}")
    _check_engine(engine)
    results: dict[int, HitRateResult] = {}
    if engine in ("auto", "stack"):
        why = [stack_refusal(c.tiers, c.policy, config) for c in cases]
        if None in why:
            t0 = time.perf_counter()
            stack = LruStack(trace)
            pass_seconds = time.perf_counter() - t0
            for i, case in enumerate(cases):
                if why[i] is None:
                    why[i] = stack.exact_for(case.tiers[0].capacity_blocks)
                if why[i] is None:
                    results[i] = stack_result(stack, case.tiers[0], pass_seconds)
                    if on_progress is not None:
                        on_progress(i, len(trace.requests), len(trace.requests))
        refused = [i for i in range(len(cases)) if why[i] is not None]
        if engine == "stack" and refused:
            i = refused[0]
            raise _not_exact("stack", str(why[i]), cases[i])
    rest = [i for i in range(len(cases)) if i not in results]
    engines = []
    for i in rest:
        why_not = direct.refusal(len(cases[i].tiers))
        if engine == "direct" and why_not is not None:
            raise _not_exact("direct", why_not, cases[i])
        engines.append("direct" if engine in ("auto", "direct") and why_not is None else "store")
    if rest:
        track = None
        if on_progress is not None:
            track = functools.partial(_report_as, rest, on_progress)
        ran = _sweep_runs(trace, [cases[i] for i in rest], engines, config, keys, jobs, track)
        results.update(zip(rest, ran))
    return [results[i] for i in range(len(cases))]


def _report_as(index: list[int], report: SweepProgressFn, i: int, done: int, total: int) -> None:
    report(index[i], done, total)


def _sweep_runs(
    trace: Trace,
    cases: Sequence[SimCase],
    engines: Sequence[str],
    config: KvferryConfig | None,
    keys: list[list[Key]] | None,
    jobs: int,
    on_progress: SweepProgressFn | None,
) -> list[HitRateResult]:
    keys = trace_keys(trace) if keys is None else keys
    jobs = min(jobs, len(cases))
    if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        out = []
        for i, (case, engine) in enumerate(zip(cases, engines)):
            track = None if on_progress is None else functools.partial(on_progress, i)
            out.append(
                simulate(
                    trace,
                    case.tiers,
                    policy=case.policy,
                    config=config,
                    keys=keys,
                    on_progress=track,
                    engine=engine,
                )
            )
        return out
    ctx = multiprocessing.get_context("fork")
    updates = ctx.SimpleQueue() if on_progress is not None else None
    with _FORK_LOCK:  # one forked sweep at a time per process: the state is a global
        _FORK_STATE.update(trace=trace, keys=keys, config=config, updates=updates)
        try:
            return _sweep_forked(ctx, jobs, cases, engines, updates, on_progress)
        finally:
            _FORK_STATE.clear()
            if updates is not None:
                updates.close()


def _sweep_forked(
    ctx: Any,
    jobs: int,
    cases: Sequence[SimCase],
    engines: Sequence[str],
    updates: Any,
    on_progress: SweepProgressFn | None,
) -> list[HitRateResult]:
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = [
                pool.submit(_sweep_worker, i, c, e) for i, (c, e) in enumerate(zip(cases, engines))
            ]
            if updates is not None and on_progress is not None:
                pending = set(futures)
                while pending:
                    _, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                    while not updates.empty():
                        on_progress(*updates.get())
            return [f.result() for f in futures]
    except BrokenProcessPool as e:
        raise HitRateError(f"a sweep worker process died ({e}); run with --jobs 1") from e


def _sweep_worker(index: int, case: SimCase, engine: str) -> HitRateResult:
    state = _FORK_STATE
    updates = state["updates"]
    return simulate(
        state["trace"],
        case.tiers,
        policy=case.policy,
        config=state["config"],
        keys=state["keys"],
        on_progress=None if updates is None else functools.partial(_put_update, updates, index),
        engine=engine,
    )


def _put_update(updates: Any, index: int, done: int, total: int) -> None:
    updates.put((index, done, total))
