"""The hit-rate lab: simulate or replay a request trace against kvferry's real store.

Both modes run the same loop over the same :class:`~kvferry.store.TieredStore` code (index,
placement, promotion, demotion, eviction policies); only the tiers differ:

- *simulate*: tiers are :class:`~kvferry.backends.memory.MemoryTier` of a given capacity in
  blocks, holding empty values, so a run costs only keys and bookkeeping;
- *replay*: the tiers of the config (cpu, disk, redis, server, ...) with real bytes sized from a
  model's KV geometry, at the trace's timestamps (scaled) or as fast as possible.

So a simulated hit rate and a replay's hit rate with the same capacities and policy are equal
(a test holds them to it). Per request the loop is what an engine does: ``lookup`` the leading
cached blocks, ``get`` them, ``put`` the blocks from the first miss on.

Two shortcuts, on by default (``engine="auto"``), each taken only where its counts are the store
loop's block for block (tests hold them equal):

- ``stack``: LRU over one tier with exact capacities takes its counts from
  :class:`~kvferry.bench.lru_stack.LruStack` (one pass over the trace answers every capacity);
- ``direct``: any other run over one tier drives the store's own eviction policy with the
  store's calls (:mod:`kvferry.bench.hitrate.direct`), without the store's index, tier dict, leases
  and statistics around it.

``engine="store"`` always runs the loop; a tier pipeline always does.

Hit rates are reported three ways and always labelled:

- block-weighted (headline): leading hit blocks / blocks looked up, a ratio of sums;
- token-weighted: hit tokens (``min(hit blocks * block_tokens, input_length)``) / input tokens;
- per-request mean: mean over requests with blocks of their hit fraction (aiperf's definition).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import multiprocessing
import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from kvferry.backends.base import Key
from kvferry.backends.memory import MemoryTier
from kvferry.bench.hitrate import direct
from kvferry.bench.hitrate.lru_stack import LruStack
from kvferry.bench.stats import Samples
from kvferry.bench.traces import Trace, TraceRequest
from kvferry.config.models import KvferryConfig
from kvferry.config.units import parse_size
from kvferry.errors import ConfigError, KvferryError
from kvferry.store.tiered import TieredStore

SCHEMA_VERSION = 1

ProgressFn = Callable[[int, int], None]
"""``(requests done, requests in all)``."""

DTYPE_BYTES = {
    "fp32": 4,
    "float32": 4,
    "fp16": 2,
    "float16": 2,
    "bf16": 2,
    "bfloat16": 2,
    "fp8": 1,
    "float8": 1,
    "int8": 1,
}

ENGINES = ("auto", "store", "stack", "direct")
"""How a simulation counts: ``store`` runs the TieredStore loop, ``stack`` LRU's one-pass
shortcut, ``direct`` the policy driven without the store around it (each refused where it is not
exact); ``auto`` the stack where it is exact, else direct where it is, else the loop."""

SIM_SLOT_SIZE = 4096
"""``store.slot_size`` of a simulation: its values are empty, so the number only has to be valid."""


class HitRateError(KvferryError):
    """A hit-rate run cannot start (bad capacities, tiers, geometry) or went wrong."""


# -- sizes -------------------------------------------------------------------------------------


def kv_bytes_per_token(model_kv: str) -> int:
    """Bytes of K and V per token from ``"layers,kv_heads,head_dim,dtype"``.

    ``2 * layers * kv_heads * head_dim * bytes(dtype)``; e.g. Llama-3-8B is
    ``"32,8,128,bf16"`` = 131072 bytes (128 KiB) per token.

    Raises:
        ConfigError: not four fields, a field not a positive number, or an unknown dtype.
    """
    parts = [p.strip() for p in model_kv.split(",")]
    if len(parts) != 4:
        raise ConfigError(
            f"--model-kv {model_kv!r}: expected layers,kv_heads,head_dim,dtype (e.g. 32,8,128,bf16)"
        )
    dims: list[int] = []
    for name, text in zip(("layers", "kv_heads", "head_dim"), parts[:3]):
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(f"--model-kv {model_kv!r}: {name} must be a whole number >= 1")
        dims.append(value)
    dtype = parts[3].lower()
    if dtype not in DTYPE_BYTES:
        raise ConfigError(
            f"--model-kv {model_kv!r}: unknown dtype {parts[3]!r}; valid: {', '.join(DTYPE_BYTES)}"
        )
    return 2 * dims[0] * dims[1] * dims[2] * DTYPE_BYTES[dtype]


def parse_capacity(text: str, block_bytes: int | None) -> int:
    """Blocks from ``"5000"`` (blocks) or ``"4GiB"`` (bytes, which need the block size).

    Raises:
        ConfigError: not a count or size, a size without ``block_bytes``, or less than a block.
    """
    text = text.strip()
    if text.isdigit():
        blocks = int(text)
    else:
        try:
            nbytes = parse_size(text)
        except ValueError as e:
            raise ConfigError(
                f"capacity {text!r} is neither a block count (5000) nor a size (4GiB): {e}"
            ) from e
        if block_bytes is None:
            raise ConfigError(
                f"capacity {text!r} is a size; give the KV geometry (--kv-bytes-per-token or "
                "--model-kv) so it can be turned into blocks, or give blocks"
            )
        blocks = nbytes // block_bytes
    if blocks < 1:
        raise ConfigError(f"capacity {text!r} holds no block; give at least 1 block")
    return blocks


@dataclass(frozen=True)
class TierSpec:
    """One simulated tier: a name (for the report) and its capacity in blocks (None: as large
    as the trace needs; only the last tier may be so)."""

    name: str
    capacity_blocks: int | None


def parse_tiers(text: str, block_bytes: int | None) -> list[TierSpec]:
    """``"cpu:5000,disk:50000"`` (capacities as for :func:`parse_capacity`); the last tier may
    leave its capacity out (``"cpu:5000,disk"``): unbounded, or searched by capacity advice.

    Raises:
        ConfigError: an empty or repeated name, a bad capacity, or a missing one before the last.
    """
    specs: list[TierSpec] = []
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"--tiers {text!r}: expected NAME:CAPACITY,... e.g. cpu:5000,disk:50000")
    for i, item in enumerate(items):
        name, sep, cap = item.partition(":")
        name = name.strip()
        if not name:
            raise ConfigError(f"--tiers {text!r}: a tier without a name in {item!r}")
        if any(s.name == name for s in specs):
            raise ConfigError(f"--tiers {text!r}: tier {name!r} named twice")
        if not sep or not cap.strip():
            if i != len(items) - 1:
                raise ConfigError(
                    f"--tiers {text!r}: tier {name!r} needs a capacity (only the last may omit it)"
                )
            specs.append(TierSpec(name, None))
        else:
            specs.append(TierSpec(name, parse_capacity(cap, block_bytes)))
    return specs


# -- the loop both modes run -------------------------------------------------------------------


@dataclass
class Tally:
    """Hits and totals of one run."""

    requests: int = 0
    requests_with_blocks: int = 0
    blocks: int = 0
    hit_blocks: int = 0
    tokens: int = 0
    hit_tokens: int = 0
    hit_fraction_sum: float = 0.0
    not_stored: int = 0

    def add(self, req: TraceRequest, n_blocks: int, hit: int, block_tokens: int) -> None:
        self.requests += 1
        self.tokens += req.input_length
        if n_blocks:
            self.requests_with_blocks += 1
            self.blocks += n_blocks
            self.hit_blocks += hit
            self.hit_tokens += min(hit * block_tokens, req.input_length)
            self.hit_fraction_sum += hit / n_blocks


def trace_keys(trace: Trace, salt: bytes = bytes(8)) -> list[list[Key]]:
    """Store keys of each request's hash ids: 8 bytes of id + 8 bytes of ``salt`` (a replay
    against a shared tier uses a fresh salt, so blocks of an earlier run never count as hits)."""
    if len(salt) != 8:
        raise ValueError("the key salt is 8 bytes")
    cache: dict[int, Key] = {}
    out: list[list[Key]] = []
    for r in trace.requests:
        keys = []
        for h in r.hash_ids:
            k = cache.get(h)
            if k is None:
                k = cache[h] = h.to_bytes(8, "little") + salt
            keys.append(k)
        out.append(keys)
    return out


def serve(
    store: TieredStore,
    keys: list[Key],
    outs: Sequence[memoryview],
    values: Sequence[Any],
) -> tuple[int, list[int | None]]:
    """One request, as an engine does it: lookup, get the hit prefix, put the rest.

    Returns the leading blocks actually read (a block that vanished between lookup and get ends
    the prefix there) and the lengths ``get`` answered. ``outs``/``values`` hold at least
    ``len(keys)`` buffers.
    """
    n = store.lookup(keys)
    got: list[int | None] = []
    hit = 0
    if n:
        got = store.get(keys[:n], outs[:n], depth=0)
        for length in got:
            if length is None:
                break
            hit += 1
    if hit < len(keys):
        store.put(keys[hit:], values[: len(keys) - hit], depth=hit)
    return hit, got


# -- results -----------------------------------------------------------------------------------


@dataclass
class HitRateResult:
    """One run: a policy over a tier pipeline, simulated or replayed."""

    mode: Literal["simulate", "replay"]
    policy: str
    tiers: list[TierSpec]
    tally: Tally
    tier_hit_blocks: dict[str, int]
    promotions: int
    demotions: int
    evictions: int
    dropped: int
    seconds: float
    replay: dict[str, Any] | None = None
    engine: str = "store"
    """How the counts were made: "store" (the TieredStore loop, and every replay) or "stack"
    (LRU's one-pass shortcut, :mod:`kvferry.bench.hitrate.lru_stack`)."""

    @property
    def capacity_blocks(self) -> int | None:
        caps = [t.capacity_blocks for t in self.tiers]
        return None if any(c is None for c in caps) else sum(c for c in caps if c is not None)

    @property
    def block_hit_rate(self) -> float:
        t = self.tally
        return t.hit_blocks / t.blocks if t.blocks else 0.0

    @property
    def token_hit_rate(self) -> float:
        t = self.tally
        return t.hit_tokens / t.tokens if t.tokens else 0.0

    @property
    def request_mean_hit_rate(self) -> float:
        t = self.tally
        return t.hit_fraction_sum / t.requests_with_blocks if t.requests_with_blocks else 0.0

    @property
    def lookups_per_s(self) -> float:
        return self.tally.blocks / self.seconds if self.seconds > 0 else 0.0

    def tier_hit_rates(self) -> dict[str, float]:
        b = self.tally.blocks
        return {name: (n / b if b else 0.0) for name, n in self.tier_hit_blocks.items()}

    def counted(self) -> dict[str, Any]:
        """What the run counted (``to_json`` without its timing and engine): equal for every
        engine that counts a run exactly."""
        out = self.to_json()
        for k in ("seconds", "lookups_per_s", "engine"):
            del out[k]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "policy": self.policy,
            "tiers": [asdict(t) for t in self.tiers],
            "capacity_blocks": self.capacity_blocks,
            "block_hit_rate": self.block_hit_rate,
            "token_hit_rate": self.token_hit_rate,
            "request_mean_hit_rate": self.request_mean_hit_rate,
            "tier_block_hit_rate": self.tier_hit_rates(),
            "tier_hit_blocks": self.tier_hit_blocks,
            **asdict(self.tally),
            "promotions": self.promotions,
            "demotions": self.demotions,
            "evictions": self.evictions,
            "dropped": self.dropped,
            "seconds": self.seconds,
            "lookups_per_s": self.lookups_per_s,
            "replay": self.replay,
            "engine": self.engine,
        }


