"""One hit-rate run from its options: ``run(options) -> HitRateReport``.

Owns what turns :class:`~kvferry.bench.hitrate.options.HitRateOptions` into a report: reading
the trace (or generating the workload), the simulation config (``exact_capacity``), the cases,
the sweep or the replays, the advice loop, the reference curve and the report's assembly. A
Python caller and ``kvferry bench hitrate`` both come through :func:`run`, so the same options
give the same numbers. It prints nothing: progress goes to an optional :class:`HitRateProgress`.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from kvferry.bench.hitrate.advice import Advice, advise
from kvferry.bench.hitrate.options import HitRateOptions, expand_cases, search_tiers
from kvferry.bench.hitrate.pool import default_jobs, sweep
from kvferry.bench.hitrate.replayer import replay
from kvferry.bench.hitrate.report import HitRateReport, peak_rss_mib, reference_points
from kvferry.bench.hitrate.simulation import (
    SIM_SLOT_SIZE,
    HitRateResult,
    sim_store_config,
    trace_keys,
)
from kvferry.bench.hitrate.spec import read_reference
from kvferry.bench.result import EffectiveConfig
from kvferry.bench.traces import BUNDLED, Trace, bundled_path, read_trace, workload_trace
from kvferry.config.loader import LoadedConfig
from kvferry.config.models import KvferryConfig

__all__ = ["HitRateProgress", "load_trace", "run", "sim_config"]


class HitRateProgress(Protocol):
    """Where :func:`run` reports progress: one task per run (``total`` requests) and one per
    capacity search (``total`` None: its length is not known)."""

    def add(self, label: str, total: int | None) -> Any:
        """Start a task; returns its handle."""

    def update(self, task: Any, done: int) -> None:
        """``done`` requests of the task are through."""

    def remove(self, task: Any) -> None:
        """The task is over."""


def load_trace(options: HitRateOptions) -> Trace:
    """The requests ``options`` name: its trace file (or bundled trace) or its workload.

    Raises:
        ConfigError: a bad workload spec. TraceError: an unreadable or bad trace.
    """
    if options.workload is not None:
        return workload_trace(options.workload, options.block_tokens)
    if options.trace is None:
        options.validate()  # raises: neither input given
    return read_trace(
        str(options.trace),
        block_tokens=options.block_tokens,
        strict=options.strict,
        keep_mismatched=options.keep_mismatched,
    )


def sim_config(options: HitRateOptions, config: KvferryConfig) -> KvferryConfig:
    """The config a simulation runs: ``config``'s placement settings with watermarks 1.0 and 0
    when ``options.exact_capacity`` (evict exactly down to capacity), else its own."""
    st = config.store
    if options.exact_capacity:
        return sim_store_config(st.eviction_policy, base=config)
    return sim_store_config(
        st.eviction_policy,
        base=config,
        evict_start_threshold=st.evict_start_threshold,
        evict_ratio=st.evict_ratio,
    )


def run(
    options: HitRateOptions,
    progress: HitRateProgress | None = None,
    *,
    config: KvferryConfig | LoadedConfig | None = None,
    trace: Trace | None = None,
) -> HitRateReport:
    """Run what ``options`` ask for and return the report.

    Args:
        options: the run (validated here, before the trace is read).
        progress: where each run's progress goes.
        config: the store's settings (tiers and capacities for a replay; write policy,
            promotion and, without ``exact_capacity``, watermarks for a simulation); a
            :class:`LoadedConfig` also records where each value came from. Default: defaults.
        trace: the requests, when the caller has read them already (default:
            :func:`load_trace` of ``options``).

    Raises:
        ConfigError: a bad option, capacity, tier, geometry or config.
        HitRateError: a shortcut engine named where it is not exact, an unreadable reference
            curve, or a failed run.
    """
    started = time.time()
    options.validate()
    if isinstance(config, LoadedConfig):
        cfg, sources = config.config, dict(config.sources)
    else:
        cfg, sources = config or KvferryConfig(), {}
    if trace is None:
        trace = load_trace(options)
    trace.require_requests()
    kv = options.geometry()
    block_bytes = None if kv is None else kv * trace.block_tokens
    references = []
    if options.reference:
        ref = options.reference
        curve = read_reference(bundled_path(ref) if ref in BUNDLED else ref, trace.block_tokens)
        references = reference_points(ref, curve)
    keys = trace_keys(trace)
    distinct = len({k for ks in keys for k in ks})
    reqs = trace.requests
    results: list[HitRateResult] = []
    advice: list[Advice] = []
    if options.replay:
        assert kv is not None  # validate() checked it
        for policy in options.policies:
            task = None if progress is None else progress.add(f"replay {policy}", len(reqs))
            results.append(
                replay(
                    trace,
                    cfg,
                    kv_bytes_per_token=kv,
                    policy=policy,
                    speedup=options.speedup,
                    on_progress=_tracker(progress, task),
                )
            )
        effective = _effective(cfg, sources, options, slot_size=kv * trace.block_tokens)
    else:
        sim = sim_config(options, cfg)
        cases = expand_cases(options, block_bytes, distinct)
        tasks = [] if progress is None else [progress.add(c.label, len(reqs)) for c in cases]
        results = sweep(
            trace,
            cases,
            config=sim,
            keys=keys,
            jobs=options.jobs or default_jobs(),
            on_progress=None if progress is None else _sweep_tracker(progress, tasks),
            engine=options.engine,
        )
        if options.target_hit_rate:
            for policy in options.policies:
                task = None if progress is None else progress.add(f"advice {policy}", None)
                advice.append(
                    advise(
                        trace,
                        search_tiers(options, block_bytes),
                        options.target_hit_rate,
                        policy=policy,
                        config=sim,
                        keys=keys,
                        engine=options.engine,
                    )
                )
                if progress is not None:
                    progress.remove(task)
        effective = _effective(sim, sources, options, slot_size=SIM_SLOT_SIZE)
    return HitRateReport(
        options=options,
        config=effective,
        started_at=started,
        ended_at=time.time(),
        references=references,
        notes=_notes(options, effective),
        source=trace.path,
        block_tokens=trace.block_tokens,
        requests=len(reqs),
        blocks=trace.total_blocks,
        distinct_blocks=distinct,
        trace_duration_s=(reqs[-1].timestamp_ms - reqs[0].timestamp_ms) / 1000.0,
        kv_bytes_per_token=kv,
        prefill_tokens_per_s=options.prefill_tokens_per_s,
        peak_rss_mib=peak_rss_mib(),
        cases=results,
        advice=advice,
    )


def _tracker(progress: HitRateProgress | None, task: Any) -> Any:
    if progress is None:
        return None
    return lambda done, total: progress.update(task, done)


def _sweep_tracker(progress: HitRateProgress, tasks: list[Any]) -> Any:
    return lambda i, done, total: progress.update(tasks[i], done)


def _effective(
    config: KvferryConfig, sources: dict[str, str], options: HitRateOptions, *, slot_size: int
) -> EffectiveConfig:
    """The config the runs saw, each key's source kept, the keys the bench set marked
    ``bench``: the policy (each run's own), no prefetch (a background thread would make the hit
    rate depend on timing), the slot size, and a simulation's exact-capacity watermarks."""
    store = {
        "eviction_policy": ",".join(options.policies),
        "prefetch_depth": 0,
        "slot_size": slot_size,
    }
    if not options.replay and options.exact_capacity:
        store.update(evict_start_threshold=1.0, evict_ratio=0.0)
    out = EffectiveConfig.of(config, sources)
    for key, value in store.items():
        out.values[f"store.{key}"] = value
        out.sources[f"store.{key}"] = "bench"
    return out


def _notes(options: HitRateOptions, config: EffectiveConfig) -> list[str]:
    if options.replay:
        return ["replayed against the configured store with real bytes"]
    if options.exact_capacity:
        return ["simulated with exact capacities: a tier evicts only what a put needs, when full"]
    v = config.values
    return [
        "simulated with the store's batch eviction: evict_start_threshold="
        f"{v['store.evict_start_threshold']}, evict_ratio={v['store.evict_ratio']}"
    ]
