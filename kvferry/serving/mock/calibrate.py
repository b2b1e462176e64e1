"""The simulated engine calibrated from a ``kvferry profile`` of a real one (``kvferry serve mock
--profile DIR``): fit the timing model so the mock reproduces the profiled TTFT(ISL) and
ITL(context, batch).

A profile measures requests, not engine steps: a prefill point is the TTFT of one request of ISL
tokens alone (concurrency 1), a decode point the ITL of ``concurrency`` requests of ISL + OSL
tokens sent together. Which steps such a request spans depends on the scheduler: a long prompt
is prefilled in chunks of ``max_num_batched_tokens`` (TTFT is the sum of those steps), and while
the later requests of a decode point are still being prefilled, the earlier ones decode in
steps that carry those chunks too (so the measured ITL holds prefill work). The fit therefore
runs this mock's own scheduler dry (:meth:`MockEngine.dry_step`, with the calibrated mock's
config) on each point and sums the timing model's inputs over the steps each request spans;
the request's time is linear in the six coefficients (:mod:`kvferry.serving.mock.timing`), so
one non-negative least-squares fit over every point gives them, each point weighted by
1 / its time (relative errors, as the 10% check reads them). A decode point's mean ITL is
fitted (``itl_avg_ms``): its requests span different steps, and the mean over them is linear in
the coefficients, a median is not. A prefill point's median TTFT is fitted (``ttft_p50_ms``;
the mean where a profile has no median): its requests are alike and alone in the engine, so the
model gives each the same time and their median is that time too, while the engine's spread
around it is host noise (an odd slow step) that the mean would fit as if it were the model's.
Fitting the means there put the mock's TTFT 4-8% above the engine's median at held-out points
(vLLM on CPU, ``benchmarks/verify_plan.py``).

The profile's times are the engine's as a client saw them (HTTP included, in the base terms),
at whatever speed it ran: a profile of a sped-up mock gives a fast model. The calibrated mock's
``speedup_ratio`` divides the fitted times as any other.

It reads ``profile.json`` as :mod:`kvferry.bench.profile.report` writes it (the serving layer
does not import the lab: the few fields it needs are read here, and the lab's tests pin that a
profile they write calibrates). No other I/O.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kvferry.config.models import MockConfig
from kvferry.errors import ConfigError
from kvferry.serving.mock.scheduler import MockEngine, MockRequest, SamplingParams
from kvferry.serving.mock.timing import TimingModel, nonneg_lstsq
from kvferry.serving.mock.tokenizer import load_tokenizer

__all__ = [
    "PROFILE_JSON",
    "SlaProfile",
    "fit_sla_profile",
    "is_sla_profile",
    "profile_limits",
    "read_sla_profile",
    "request_features",
]

PROFILE_JSON = "profile.json"
"""The file ``kvferry profile --out DIR`` writes in DIR (the lab's ``PROFILE_JSON``)."""


@dataclass(frozen=True)
class SlaProfile:
    """What calibration reads of a ``kvferry profile``."""

    source: str
    max_context: int
    max_kv_tokens: int
    prefill: tuple[tuple[int, float], ...]
    """``(isl, ttft_avg_ms)`` per prefill point (concurrency 1)."""
    decode: tuple[tuple[int, int, int, float], ...]
    """``(isl, osl, concurrency, itl_avg_ms)`` per decode point."""


def _file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p / PROFILE_JSON if p.is_dir() else p


def is_sla_profile(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a ``kvferry profile --out`` directory (or its ``profile.json``),
    rather than a step-sample profile (:func:`kvferry.serving.mock.timing.load_profile`)."""
    p = Path(path)
    if p.is_dir():
        return True  # only a profile directory can be one; read_sla_profile says what is wrong
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("tool") == "profile"


def read_sla_profile(path: str | os.PathLike[str]) -> SlaProfile:
    """The points of a ``kvferry profile``: its directory or its ``profile.json``.

    Raises:
        ConfigError: no such file, not JSON, not a profile, or no usable point.
    """
    file = _file(path)
    where = f"--profile {os.fspath(path)}"
    try:
        data: Any = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(
            f"{where}: {file} not found; give a directory written by kvferry profile --out"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: {file} cannot be read: {e}") from e
    except ValueError as e:
        raise ConfigError(f"{where}: {file} is not JSON ({e})") from e
    if not isinstance(data, dict) or data.get("tool") != "profile":
        raise ConfigError(f"{where}: {file} is not a kvferry profile result (tool 'profile')")
    try:
        prefill = tuple(
            (int(p["isl"]), float(p.get("ttft_p50_ms") or p["ttft_avg_ms"]))
            for p in data.get("prefill") or []
            if _finite_positive(p.get("ttft_p50_ms") or p["ttft_avg_ms"])
        )
        decode = tuple(
            (int(p["isl"]), int(p["osl"]), int(p["concurrency"]), float(p["itl_avg_ms"]))
            for p in data.get("decode") or []
            if _finite_positive(p["itl_avg_ms"])
        )
        limits = int(data.get("max_context") or 0), int(data.get("max_kv_tokens") or 0)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {file} has a malformed point ({e!r})") from e
    if not prefill and not decode:
        raise ConfigError(f"{where}: the profile has no prefill or decode point to fit")
    return SlaProfile(os.fspath(path), *limits, prefill, decode)


def _finite_positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def profile_limits(config: MockConfig, profile: SlaProfile, keep: set[str]) -> MockConfig:
    """``config`` with the profiled engine's KV capacity (``num_blocks``, rounded up to whole
    blocks) and max context (``max_model_len``), except the keys in ``keep`` (set by the user).

    Raises:
        ConfigError: the result is not a valid config (a kept value contradicts the profile's).
    """
    update: dict[str, int] = {}
    if profile.max_kv_tokens > 0 and "num_blocks" not in keep:
        update["num_blocks"] = math.ceil(profile.max_kv_tokens / config.block_size)
    if profile.max_context > 0 and "max_model_len" not in keep:
        update["max_model_len"] = profile.max_context
    if not update:
        return config
    try:
        return MockConfig.model_validate({**config.model_dump(), **update})
    except ValueError as e:
        raise ConfigError(f"--profile {profile.source}: its limits {update} do not fit: {e}") from e


def request_features(
    config: MockConfig, isl: int, osl: int, concurrency: int
) -> tuple[list[float], list[float]]:
    """The mean TTFT and ITL of ``concurrency`` requests of ``isl`` + ``osl`` tokens sent
    together, as linear forms in the six coefficients ``(a, b, c, d, e, f)`` of
    :class:`TimingModel`: the sums of each step's model inputs over the steps the requests
    span, from a dry run of the scheduler with ``config`` (prompts share no prefix; the first
    request's first step runs before the others arrive)."""
    engine = MockEngine(config, load_tokenizer("", config.vocab_size), TimingModel())
    params = SamplingParams(max_tokens=osl, ignore_eos=True)
    vocab = config.vocab_size

    def submit(k: int) -> MockRequest:
        return engine.submit([2 + (k * 7919) % (vocab - 2)] + [1] * (isl - 1), params)

    # The first request finds the engine idle and starts a step alone; the others, sent a
    # moment later by the client, are admitted with the next step (a client's requests are
    # never simultaneous to the engine, and a step is longer than their spread).
    requests = [submit(0)]
    cumulative: list[list[float]] = []
    total = [0.0] * 6
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    while (work := engine.dry_step()) is not None:
        if len(requests) < concurrency:
            requests += [submit(k) for k in range(1, concurrency)]
        if work.chunks:
            total[0] += 1
            total[1] += sum(n for n, _ in work.chunks)
            total[2] += sum(n * (p + n) for n, p in work.chunks)
        if work.batch:
            total[3] += 1
            total[4] += work.batch
            total[5] += work.context_tokens
        cumulative.append(list(total))
        step = len(cumulative) - 1
        for k, r in enumerate(requests):
            if r.num_output_tokens and k not in first:
                first[k] = step
            if r.finish_reason is not None and k not in last:
                last[k] = step
    ttft = [0.0] * 6
    itl = [0.0] * 6
    for k in range(concurrency):
        start, end = cumulative[first[k]], cumulative[last[k]]
        for j in range(6):
            ttft[j] += start[j] / concurrency
            itl[j] += (end[j] - start[j]) / max(1, osl - 1) / concurrency
    return ttft, itl


def fit_sla_profile(
    profile: SlaProfile, config: MockConfig, base: TimingModel | None = None
) -> TimingModel:
    """The timing model whose requests, scheduled as ``config``'s mock schedules them, take the
    profile's times (module docstring). The prefill coefficients are fitted when the profile
    has prefill points at two ISLs or more, the decode ones when it has two decode points or
    more; the others, and ``speedup_ratio``, are ``base``'s (default: ``config``'s).

    Raises:
        ConfigError: a point does not fit the mock (prompt + output past its max_model_len).
    """
    model = base or TimingModel.from_config(config)
    current = [
        model.prefill_base_ms,
        model.prefill_per_token_ms,
        model.prefill_quadratic_ms,
        model.decode_base_ms,
        model.decode_per_seq_ms,
        model.decode_per_context_token_ms,
    ]
    rows: list[list[float]] = []
    ms: list[float] = []
    for isl, ttft_ms in profile.prefill:
        _check_fits(profile, config, isl, 1)
        rows.append(request_features(config, isl, 1, 1)[0])
        ms.append(ttft_ms)
    for isl, osl, concurrency, itl_ms in profile.decode:
        _check_fits(profile, config, isl, osl)
        rows.append(request_features(config, isl, osl, concurrency)[1])
        ms.append(itl_ms)
    fit_prefill = len({isl for isl, _ in profile.prefill}) >= 2
    fit_decode = len(profile.decode) >= 2
    use = (*((0, 1, 2) if fit_prefill else ()), *((3, 4, 5) if fit_decode else ()))
    if not use:
        return model
    # what the coefficients kept from base contribute is known: fit the rest to what is left;
    # each row over its time, so the fit weighs relative errors
    fixed = [j for j in range(6) if j not in use]
    left = [y - sum(row[j] * current[j] for j in fixed) for row, y in zip(rows, ms, strict=True)]
    scaled = [[v / y for v in row] for row, y in zip(rows, ms, strict=True)]
    target = [v / y for v, y in zip(left, ms, strict=True)]
    fitted = nonneg_lstsq(scaled, target, use)
    coef = [fitted[j] if j in use else current[j] for j in range(6)]
    return replace(
        model,
        prefill_base_ms=coef[0],
        prefill_per_token_ms=coef[1],
        prefill_quadratic_ms=coef[2],
        decode_base_ms=coef[3],
        decode_per_seq_ms=coef[4],
        decode_per_context_token_ms=coef[5],
    )


def _check_fits(profile: SlaProfile, config: MockConfig, isl: int, osl: int) -> None:
    if isl + osl > config.model_len:
        raise ConfigError(
            f"--profile {profile.source}: a point of {isl} + {osl} tokens exceeds the mock's "
            f"max_model_len {config.model_len}; raise --max-model-len / --num-blocks"
        )