def _store_config(base: KvferryConfig | None, policy: str, slot_size: int) -> KvferryConfig:
    """The config both modes run: ``base``'s store placement settings with ``policy``, and no
    prefetch (a background thread would make the hit rate depend on timing)."""
    cfg = (base or KvferryConfig()).model_copy(deep=True)
    store = cfg.store.model_copy(
        update={"eviction_policy": policy, "prefetch_depth": 0, "slot_size": slot_size}
    )
    return cfg.model_copy(update={"store": store})


def sim_store_config(
    policy: str,
    *,
    base: KvferryConfig | None = None,
    evict_start_threshold: float = 1.0,
    evict_ratio: float = 0.0,
) -> KvferryConfig:
    """A simulation's config: exact capacities by default (evict only what a put needs, when
    the tier is full), which is what a hit-rate-versus-capacity curve means."""
    cfg = _store_config(base, policy, SIM_SLOT_SIZE)
    store = cfg.store.model_copy(
        update={"evict_start_threshold": evict_start_threshold, "evict_ratio": evict_ratio}
    )
    return cfg.model_copy(update={"store": store})


def _tier_counts(store: TieredStore) -> tuple[dict[str, int], int, int, int, int]:
    st = store.stats()
    hits = {name: c.hits for name, c in st.tiers.items()}
    return (
        hits,
        sum(c.promotions for c in st.tiers.values()),
        sum(c.demotions for c in st.tiers.values()),
        sum(c.evictions for c in st.tiers.values()),
        sum(c.dropped for c in st.tiers.values()),
    )


