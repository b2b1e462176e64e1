"""SLA selection over profiles (``kvferry plan``, ``kvferry profile --ttft --itl``).

Owns :func:`plan`: among candidates (one profile each),

- prefill: the highest prefill tokens/s per instance whose TTFT meets the target: at the
  target ISL (TTFT interpolated linearly between the measured ISLs) when one is given, else
  over the measured points (Dynamo's rule);
- decode: the highest output tokens/s per instance whose ITL meets the target: along the KV
  usage axis at the target context (ISL + OSL/2) of the interpolated surface
  (:func:`kvferry.bench.profile.fit.interp_at`, only between measured contexts; nearest
  outside them) when ISL and OSL are given, else over the measured points;
- ties (equal throughput) go to the lower latency, then to the earlier candidate, then to the
  lower ISL or KV usage, so a plan never depends on dict order;
- infeasible: no candidate meets the target; the closest one (lowest latency) is given with
  how much it misses by;
- replicas for a load (``request_rate``, ``isl``, ``osl``): ``ceil(load / tokens/s per
  instance)`` per stage, prefill load = rate x ISL, decode load = rate x OSL, with the margin
  (capacity over load, minus 1).

Pure: it reads reports, measures nothing and prints nothing (:meth:`Plan.lines` is the text).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kvferry.bench.profile.fit import GRID_SIZE, interp_1d, interp_at
from kvferry.bench.profile.report import ProfileReport
from kvferry.errors import ConfigError

__all__ = ["Choice", "Plan", "Replicas", "plan"]


@dataclass
class Choice:
    """What a stage picks (or, infeasible, the closest miss)."""

    stage: str
    candidate: str
    feasible: bool
    latency_ms: float
    """TTFT (prefill) or ITL (decode) at the choice."""
    target_ms: float
    tokens_per_s: float
    """Per instance: prefill tokens/s, or output tokens/s."""
    isl: float
    """Prefill: the ISL; decode: the context length (ISL + OSL/2)."""
    kv_usage: float | None = None
    """Decode: the share of the KV cache in use."""
    concurrency: float | None = None
    """Decode: requests in flight at that KV usage."""

    @property
    def miss_ms(self) -> float:
        return self.latency_ms - self.target_ms

    @property
    def metric(self) -> str:
        return "TTFT" if self.stage == "prefill" else "ITL"

    def line(self) -> str:
        where = (
            f"ISL {self.isl:,.0f}"
            if self.stage == "prefill"
            else f"context {self.isl:,.0f}, KV usage {100 * (self.kv_usage or 0):.1f}% "
            f"(~{self.concurrency or 0:.1f} requests)"
        )
        tput = f"{self.tokens_per_s:,.0f} tokens/s per instance"
        if self.feasible:
            return (
                f"{self.stage}: {self.candidate} at {where}: {self.metric} "
                f"{self.latency_ms:.3g} ms <= target {self.target_ms:g} ms, {tput}"
            )
        pct = 100 * self.miss_ms / self.target_ms
        return (
            f"{self.stage}: infeasible: no candidate meets {self.metric} {self.target_ms:g} ms; "
            f"closest: {self.candidate} at {where}: {self.metric} {self.latency_ms:.3g} ms, "
            f"misses by {self.miss_ms:.3g} ms (+{pct:.0f}%), {tput}"
        )


@dataclass
class Replicas:
    stage: str
    load_tokens_per_s: float
    per_instance_tokens_per_s: float
    count: int

    @property
    def margin(self) -> float:
        """Capacity of ``count`` instances over the load, minus 1 (0.25 = 25% headroom)."""
        return self.count * self.per_instance_tokens_per_s / self.load_tokens_per_s - 1

    def line(self) -> str:
        return (
            f"{self.stage}: {self.count} instance(s): load {self.load_tokens_per_s:,.0f} "
            f"tokens/s, {self.per_instance_tokens_per_s:,.0f} per instance, margin "
            f"{100 * self.margin:+.0f}%"
        )


@dataclass
class Plan:
    ttft_ms: float
    itl_ms: float
    isl: int | None = None
    osl: int | None = None
    request_rate: float | None = None
    prefill: Choice | None = None
    decode: Choice | None = None
    replicas: list[Replicas] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return all(c.feasible for c in (self.prefill, self.decode) if c is not None)

    def lines(self) -> list[str]:
        out = [c.line() for c in (self.prefill, self.decode) if c is not None]
        if self.replicas:
            out.append(
                f"replicas for {self.request_rate:g} requests/s (ISL {self.isl}, OSL {self.osl}):"
            )
            out += ["  " + r.line() for r in self.replicas]
        out += self.notes
        out.append(
            "SLA met" if self.feasible else "SLA infeasible: no candidate meets every target"
        )
        return out


def _best(options: list[tuple[float, float, int, float, Choice]]) -> Choice:
    """Highest throughput, then lowest latency, candidate order, lower x."""
    options.sort(key=lambda o: (-o[0], o[1], o[2], o[3]))
    return options[0][4]


def _closest(options: list[tuple[float, float, int, float, Choice]]) -> Choice:
    options.sort(key=lambda o: (o[1], -o[0], o[2], o[3]))
    return options[0][4]


def _pick(stage: str, options: list[tuple[float, float, int, float, Choice]]) -> Choice:
    if not options:
        raise ConfigError(f"no {stage} points in the profiles to choose from")
    ok = [o for o in options if o[4].feasible]
    return _best(ok) if ok else _closest(options)


def _prefill_options(
    reports: Sequence[ProfileReport], names: Sequence[str], ttft_ms: float, isl: int | None
) -> list[tuple[float, float, int, float, Choice]]:
    out = []
    for k, (r, name) in enumerate(zip(reports, names, strict=True)):
        if not r.prefill:
            continue
        if isl is not None:
            ttft = interp_1d([p.isl for p in r.prefill], [p.ttft_avg_ms for p in r.prefill], isl)
            pts = [(float(isl), ttft, isl * 1000.0 / ttft if ttft > 0 else 0.0)]
        else:
            pts = [(float(p.isl), p.ttft_avg_ms, p.tokens_per_s) for p in r.prefill]
        for x, ttft, tput in pts:
            c = Choice("prefill", name, ttft <= ttft_ms, ttft, ttft_ms, tput, x)
            out.append((tput, ttft, k, x, c))
    return out


def _decode_options(
    reports: Sequence[ProfileReport],
    names: Sequence[str],
    itl_ms: float,
    context: float | None,
) -> list[tuple[float, float, int, float, Choice]]:
    out = []
    for k, (r, name) in enumerate(zip(reports, names, strict=True)):
        if not r.decode:
            continue
        xs = [p.kv_usage for p in r.decode]
        ys = [p.context_length for p in r.decode]
        if context is not None:
            gx = np.linspace(min(xs), max(xs), GRID_SIZE)
            gy = np.array([context])
            itls = [p.itl_avg_ms for p in r.decode]
            tputs = [p.tokens_per_s for p in r.decode]
            # only cells between measured rows: a nearest-filled cell carries another point's
            # figures (another context), not this context's
            itl = interp_at(xs, ys, itls, gx, gy, fill=False)[0]
            if np.isnan(itl).all():  # the context is outside the measured ones: nearest
                itl = interp_at(xs, ys, itls, gx, gy)[0]
                tput = interp_at(xs, ys, tputs, gx, gy)[0]
            else:
                tput = interp_at(xs, ys, tputs, gx, gy, fill=False)[0]
            pts = [
                (float(x), context, float(i), float(t))
                for x, i, t in zip(gx, itl, tput, strict=True)
                if not np.isnan(i)
            ]
        else:
            pts = [(p.kv_usage, p.context_length, p.itl_avg_ms, p.tokens_per_s) for p in r.decode]
        for x, y, itl_v, tput_v in pts:
            conc = x * r.max_kv_tokens / y if y > 0 else 0.0
            c = Choice("decode", name, itl_v <= itl_ms, itl_v, itl_ms, tput_v, y, x, conc)
            out.append((tput_v, itl_v, k, x, c))
    return out


def plan(
    reports: Sequence[ProfileReport],
    *,
    ttft_ms: float,
    itl_ms: float,
    names: Sequence[str] | None = None,
    request_rate: float | None = None,
    isl: int | None = None,
    osl: int | None = None,
) -> Plan:
    """Pick prefill and decode over ``reports`` (module docstring).

    Args:
        reports: one profile per candidate; a stage none of them measured is left out.
        names: the candidates' names (default: each profile's model or URL).
        request_rate, isl, osl: the load; replicas are counted when all three are given.

    Raises:
        ConfigError: a bad target or load, or no profile with any point.
    """
    for flag, v in (("--ttft", ttft_ms), ("--itl", itl_ms)):
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{flag} must be a number of ms > 0, got {v!r}")
    for flag, n in (("--isl", isl), ("--osl", osl)):
        if n is not None and n < 1:
            raise ConfigError(f"{flag} must be >= 1 token, got {n!r}")
    if request_rate is not None and not (math.isfinite(request_rate) and request_rate > 0):
        raise ConfigError(f"--request-rate must be > 0 requests/s, got {request_rate!r}")
    if request_rate is not None and (isl is None or osl is None):
        raise ConfigError("--request-rate needs --isl and --osl (the load's token lengths)")
    if not reports:
        raise ConfigError("no profile to plan from: give --profile DIR")
    labels = list(names) if names is not None else [r.name for r in reports]
    result = Plan(ttft_ms, itl_ms, isl, osl, request_rate)
    pre = _prefill_options(reports, labels, ttft_ms, isl)
    context = isl + osl / 2 if isl is not None and osl is not None else None
    dec = _decode_options(reports, labels, itl_ms, context)
    if not pre and not dec:
        raise ConfigError("the profiles have no prefill or decode points to plan from")
    result.prefill = _pick("prefill", pre) if pre else None
    result.decode = _pick("decode", dec) if dec else None
    if request_rate is not None and isl is not None and osl is not None:
        for choice, tokens in ((result.prefill, isl), (result.decode, osl)):
            if choice is None:
                continue
            if not choice.feasible or choice.tokens_per_s <= 0:
                result.notes.append(
                    f"no {choice.stage} replica count: the {choice.stage} SLA is infeasible"
                )
                continue
            need = request_rate * tokens
            count = max(1, math.ceil(need / choice.tokens_per_s))
            result.replicas.append(Replicas(choice.stage, need, choice.tokens_per_s, count))
    return result
