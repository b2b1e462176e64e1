"""How long the simulated engine (``kvferry serve mock``) takes per step: a timing model, pure.

One engine step runs the prefill chunks of the requests being prefilled and one decode token
for every request being decoded, as one forward pass. Its time is modelled as::

    prefill_ms = a + b * sum(n_i) + c * sum(n_i * (p_i + n_i))     (only if some n_i > 0)
    decode_ms  = d + e * batch_size + f * context_tokens            (only if batch_size > 0)
    step_ms    = (prefill_ms + decode_ms) / speedup_ratio

where ``n_i`` are the tokens request ``i`` computes in this step (its uncached prompt tokens, or
a chunk of them) and ``p_i`` the tokens before them (cached prefix + earlier chunks): the ``c``
term is attention, each new token attending to every token up to it, so ``c * n^2`` for a prompt
with no cached prefix. ``context_tokens`` is the sum of the decoding requests' lengths (their
KV is read once per step).

Defaults (``TimingModel()``) are plausible for an 8B model in bf16 on one H100-class GPU under
vLLM: prefill a = 5 ms, b = 0.07 ms/token (about 14k tokens/s), c = 6e-7 ms/token^2 (40 ms
more at 8k tokens); decode d = 7 ms (reading 16 GB of weights at about 2.5 TB/s effective, plus
launch overhead), e = 0.04 ms per sequence, f = 5e-5 ms per context token (128 KiB of KV per
token at 2.5 TB/s). So one 1000-token request prefills in about 76 ms and decodes at about
7 ms/token; 64 requests with 2000-token contexts decode at about 16 ms/step.

:func:`fit_profile` fits the coefficients to measurements of a real engine by least squares
with non-negative coefficients; :func:`load_profile` reads and validates such a profile.
Profile format: a JSON list (or ``{"samples": [...]}``) of

- ``{"kind": "prefill", "tokens": N, "ms": X}``, optionally ``"cached_tokens": P`` (the
  request had P cached tokens before its N computed ones; 0 if absent);
- ``{"kind": "decode", "batch": B, "context_tokens": C, "ms": X}``.

This module does no I/O besides :func:`load_profile` reading its one file, and owns no clock:
the engine sleeps for the times it returns.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kvferry.errors import ConfigError

if TYPE_CHECKING:
    from kvferry.config.models import MockConfig

__all__ = [
    "ProfileSample",
    "TimingModel",
    "fit_profile",
    "load_profile",
    "nonneg_lstsq",
    "parse_profile",
]


@dataclass(frozen=True)
class TimingModel:
    """Coefficients of the step-time model (module docstring); all times in milliseconds.

    Raises:
        ConfigError: a coefficient is negative or not finite, or ``speedup_ratio`` is not
            positive.
    """

    prefill_base_ms: float = 5.0
    """a: milliseconds of a step that prefills anything, besides its tokens."""
    prefill_per_token_ms: float = 0.07
    """b: milliseconds per token prefilled."""
    prefill_quadratic_ms: float = 6e-7
    """c: milliseconds per (new token x context token up to it)."""
    decode_base_ms: float = 7.0
    """d: milliseconds of a step that decodes anything, besides its batch."""
    decode_per_seq_ms: float = 0.04
    """e: milliseconds per sequence in the decode batch."""
    decode_per_context_token_ms: float = 5e-5
    """f: milliseconds per context token of the decode batch."""
    speedup_ratio: float = 1.0
    """Every time is divided by this (10: the simulated engine is 10x faster)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(
                    f"timing {f.name} must be a finite non-negative number, got {value!r}"
                )
        if self.speedup_ratio <= 0:
            raise ConfigError(
                f"timing speedup_ratio must be positive (1 = real time), got {self.speedup_ratio}"
            )

    @classmethod
    def from_config(cls, config: MockConfig) -> TimingModel:
        """The coefficients of a ``mock`` config section (without its profile)."""
        return cls(
            prefill_base_ms=config.prefill_base_ms,
            prefill_per_token_ms=config.prefill_per_token_ms,
            prefill_quadratic_ms=config.prefill_quadratic_ms,
            decode_base_ms=config.decode_base_ms,
            decode_per_seq_ms=config.decode_per_seq_ms,
            decode_per_context_token_ms=config.decode_per_context_token_ms,
            speedup_ratio=config.speedup_ratio,
        )

    def prefill_ms(self, chunks: Sequence[tuple[int, int]]) -> float:
        """Milliseconds to prefill ``chunks`` in one step.

        Args:
            chunks: one ``(new_tokens, prior_tokens)`` per request: the tokens it computes now
                and the tokens before them (cached prefix and earlier chunks).

        Returns:
            0.0 when no chunk has new tokens, else ``(a + b*sum(n) + c*sum(n*(p+n)))``
            divided by ``speedup_ratio``.
        """
        total = 0
        quadratic = 0
        for new, prior in chunks:
            total += new
            quadratic += new * (prior + new)
        if total <= 0:
            return 0.0
        ms = (
            self.prefill_base_ms
            + self.prefill_per_token_ms * total
            + self.prefill_quadratic_ms * quadratic
        )
        return ms / self.speedup_ratio

    def decode_ms(self, batch_size: int, context_tokens: int) -> float:
        """Milliseconds of one decode step of ``batch_size`` sequences holding
        ``context_tokens`` tokens in all (0.0 for an empty batch)."""
        if batch_size <= 0:
            return 0.0
        ms = (
            self.decode_base_ms
            + self.decode_per_seq_ms * batch_size
            + self.decode_per_context_token_ms * context_tokens
        )
        return ms / self.speedup_ratio

    def step_ms(
        self, chunks: Sequence[tuple[int, int]], batch_size: int, context_tokens: int
    ) -> float:
        """Milliseconds of one engine step: its prefill chunks plus its decode batch."""
        return self.prefill_ms(chunks) + self.decode_ms(batch_size, context_tokens)