def stack_refusal(
    tiers: Sequence[TierSpec], policy: str, config: KvferryConfig | None
) -> str | None:
    """None when :class:`LruStack` can count a simulation of ``tiers`` exactly as the store loop
    would (LRU, one tier, exact capacity: evict only what a put needs); else why not. The
    trace's own conditions are :meth:`LruStack.exact_for`."""
    if policy != "lru":
        return f"policy {policy!r} is not lru"
    if len(tiers) != 1:
        return f"{len(tiers)} tiers: the shortcut covers one"
    if config is not None:
        st = config.store
        if st.evict_start_threshold != 1.0 or st.evict_ratio != 0.0:
            return (
                f"watermarks evict_start_threshold={st.evict_start_threshold}, "
                f"evict_ratio={st.evict_ratio}: the shortcut needs exact capacities (1.0, 0)"
            )
    return None


def _not_exact(engine: str, why: str, case: SimCase | None = None) -> HitRateError:
    where = "here" if case is None else f"for {case.label}"
    return HitRateError(
        f"engine {engine!r} is not exact {where}: {why}; use engine 'auto' (it takes what is "
        "exact) or 'store'"
    )


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise HitRateError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")


def simulate(
    trace: Trace,
    tiers: Sequence[TierSpec],
    *,
    policy: str = "lru",
    config: KvferryConfig | None = None,
    keys: list[list[Key]] | None = None,
    on_progress: ProgressFn | None = None,
    engine: str = "auto",
    stack: LruStack | None = None,
) -> HitRateResult:
    """Run ``trace`` through a TieredStore over memory tiers of ``tiers``' capacities (or count
    the same with a shortcut where that is exact: ``engine``).

    Args:
        trace: the requests.
        tiers: fastest first; a None capacity is unbounded.
        policy: eviction policy name (the store's registry: lru, lfu, fifo, length-aware, ...).
        config: store settings (write policy, promotion, watermarks); default
            :func:`sim_store_config` (exact capacities). ``eviction_policy`` is set to ``policy``.
        keys: :func:`trace_keys` of ``trace``, when the caller runs many cases.
        on_progress: called every few hundred requests.
        engine: one of :data:`ENGINES`.
        stack: ``LruStack(trace)``, when the caller runs many cases (built here when needed).

    Raises:
        HitRateError: no tiers, an unknown engine, or engine "stack" or "direct" where it is not
            exact.
    """
    if not tiers:
        raise HitRateError("a simulation needs at least one tier")
    _check_engine(engine)
    if engine in ("auto", "stack"):
        t0 = time.perf_counter()
        why = stack_refusal(tiers, policy, config)
        if why is None:
            if stack is None:
                stack = LruStack(trace)
            why = stack.exact_for(tiers[0].capacity_blocks)
            if why is None:
                result = stack_result(stack, tiers[0], time.perf_counter() - t0)
                if on_progress is not None:
                    on_progress(len(trace.requests), len(trace.requests))
                return result
        if engine == "stack":
            raise _not_exact("stack", why)
    if config is None:
        cfg = sim_store_config(policy)
    else:
        cfg = _store_config(config, policy, max(SIM_SLOT_SIZE, config.store.slot_size))
    keys = trace_keys(trace) if keys is None else keys
    if engine in ("auto", "direct"):
        why = direct.refusal(len(tiers))
        if why is None:
            t0 = time.perf_counter()
            got = direct.count(keys, policy, tiers[0].capacity_blocks, cfg.store, on_progress)
            return _counted_result(
                trace,
                policy,
                tiers[0],
                got.hits,
                got.evictions,
                time.perf_counter() - t0,
                "direct",
            )
        if engine == "direct":
            raise _not_exact("direct", why)
    slot = cfg.store.slot_size
    store = TieredStore(
        cfg,
        tiers=[MemoryTier.sized(t.capacity_blocks, label=t.name, slot_size=slot) for t in tiers],
    )
    longest = max((len(k) for k in keys), default=0)
    empty = memoryview(b"")
    outs = [memoryview(bytearray(0))] * longest
    values = [empty] * longest
    tally = Tally()
    bt = trace.block_tokens
    total = len(trace.requests)
    step = 512
    try:
        start = time.perf_counter()
        for i, (req, ks) in enumerate(zip(trace.requests, keys)):
            hit, _ = serve(store, ks, outs, values)
            tally.add(req, len(ks), hit, bt)
            if on_progress is not None and i % step == 0:
                on_progress(i, total)
        seconds = time.perf_counter() - start
        hits, promotions, demotions, evictions, dropped = _tier_counts(store)
    finally:
        store.close()
    if on_progress is not None:
        on_progress(total, total)
    return HitRateResult(
        mode="simulate",
        policy=policy,
        tiers=list(tiers),
        tally=tally,
        tier_hit_blocks=hits,
        promotions=promotions,
        demotions=demotions,
        evictions=evictions,
        dropped=dropped,
        seconds=seconds,
    )


