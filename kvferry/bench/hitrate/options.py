"""What one hit-rate run does: :class:`HitRateOptions`, its validation, and the simulation
cases it expands to.

Owns the options a Python caller and ``kvferry bench hitrate`` both give
(:func:`kvferry.bench.hitrate.run` takes them), their checks (each a one-line
:class:`~kvferry.errors.ConfigError` naming the option and what would be valid) and
:func:`expand_cases`. It reads no trace and runs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvferry.bench.hitrate.simulation import ENGINES, SimCase
from kvferry.bench.hitrate.spec import TierSpec, kv_bytes_per_token, parse_capacity, parse_tiers
from kvferry.bench.traces import DEFAULT_BLOCK_TOKENS
from kvferry.errors import ConfigError
from kvferry.store.eviction import load_policy

__all__ = ["FRACTIONS", "HitRateOptions", "expand_cases", "search_tiers"]

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
"""Default sweep: these fractions of the trace's distinct blocks."""


@dataclass(frozen=True, kw_only=True)
class HitRateOptions:
    """One hit-rate run: its input, what it sweeps, and how it counts.

    Exactly one of ``trace`` and ``workload`` is the input. A simulation (the default) runs
    every policy over every tier pipeline of :func:`expand_cases`; a ``replay`` runs every
    policy against the tiers of the config with real bytes. :meth:`validate` checks what can be
    checked before the trace is read; ``run`` calls it.
    """

    trace: str | None = None
    """A Mooncake-format JSONL file, or a bundled trace's name (``mooncake-synthetic``)."""
    workload: str | None = None
    """A generated workload instead: ``NAME[:KEY=VALUE,...]`` (see ``kvferry workload``)."""
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    """Tokens per hash id of the trace; a workload's default (its own ``block_tokens=`` wins)."""
    strict: bool = False
    """Fail on the first bad record of ``trace`` instead of skipping it."""
    keep_mismatched: bool = False
    """Keep records whose hash_ids count does not match input_length (aiperf keeps them)."""
    policies: list[str] = field(default_factory=lambda: ["lru"])
    """Eviction policies (the store's registry: lru, lfu, fifo, length-aware, ...)."""
    capacities: list[int | str] = field(default_factory=list)
    """Capacities to sweep: blocks (``5000``) or sizes (``"4GiB"``, which need the KV
    geometry); empty: :data:`FRACTIONS` of the trace's distinct blocks."""
    tiers: str | None = None
    """A tier pipeline, fastest first, ``"cpu:5000,disk:50000"``; leave the last capacity out
    (``"cpu:5000,disk"``) to sweep it over ``capacities`` or search it for the target. None:
    one ``cpu`` tier per capacity."""
    kv_bytes_per_token: int | None = None
    """KV bytes per token (K and V, all layers); or give ``model_kv``."""
    model_kv: str | None = None
    """KV geometry ``"layers,kv_heads,head_dim,dtype"`` (``"32,8,128,bf16"``: 128 KiB/token)."""
    exact_capacity: bool = True
    """Simulation: True evicts exactly down to capacity (only what a put needs, when a tier is
    full: watermarks 1.0 and 0), as the reference simulators (Mooncake's, aiperf's) do, so a hit
    rate is a function of capacity alone. False keeps the config's batch eviction
    (``store.evict_start_threshold``, ``store.evict_ratio``): what a kvferry store of that size,
    and a replay of it, would hit. A replay always runs the store as configured."""
    engine: str = "auto"
    """Simulation: how to count, one of :data:`~kvferry.bench.hitrate.ENGINES`."""
    jobs: int | None = None
    """Simulation runs at once, each in a forked process; None: one per CPU; 1: one after the
    other in this process."""
    replay: bool = False
    """Replay against the configured store with real bytes (needs the KV geometry)."""
    speedup: float | None = None
    """Replay at the trace's timestamps divided by this; None: as fast as possible."""
    target_hit_rate: float | None = None
    """Capacity advice: the smallest capacity of the last tier reaching this block hit rate."""
    prefill_tokens_per_s: float | None = None
    """Prefill speed of the engine: the report adds prefill compute saved per trace second."""
    reference: str | None = None
    """A published curve to read the results against: a CSV (``hit_rate`` and
    ``capacity_blocks`` or ``capacity_tokens``) or a bundled one (``mooncake-fig9``)."""

    def validate(self) -> None:
        """Check every option that needs no trace.

        Raises:
            ConfigError: naming the option, its value and what would be valid.
        """
        if self.trace is None and self.workload is None:
            raise ConfigError("no input: give trace (a file) or workload (NAME[:KEY=VALUE,...])")
        if self.trace is not None and self.workload is not None:
            raise ConfigError("give trace or workload as the input, not both")
        if isinstance(self.block_tokens, bool) or not isinstance(self.block_tokens, int):
            raise ConfigError(f"block_tokens must be a whole number >= 1, got {self.block_tokens}")
        if self.block_tokens < 1:
            raise ConfigError(f"block_tokens must be a whole number >= 1, got {self.block_tokens}")
        if not self.policies:
            raise ConfigError("--policy: give at least one policy, e.g. lru,lfu")
        for name in self.policies:
            load_policy(name)  # an unknown name fails here, before any run
        if self.kv_bytes_per_token is not None and self.model_kv is not None:
            raise ConfigError("give the KV geometry once: kv_bytes_per_token or model_kv")
        if self.kv_bytes_per_token is not None and self.kv_bytes_per_token < 1:
            raise ConfigError(
                f"kv_bytes_per_token must be a whole number >= 1, got {self.kv_bytes_per_token}"
            )
        self.geometry()  # a bad model_kv fails here
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.jobs is not None and self.jobs < 1:
            raise ConfigError(f"jobs must be at least 1 (or None: one per CPU), got {self.jobs}")
        _positive("speedup", self.speedup)
        _positive("prefill_tokens_per_s", self.prefill_tokens_per_s)
        target = self.target_hit_rate
        if target is not None and not 0 < target <= 1:
            raise ConfigError(f"target_hit_rate must be in (0, 1], got {target}")
        if self.replay:
            if self.geometry() is None:
                raise ConfigError(
                    "--replay moves real bytes: give the KV geometry with --kv-bytes-per-token "
                    "or --model-kv"
                )
            if self.capacities or self.tiers or self.target_hit_rate:
                raise ConfigError(
                    "--replay runs the configured store: size its tiers in the config "
                    "(e.g. --set cpu.capacity=4GiB); --capacity, --tiers and "
                    "--target-hit-rate are for simulation"
                )

    def geometry(self) -> int | None:
        """KV bytes per token from ``kv_bytes_per_token`` or ``model_kv``; None when neither.

        Raises:
            ConfigError: a malformed ``model_kv``.
        """
        if self.kv_bytes_per_token:
            return int(self.kv_bytes_per_token)
        if self.model_kv:
            return kv_bytes_per_token(self.model_kv)
        return None