@dataclass(frozen=True)
class ProfileSample:
    """One measured step of a real engine (see the module docstring for the JSON form)."""

    kind: Literal["prefill", "decode"]
    ms: float
    tokens: int = 0
    """prefill: tokens computed."""
    cached_tokens: int = 0
    """prefill: tokens of cached prefix before them."""
    batch: int = 0
    """decode: sequences in the batch."""
    context_tokens: int = 0
    """decode: context tokens of the batch."""


_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind -> (required count fields, optional count fields)
    "prefill": (("tokens",), ("cached_tokens",)),
    "decode": (("batch", "context_tokens"), ()),
}


def parse_profile(data: object, *, source: str = "profile") -> list[ProfileSample]:
    """Validate decoded profile JSON (a list of samples, or ``{"samples": [...]}``).

    Args:
        data: the decoded JSON.
        source: how to name the profile in messages (its path).

    Raises:
        ConfigError: the shape is wrong, a sample has an unknown kind, a missing, unknown or
            negative field, or ``ms`` is not a positive number; the message names the sample's
            index and field.
    """
    if isinstance(data, Mapping):
        if set(data) != {"samples"}:
            raise ConfigError(
                f"{source}: expected a list of samples or an object with one key 'samples', "
                f"got keys {sorted(map(str, data))}"
            )
        data = data["samples"]
    if not isinstance(data, list):
        raise ConfigError(f"{source}: expected a list of samples, got {type(data).__name__}")
    samples: list[ProfileSample] = []
    for i, item in enumerate(data):
        where = f"{source}: sample {i}"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: expected an object, got {type(item).__name__}")
        kind = item.get("kind")
        if kind not in _FIELDS:
            raise ConfigError(f"{where}: kind must be 'prefill' or 'decode', got {kind!r}")
        required, optional = _FIELDS[kind]
        allowed = {"kind", "ms", *required, *optional}
        unknown = sorted(str(k) for k in item if k not in allowed)
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {', '.join(unknown)} for kind {kind!r}; "
                f"valid fields: {', '.join(sorted(allowed))}"
            )
        ms = item.get("ms")
        if (
            isinstance(ms, bool)
            or not isinstance(ms, int | float)
            or not math.isfinite(ms)
            or ms <= 0
        ):
            raise ConfigError(f"{where}: ms must be a positive number of milliseconds, got {ms!r}")
        counts: dict[str, int] = {}
        for name in (*required, *optional):
            if name not in item:
                if name in required:
                    raise ConfigError(f"{where}: missing field {name!r} (kind {kind!r})")
                continue
            value = item[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}: {name} must be a non-negative integer, got {value!r}")
            counts[name] = value
        if kind == "prefill" and counts["tokens"] < 1:
            raise ConfigError(f"{where}: tokens must be at least 1 for a prefill, got 0")
        if kind == "decode" and counts["batch"] < 1:
            raise ConfigError(f"{where}: batch must be at least 1 for a decode, got 0")
        samples.append(ProfileSample(kind=kind, ms=float(ms), **counts))
    if not samples:
        raise ConfigError(f"{source}: has no samples; give prefill and/or decode samples")
    return samples