def stack_result(stack: LruStack, tier: TierSpec, seconds: float) -> HitRateResult:
    """The result of simulating LRU over ``tier`` alone, from ``stack``'s counts, with the
    same fields the store loop fills (``seconds``: what the caller spent, the pass included)."""
    t0 = time.perf_counter()
    got = stack.counts(tier.capacity_blocks)
    tally = _tally(got["hits"], stack.lengths, stack.input_lengths, stack.block_tokens)
    return _one_tier_result(
        "lru", tier, tally, got["evictions"], seconds + time.perf_counter() - t0, "stack"
    )


def _counted_result(
    trace: Trace,
    policy: str,
    tier: TierSpec,
    hits: np.ndarray[Any, Any],
    evictions: int,
    seconds: float,
    engine: str,
) -> HitRateResult:
    """The result of a run over ``tier`` alone that counted ``hits`` (prefix hit blocks per
    request of ``trace``) and ``evictions``, with the same fields the store loop fills."""
    reqs = trace.requests
    lens = np.fromiter((len(r.hash_ids) for r in reqs), np.int64, len(reqs))
    inputs = np.fromiter((r.input_length for r in reqs), np.int64, len(reqs))
    tally = _tally(hits, lens, inputs, trace.block_tokens)
    return _one_tier_result(policy, tier, tally, evictions, seconds, engine)


