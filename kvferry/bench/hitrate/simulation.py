"""Simulation: a trace run through a TieredStore over memory tiers of given capacities, or
counted by a shortcut where that is exact; and the per-run result both modes return.

Per request the loop is what an engine does (:func:`serve`): ``lookup`` the leading cached
blocks, ``get`` them, ``put`` the blocks from the first miss on. The tiers are
:class:`~kvferry.backends.memory.MemoryTier` holding empty values, so a run costs only keys and
bookkeeping. Two shortcuts, on by default (``engine="auto"``), each taken only where its counts
are the store loop's block for block (tests hold them equal):

- ``stack``: LRU over one tier with exact capacities takes its counts from
  :class:`~kvferry.bench.hitrate.lru_stack.LruStack` (one pass answers every capacity);
- ``direct``: any other run over one tier drives the store's own eviction policy with the
  store's calls (:mod:`kvferry.bench.hitrate.direct`), without the store's index, tier dict,
  leases and statistics around it.

``engine="store"`` always runs the loop; a tier pipeline always does. The loops here are the
lab's hot paths: :mod:`benchmarks.hitrate_speed` measures them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

from kvferry.backends.base import Key
from kvferry.backends.memory import MemoryTier
from kvferry.bench.hitrate import direct
from kvferry.bench.hitrate.lru_stack import LruStack
from kvferry.bench.hitrate.spec import HitRateError, TierSpec
from kvferry.bench.traces import Trace, TraceRequest
from kvferry.config.models import KvferryConfig
from kvferry.store.tiered import TieredStore

__all__ = [
    "ENGINES",
    "SIM_SLOT_SIZE",
    "HitRateResult",
    "ProgressFn",
    "SimCase",
    "Tally",
    "serve",
    "sim_store_config",
    "simulate",
    "stack_refusal",
    "stack_result",
    "trace_keys",
]

ProgressFn = Callable[[int, int], None]
"""``(requests done, requests in all)``."""

ENGINES = ("auto", "store", "stack", "direct")
"""How a simulation counts: ``store`` runs the TieredStore loop, ``stack`` LRU's one-pass
shortcut, ``direct`` the policy driven without the store around it (each refused where it is not
exact); ``auto`` the stack where it is exact, else direct where it is, else the loop."""

SIM_SLOT_SIZE = 4096
"""``store.slot_size`` of a simulation: its values are empty, so the number only has to be valid."""


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
    """How the counts were made: "store" (the TieredStore loop, and every replay), "stack"
    (LRU's one-pass shortcut, :mod:`kvferry.bench.hitrate.lru_stack`) or "direct" (the policy
    driven without the store around it, :mod:`kvferry.bench.hitrate.direct`)."""

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

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HitRateResult:
        """Read what :meth:`to_json` wrote; the rates are derived, so they are recomputed from
        the counts, not read. A count the data lacks is 0; an engine, "store" (files written
        before the shortcuts counted every run with the loop).

        Raises:
            KeyError, TypeError, ValueError: not such a dict.
        """
        tally = Tally(**{f.name: data[f.name] for f in fields(Tally) if f.name in data})
        return cls(
            mode=data["mode"],
            policy=str(data["policy"]),
            tiers=[TierSpec(str(t["name"]), t["capacity_blocks"]) for t in data["tiers"]],
            tally=tally,
            tier_hit_blocks={str(k): int(v) for k, v in data["tier_hit_blocks"].items()},
            promotions=int(data["promotions"]),
            demotions=int(data["demotions"]),
            evictions=int(data["evictions"]),
            dropped=int(data["dropped"]),
            seconds=float(data["seconds"]),
            replay=data.get("replay"),
            engine=str(data.get("engine", "store")),
        )

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


@dataclass(frozen=True)
class SimCase:
    """One simulation run of a sweep."""

    policy: str
    tiers: list[TierSpec]

    @property
    def label(self) -> str:
        return f"{self.policy} {'+'.join(f'{t.name}:{t.capacity_blocks}' for t in self.tiers)}"
