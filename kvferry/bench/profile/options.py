"""Options of the SLA profiler (``kvferry profile``): what a profile is asked to do.

Owns :class:`ProfileOptions` (one field per flag, :meth:`~ProfileOptions.validate`) and the
profiler's error (:class:`ProfileError`). It sends nothing: :mod:`kvferry.bench.profile.harness`
runs the options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvferry.bench.endpoint.options import check_url
from kvferry.errors import ConfigError, KvferryError

__all__ = ["MODES", "ProfileError", "ProfileOptions"]

MODES = ("prefill", "decode", "both")


class ProfileError(KvferryError):
    """A profile cannot run or cannot be read: the engine's limits are unknown, a profile
    directory holds no profile, or too few points were measured to fit."""


@dataclass(frozen=True, kw_only=True)
class ProfileOptions:
    """Everything ``kvferry profile`` takes (its flags, one field each)."""

    url: str = "http://127.0.0.1:8000"
    """Base URL of the OpenAI-compatible server."""
    mode: str = "both"
    """``prefill``, ``decode`` or ``both``."""
    model: str = ""
    """Model name sent; empty = the first model of the server's /v1/models."""
    tokenizer: str = ""
    """Local Hugging Face tokenizer for exact prompt lengths; empty = word tokenizer."""
    max_context: int | None = None
    """Longest prompt + output in tokens; None = the server's /v1/models ``max_model_len``."""
    granularity: int = 12
    """Prefill points (ISLs); decode contexts are a third of it (at least 3)."""
    max_kv_tokens: int | None = None
    """KV capacity in tokens; None = the server's /kv/stats (kvferry mock) or /metrics
    ``cache_config_info`` (vLLM)."""
    max_concurrency: int = 64
    """Decode concurrency never exceeds this (nor the KV capacity)."""
    concurrency_points: int = 4
    """Concurrency levels per decode context (1 .. the clamp, geometric)."""
    point_timeout_s: float = 120.0
    """A point whose requests take longer is skipped (recorded) and the profile goes on."""
    prefill_requests: int = 3
    """Requests per prefill point (sequential, concurrency 1)."""
    prefill_osl: int = 2
    """Output tokens of a prefill request (TTFT is what is measured)."""
    decode_osl: int = 100
    """Output tokens of a decode request."""
    warmup_requests: int = 3
    """Requests sent before the first point of each mode and never counted."""
    seed: int = 0

    def validate(self) -> None:
        """Check every option.

        Raises:
            ConfigError: naming the flag, the value and what would be valid.
        """
        check_url(self.url)
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        checks: list[tuple[str, object, bool, str]] = [
            ("--granularity", self.granularity, 3 <= self.granularity <= 200, "3..200"),
            ("--max-concurrency", self.max_concurrency, self.max_concurrency >= 1, ">= 1"),
            ("--concurrency-points", self.concurrency_points, self.concurrency_points >= 1,
             ">= 1"),
            ("--point-timeout", self.point_timeout_s,
             math.isfinite(self.point_timeout_s) and self.point_timeout_s > 0, "> 0 s"),
            ("--prefill-requests", self.prefill_requests, self.prefill_requests >= 1, ">= 1"),
            ("--prefill-osl", self.prefill_osl, self.prefill_osl >= 1, ">= 1"),
            ("--decode-osl", self.decode_osl, self.decode_osl >= 2, ">= 2"),
            ("--warmup-requests", self.warmup_requests, self.warmup_requests >= 0, ">= 0"),
            ("--seed", self.seed, self.seed >= 0, ">= 0"),
        ]  # fmt: skip
        if self.max_context is not None:
            checks.append(
                ("--max-context", self.max_context, self.max_context >= 256, ">= 256 tokens")
            )
        if self.max_kv_tokens is not None:
            checks.append(("--max-kv-tokens", self.max_kv_tokens, self.max_kv_tokens >= 1, ">= 1"))
        for flag, value, ok, valid in checks:
            if not ok:
                raise ConfigError(f"{flag} must be {valid}, got {value!r}")

    @property
    def prefill(self) -> bool:
        return self.mode in ("prefill", "both")

    @property
    def decode(self) -> bool:
        return self.mode in ("decode", "both")