def _tally(
    hits: np.ndarray[Any, Any],
    lens: np.ndarray[Any, Any],
    input_lengths: np.ndarray[Any, Any],
    block_tokens: int,
) -> Tally:
    """What :meth:`Tally.add` sums over the requests, from per-request arrays."""
    tally = Tally(
        requests=len(lens),
        requests_with_blocks=int(np.count_nonzero(lens)),
        blocks=int(lens.sum()),
        hit_blocks=int(hits.sum()),
        tokens=int(input_lengths.sum()),
        hit_tokens=int(np.minimum(hits * block_tokens, input_lengths).sum()),
    )
    with_blocks = lens > 0
    fraction_sum = 0.0
    for f in (hits[with_blocks] / lens[with_blocks]).tolist():
        fraction_sum += f  # in request order, as Tally.add sums them: the same float
    tally.hit_fraction_sum = fraction_sum
    return tally


def _one_tier_result(
    policy: str, tier: TierSpec, tally: Tally, evictions: int, seconds: float, engine: str
) -> HitRateResult:
    return HitRateResult(
        mode="simulate",
        policy=policy,
        tiers=[tier],
        tally=tally,
        tier_hit_blocks={tier.name: tally.hit_blocks},
        promotions=0,
        demotions=0,
        evictions=evictions,
        dropped=0,
        seconds=seconds,
        engine=engine,
    )