def _positive(name: str, value: float | None) -> None:
    if value is not None and (not value > 0 or math.isinf(value)):
        raise ConfigError(f"{name} must be a number > 0, got {value}")


def expand_cases(options: HitRateOptions, block_bytes: int | None, distinct: int) -> list[SimCase]:
    """The simulations of ``options``: every policy over every tier pipeline, policy-major.

    The pipelines are ``tiers`` as given, its open last tier swept over ``capacities``, or one
    cpu tier per capacity; capacities default to :data:`FRACTIONS` of ``distinct`` blocks.

    Raises:
        ConfigError: a bad capacity or tier, or capacities with a closed last tier.
    """
    return [
        SimCase(policy, tiers)
        for policy in options.policies
        for tiers in _pipelines(options, block_bytes, distinct)
    ]


def _pipelines(
    options: HitRateOptions, block_bytes: int | None, distinct: int
) -> list[list[TierSpec]]:
    given = [str(c) for c in options.capacities if str(c).strip()]
    if given:
        caps = [parse_capacity(c, block_bytes) for c in given]
    else:
        caps = sorted({max(1, int(distinct * f)) for f in FRACTIONS})
    if not options.tiers:
        return [[TierSpec("cpu", c)] for c in caps]
    tiers = parse_tiers(options.tiers, block_bytes)
    if tiers[-1].capacity_blocks is not None:
        if given:
            raise ConfigError(
                "--capacity sweeps the last tier of --tiers; leave its capacity out "
                "(e.g. --tiers cpu:5000,disk --capacity 10000,50000)"
            )
        return [tiers]
    if not given and options.target_hit_rate:
        return []  # only advice was asked for
    return [[*tiers[:-1], TierSpec(tiers[-1].name, c)] for c in caps]


def search_tiers(options: HitRateOptions, block_bytes: int | None) -> list[TierSpec]:
    """The pipeline capacity advice searches: ``tiers`` (its last tier searched, the others as
    given), or one open cpu tier."""
    base = parse_tiers(options.tiers, block_bytes) if options.tiers else []
    return base or [TierSpec("cpu", None)]