def load_profile(path: str | os.PathLike[str]) -> list[ProfileSample]:
    """Read and validate a JSON profile file (module docstring).

    Raises:
        ConfigError: the file is missing, unreadable, not JSON, or not a valid profile.
    """
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"timing profile {name} not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"timing profile {name} cannot be read: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"timing profile {name} is not valid JSON: {e}") from e
    return parse_profile(data, source=f"timing profile {name}")


def fit_profile(
    samples: Sequence[ProfileSample | Mapping[str, object]],
    *,
    base: TimingModel | None = None,
) -> TimingModel:
    """Fit the coefficients to measured samples by least squares, each coefficient >= 0.

    The prefill samples fit a, b, c; the decode samples fit d, e, f. A kind with no samples
    keeps ``base``'s coefficients, as does ``speedup_ratio``.

    Args:
        samples: :class:`ProfileSample` objects or their JSON dicts.
        base: where unfitted coefficients come from; the defaults if None.

    Returns:
        The fitted model.

    Raises:
        ConfigError: a sample is invalid, or a kind's samples cannot determine its
            coefficients (fewer than two distinct prefill sizes; decode samples whose batch
            and context_tokens do not both vary independently).
    """
    parsed = [
        s if isinstance(s, ProfileSample) else parse_profile([s], source=f"sample {i}")[0]
        for i, s in enumerate(samples)
    ]
    if not parsed:
        raise ConfigError("timing profile has no samples; give prefill and/or decode samples")
    model = base or TimingModel()
    prefill = [s for s in parsed if s.kind == "prefill"]
    decode = [s for s in parsed if s.kind == "decode"]
    if prefill:
        sizes = {(s.tokens, s.cached_tokens) for s in prefill}
        if len({s.tokens for s in prefill}) < 2:
            raise ConfigError(
                "timing profile: prefill samples need at least two different token counts to "
                f"fit a and b, got tokens {sorted({s.tokens for s in prefill})}"
            )
        rows = [[1.0, s.tokens, s.tokens * (s.cached_tokens + s.tokens)] for s in prefill]
        # Without a third distinct size a, b and c are not all determined: fit a and b only.
        use = (0, 1, 2) if len(sizes) >= 3 else (0, 1)
        a, b, c = nonneg_lstsq(rows, [s.ms for s in prefill], use)
        model = replace(model, prefill_base_ms=a, prefill_per_token_ms=b, prefill_quadratic_ms=c)
    if decode:
        rows = [[1.0, s.batch, s.context_tokens] for s in decode]
        if _rank(rows) < 3:
            raise ConfigError(
                "timing profile: decode samples must vary batch and context_tokens "
                "independently to fit d, e and f (at least 3 samples, not all with the same "
                f"context per sequence); got {len(decode)} sample(s) with batches "
                f"{sorted({s.batch for s in decode})}"
            )
        d, e, f = nonneg_lstsq(rows, [s.ms for s in decode], (0, 1, 2))
        model = replace(model, decode_base_ms=d, decode_per_seq_ms=e, decode_per_context_token_ms=f)
    return model


def _rank(rows: list[list[float]]) -> int:
    import numpy as np

    return int(np.linalg.matrix_rank(np.asarray(rows, dtype=np.float64)))


def nonneg_lstsq(
    rows: list[list[float]], ms: list[float], use: tuple[int, ...]
) -> tuple[float, ...]:
    """Least squares over the columns ``use`` with every coefficient >= 0 (the other columns'
    coefficients are 0); one coefficient per column.

    Exact for these tiny problems: every subset of the columns is solved unconstrained and the
    best subset whose solution is non-negative wins (an NNLS optimum is the unconstrained
    optimum on its set of positive coefficients). Columns are scaled to unit norm first, since
    token counts and token^2 differ by orders of magnitude.
    """
    import numpy as np

    x = np.asarray(rows, dtype=np.float64)
    y = np.asarray(ms, dtype=np.float64)
    norms = np.linalg.norm(x, axis=0)
    norms[norms == 0] = 1.0
    scaled = x / norms
    best: tuple[float, np.ndarray] | None = None
    for k in range(len(use), 0, -1):
        for subset in itertools.combinations(use, k):
            cols = list(subset)
            coef, *_ = np.linalg.lstsq(scaled[:, cols], y, rcond=None)
            if np.any(coef < 0):
                continue
            full = np.zeros(x.shape[1])
            full[cols] = coef
            residual = float(np.sum((scaled @ full - y) ** 2))
            if best is None or residual < best[0] - 1e-12 * max(1.0, residual):
                best = (residual, full)
    if best is None:  # every subset negative: only when every ms is <= 0, which parse rejects
        raise ConfigError("timing profile: no non-negative fit exists for these samples")
    out = best[1] / norms
    return tuple(float(v) for v in out)