# -- sweep -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimCase:
    """One simulation run of a sweep."""

    policy: str
    tiers: list[TierSpec]

    @property
    def label(self) -> str:
        return f"{self.policy} {'+'.join(f'{t.name}:{t.capacity_blocks}' for t in self.tiers)}"


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


# -- replay ------------------------------------------------------------------------------------


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def replay(
    trace: Trace,
    config: KvferryConfig,
    *,
    kv_bytes_per_token: int,
    policy: str | None = None,
    speedup: float | None = None,
    on_progress: ProgressFn | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> HitRateResult:
    """Replay ``trace`` against the store the config describes, with real bytes.

    Each block is ``kv_bytes_per_token * block_tokens`` bytes (``store.slot_size`` is set to
    that); every put block carries its key in its first 16 bytes and every block read back is
    checked for it, so a store that served the wrong bytes shows as ``corrupt_blocks``.

    Args:
        trace: the requests, replayed in file order.
        config: tiers and their capacities (``store.tiers``, ``cpu.capacity``, ...).
        kv_bytes_per_token: from the model's KV geometry (:func:`kv_bytes_per_token`).
        policy: eviction policy (default: the config's).
        speedup: replay at the trace's timestamps divided by this; None: as fast as possible.

    Reports, beside the hit rates: QPS, request latency and per-block get/put latency
    percentiles, effective bandwidth (bytes read + written per second), the write ratio, and
    RSS at the start, the end and its peak.
    """
    if kv_bytes_per_token < 1:
        raise HitRateError("kv_bytes_per_token must be >= 1")
    if speedup is not None and not speedup > 0:
        raise HitRateError(f"speedup must be > 0, got {speedup}")
    block_bytes = kv_bytes_per_token * trace.block_tokens
    cfg = _store_config(config, policy or config.store.eviction_policy, block_bytes)
    salt = os.urandom(8)
    keys = trace_keys(trace, salt)
    longest = max((len(k) for k in keys), default=0)
    arena = bytearray(block_bytes * max(longest, 1))
    outs = [memoryview(arena)[i * block_bytes : (i + 1) * block_bytes] for i in range(longest)]
    src = bytearray(block_bytes * max(longest, 1))
    for i in range(0, len(src), 4096):  # a non-zero pattern, so a dropped copy is visible
        src[i : i + 8] = i.to_bytes(8, "little")
    values = [memoryview(src)[i * block_bytes : (i + 1) * block_bytes] for i in range(longest)]
    store = TieredStore(cfg)
    tally = Tally()
    bt = trace.block_tokens
    request_us = Samples()
    get_block_us = Samples()
    put_block_us = Samples()
    bytes_read = bytes_written = corrupt = late = 0
    rss = [_rss_mib()]
    rss_every = max(1, len(trace.requests) // 50)
    total = len(trace.requests)
    t0_trace = trace.requests[0].timestamp_ms if trace.requests else 0.0
    try:
        start = clock()
        for i, (req, ks) in enumerate(zip(trace.requests, keys)):
            if speedup is not None:
                due = start + (req.timestamp_ms - t0_trace) / 1000.0 / speedup
                wait = due - clock()
                if wait > 0:
                    sleep(wait)
                elif wait < -0.001:
                    late += 1
            for j, k in enumerate(ks):  # the key in the first 16 bytes of each block put
                values[j][:16] = k
            t0 = time.perf_counter_ns()
            n = store.lookup(ks)
            t1 = time.perf_counter_ns()
            hit = 0
            if n:
                got = store.get(ks[:n], outs[:n], depth=0)
                for j, length in enumerate(got):
                    if length is None:
                        break
                    if outs[j][:16] != ks[j] or length != block_bytes:
                        corrupt += 1
                        break
                    hit += 1
            t2 = time.perf_counter_ns()
            if hit < len(ks):
                store.put(ks[hit:], values[hit : len(ks)], depth=hit)
            t3 = time.perf_counter_ns()
            tally.add(req, len(ks), hit, bt)
            request_us.add((t3 - t0) / 1e3)
            if hit:
                get_block_us.add((t2 - t1) / 1e3 / hit)
                bytes_read += hit * block_bytes
            if hit < len(ks):
                put_block_us.add((t3 - t2) / 1e3 / (len(ks) - hit))
                bytes_written += (len(ks) - hit) * block_bytes
            if i % rss_every == 0:
                rss.append(_rss_mib())
                if on_progress is not None:
                    on_progress(i, total)
        seconds = clock() - start
        rss.append(_rss_mib())
        hits, promotions, demotions, evictions, dropped = _tier_counts(store)
        tier_specs = [TierSpec(t.label, t.capacity_blocks) for t in store.tiers]
    finally:
        store.close()
    if on_progress is not None:
        on_progress(total, total)
    moved = bytes_read + bytes_written
    extra: dict[str, Any] = {
        "block_bytes": block_bytes,
        "kv_bytes_per_token": kv_bytes_per_token,
        "speedup": speedup,
        "qps": total / seconds if seconds > 0 else 0.0,
        "requests_late": late,
        "request_latency_us": request_us.summary().to_dict() if len(request_us) else None,
        "get_latency_per_block_us": get_block_us.summary().to_dict() if len(get_block_us) else None,
        "put_latency_per_block_us": put_block_us.summary().to_dict() if len(put_block_us) else None,
        "bytes_read": bytes_read,
        "bytes_written": bytes_written,
        "bandwidth_gbps": moved / seconds / 1e9 if seconds > 0 else 0.0,
        "write_ratio": bytes_written / moved if moved else 0.0,
        "corrupt_blocks": corrupt,
        "rss_start_mib": rss[0],
        "rss_end_mib": rss[-1],
        "rss_peak_mib": max(rss),
        "rss_samples_mib": rss,
    }
    return HitRateResult(
        mode="replay",
        policy=cfg.store.eviction_policy,
        tiers=tier_specs,
        tally=tally,
        tier_hit_blocks=hits,
        promotions=promotions,
        demotions=demotions,
        evictions=evictions,
        dropped=dropped,
        seconds=seconds,
        replay=extra,
    )


# -- capacity advice ---------------------------------------------------------------------------


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


# -- report ------------------------------------------------------------------------------------


@dataclass
class HitRateReport:
    """Everything one ``kvferry bench hitrate`` run measured."""

    source: str
    block_tokens: int
    requests: int
    blocks: int
    duration_s: float
    kv_bytes_per_token: int | None
    results: list[HitRateResult]
    advice: list[Advice] = field(default_factory=list)
    prefill_tokens_per_s: float | None = None
    peak_rss_mib: float = 0.0
    reference: list[tuple[float, float]] | None = None
    """(capacity in blocks, hit rate) of a published curve, when given."""

    @property
    def block_bytes(self) -> int | None:
        return (
            None if self.kv_bytes_per_token is None else self.kv_bytes_per_token * self.block_tokens
        )

    def prefill_saved(self, result: HitRateResult) -> dict[str, float] | None:
        """Prefill compute a result saves: seconds in all and per second of trace."""
        rate = self.prefill_tokens_per_s
        if not rate:
            return None
        saved = result.tally.hit_tokens / rate
        return {
            "prefill_seconds_saved": saved,
            "prefill_seconds_saved_per_trace_second": saved / self.duration_s
            if self.duration_s > 0
            else math.nan,
        }

    def to_json(self) -> dict[str, Any]:
        bb = self.block_bytes
        results = []
        for r in self.results:
            j = r.to_json()
            if bb is not None and r.capacity_blocks is not None:
                j["capacity_bytes"] = r.capacity_blocks * bb
            saved = self.prefill_saved(r)
            if saved is not None:
                j.update(saved)
            results.append(j)
        advice = []
        for a in self.advice:
            j = asdict(a)
            if bb is not None:
                j["tier_bytes"] = {
                    t.name: None if t.capacity_blocks is None else t.capacity_blocks * bb
                    for t in a.tiers
                }
            advice.append(j)
        return {
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "block_tokens": self.block_tokens,
            "requests": self.requests,
            "blocks": self.blocks,
            "trace_duration_s": self.duration_s,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "block_bytes": bb,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "peak_rss_mib": self.peak_rss_mib,
            "hit_rate_definitions": {
                "block_hit_rate": "leading hit blocks / blocks looked up (ratio of sums)",
                "token_hit_rate": "min(hit blocks * block_tokens, input_length) / input tokens",
                "request_mean_hit_rate": "mean over requests with blocks of hit blocks / blocks",
            },
            "results": results,
            "advice": advice,
            "reference": self.reference,
        }


def peak_rss_mib() -> float:
    """Peak resident memory so far (MiB) of this process or of the largest finished sweep
    worker, whichever is larger (a forked worker shares the trace with this process)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, workers) / 1024


CSV_FIELDS = [
    "mode",
    "policy",
    "tiers",
    "capacity_blocks",
    "block_hit_rate",
    "token_hit_rate",
    "request_mean_hit_rate",
    "tier_block_hit_rate",
    "blocks",
    "hit_blocks",
    "promotions",
    "demotions",
    "evictions",
    "seconds",
    "lookups_per_s",
    "engine",
]


def _open_out(path: str | os.PathLike[str], what: str) -> Any:
    try:
        return open(path, "w", newline="", encoding="utf-8")
    except OSError as e:
        raise HitRateError(
            f"cannot write the {what} to {os.fspath(path)!r}: {e.strerror or e}"
        ) from e


def write_csv(path: str | os.PathLike[str], report: HitRateReport) -> None:
    """One row per result."""
    with _open_out(path, "CSV") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in report.results:
            j = r.to_json()
            w.writerow(
                [
                    r.mode,
                    r.policy,
                    ";".join(f"{t.name}:{t.capacity_blocks}" for t in r.tiers),
                    r.capacity_blocks,
                    f"{r.block_hit_rate:.6f}",
                    f"{r.token_hit_rate:.6f}",
                    f"{r.request_mean_hit_rate:.6f}",
                    ";".join(f"{k}:{v:.6f}" for k, v in r.tier_hit_rates().items()),
                    j["blocks"],
                    j["hit_blocks"],
                    r.promotions,
                    r.demotions,
                    r.evictions,
                    f"{r.seconds:.6f}",
                    f"{r.lookups_per_s:.0f}",
                    r.engine,
                ]
            )


def write_json(path: str | os.PathLike[str], report: HitRateReport) -> None:
    with _open_out(path, "JSON report") as f:
        json.dump(report.to_json(), f, indent=1)


def read_reference(path: str, block_tokens: int) -> list[tuple[float, float]]:
    """A published curve from CSV: a ``hit_rate`` column and ``capacity_blocks`` or
    ``capacity_tokens`` (turned into blocks of ``block_tokens``).

    Raises:
        HitRateError: unreadable, or without those columns.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise HitRateError(f"cannot read reference curve {path!r}: {e.strerror or e}") from e
    out: list[tuple[float, float]] = []
    for i, row in enumerate(rows, start=2):
        try:
            rate = float(row["hit_rate"])
            if row.get("capacity_blocks"):
                cap = float(row["capacity_blocks"])
            else:
                cap = float(row["capacity_tokens"]) / block_tokens
        except (KeyError, TypeError, ValueError) as e:
            raise HitRateError(
                f"{path}:{i}: a reference curve needs hit_rate and capacity_blocks or "
                f"capacity_tokens columns ({e!r})"
            ) from e
        out.append((cap, rate))
    if not out:
        raise HitRateError(f"reference curve {path!r} has no rows")
    return sorted(out)
