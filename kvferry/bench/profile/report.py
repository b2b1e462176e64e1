"""The result of a profile (tool ``profile``): its measured points, what was skipped, the fit.

Owns :class:`ProfileReport` (a :class:`~kvferry.bench.result.BenchResult`) and its rows:
:class:`PrefillPoint`, :class:`DecodePoint`, :class:`SkippedPoint`. Throughputs are per
instance (the one engine behind the URL), where Dynamo's are per GPU. It measures nothing;
:mod:`kvferry.bench.profile.harness` fills it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvferry.bench.profile.fit import QuadraticFit, fit_quadratic
from kvferry.bench.profile.options import ProfileError, ProfileOptions
from kvferry.bench.result import BenchResult

__all__ = ["DecodePoint", "PrefillPoint", "ProfileReport", "SkippedPoint"]


@dataclass
class PrefillPoint:
    """One ISL at concurrency 1: its TTFT and the prefill tokens/s it implies."""

    isl: int
    ttft_avg_ms: float
    ttft_p50_ms: float
    requests: int

    @property
    def tokens_per_s(self) -> float:
        """Prefill throughput per instance: ISL / TTFT (Dynamo's isl/ttft*1000)."""
        return self.isl * 1000.0 / self.ttft_avg_ms if self.ttft_avg_ms > 0 else 0.0


@dataclass
class DecodePoint:
    """One (context, concurrency) of the decode grid."""

    isl: int
    osl: int
    concurrency: int
    kv_usage: float
    """x: (ISL + OSL/2) x concurrency / max KV tokens, the mean share of the KV cache in use."""
    itl_avg_ms: float
    itl_p50_ms: float
    tokens_per_s: float
    """Output tokens/s of the instance over the point."""
    requests: int

    @property
    def context_length(self) -> float:
        """y: the mean context while decoding, ISL + OSL/2."""
        return self.isl + self.osl / 2


@dataclass
class SkippedPoint:
    """A point that gave no figure, and why (a timeout, failed requests, the engine gone)."""

    mode: str
    label: str
    reason: str


@dataclass(kw_only=True)
class ProfileReport(BenchResult):
    """A whole profile of one engine (one candidate)."""

    tool = "profile"

    options: ProfileOptions
    model: str = ""
    url: str = ""
    max_context: int = 0
    max_kv_tokens: int = 0
    kv_source: str = ""
    """Where ``max_kv_tokens`` came from (``--max-kv-tokens``, ``/kv/stats``, ``/metrics``)."""
    prefill: list[PrefillPoint] = field(default_factory=list)
    decode: list[DecodePoint] = field(default_factory=list)
    skipped: list[SkippedPoint] = field(default_factory=list)
    aborted: str = ""
    """Non-empty when the profile stopped early (the engine went away, or a candidate's engine
    did not start): why. The points before are kept."""
    candidate: str = ""
    """The ``--candidate NAME=ARGS`` it profiled; empty for ``--url``."""

    @property
    def name(self) -> str:
        return self.model or self.url

    def prefill_fit(self) -> QuadraticFit | None:
        """TTFT(ISL) fitted by a quadratic; None with fewer than 3 points."""
        if len({p.isl for p in self.prefill}) < 3:
            return None
        return fit_quadratic([p.isl for p in self.prefill], [p.ttft_avg_ms for p in self.prefill])

    def require(self, what: str) -> None:
        """Raise unless the profile has points of ``what`` (``prefill`` or ``decode``).

        Raises:
            ProfileError: it has none.
        """
        if not getattr(self, what):
            raise ProfileError(
                f"the profile of {self.name} has no {what} points (run kvferry profile with "
                f"--mode {what} or both)"
            )
