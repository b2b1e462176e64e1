"""The report of a hit-rate run, on the lab's one result model, and its output formats.

Owns :class:`HitRateReport` (a :class:`~kvferry.bench.result.BenchResult`, tool ``hitrate``),
its JSON (the model's fields, then the trace's figures, the cases and the advice) and the
reading back of it and of the reports written before the model (:meth:`HitRateReport.from_legacy`),
and the CSV. It computes no hit rate: it holds what the runs returned.

In JSON each case keeps the shape :meth:`HitRateResult.to_json` gives it (the tally flattened, the
three hit rates and per-tier rates beside it), with ``capacity_bytes`` and the prefill saved added
where the report knows the block size and the prefill speed; the rates are derived, so a reader
recomputes them from the counts.
"""

from __future__ import annotations

import csv
import json
import math
import os
import resource
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from kvferry.bench.hitrate.advice import Advice
from kvferry.bench.hitrate.options import HitRateOptions
from kvferry.bench.hitrate.simulation import HitRateResult
from kvferry.bench.hitrate.spec import HitRateError
from kvferry.bench.result import (
    SCHEMA,
    BenchResult,
    Environment,
    Reference,
    ResultError,
    decode,
)

__all__ = [
    "CSV_FIELDS",
    "HIT_RATE_DEFINITIONS",
    "HitRateReport",
    "peak_rss_mib",
    "write_csv",
    "write_json",
]

HIT_RATE_DEFINITIONS = {
    "block_hit_rate": "leading hit blocks / blocks looked up (ratio of sums)",
    "token_hit_rate": "min(hit blocks * block_tokens, input_length) / input tokens",
    "request_mean_hit_rate": "mean over requests with blocks of hit blocks / blocks",
}
"""The three hit rates every case reports, as the JSON spells them out."""

REFERENCE_UNIT = "hit rate"
"""The unit of a reference curve's points (:attr:`Reference.value`); ``detail`` holds the
point's ``capacity_blocks``."""

_R = TypeVar("_R", bound="HitRateReport")


@dataclass(kw_only=True)
class HitRateReport(BenchResult):
    """Everything one hit-rate run measured: the trace's figures, one case per simulation or
    replay, the capacity advice, and a published curve's points as ``references``."""

    tool: ClassVar[str] = "hitrate"

    options: HitRateOptions = field(default_factory=HitRateOptions)
    source: str
    """The trace's file, or ``workload SPEC``."""
    block_tokens: int
    requests: int
    blocks: int
    """Blocks looked up over the whole trace."""
    distinct_blocks: int | None = None
    """Distinct blocks of the trace (None in reports written before it was recorded)."""
    trace_duration_s: float
    kv_bytes_per_token: int | None = None
    prefill_tokens_per_s: float | None = None
    peak_rss_mib: float = 0.0
    cases: list[HitRateResult] = field(default_factory=list, metadata={"json": False})
    """One per run, in the order they were asked for (written by :meth:`to_json` itself)."""
    advice: list[Advice] = field(default_factory=list)

    @property
    def block_bytes(self) -> int | None:
        return (
            None if self.kv_bytes_per_token is None else self.kv_bytes_per_token * self.block_tokens
        )

    def reference_curve(self) -> list[tuple[float, float]] | None:
        """(capacity in blocks, hit rate) of the published curve, when one was given."""
        points = [
            (float(r.detail["capacity_blocks"]), r.value)
            for r in self.references
            if r.unit == REFERENCE_UNIT and "capacity_blocks" in r.detail
        ]
        return points or None

    def reference_name(self) -> str | None:
        """The name the curve was given by (a path or a bundled name)."""
        return next((r.name for r in self.references if r.unit == REFERENCE_UNIT), None)

    def prefill_saved(self, result: HitRateResult) -> dict[str, float] | None:
        """Prefill compute a result saves: seconds in all and per second of trace."""
        rate = self.prefill_tokens_per_s
        if not rate:
            return None
        saved = result.tally.hit_tokens / rate
        return {
            "prefill_seconds_saved": saved,
            "prefill_seconds_saved_per_trace_second": saved / self.trace_duration_s
            if self.trace_duration_s > 0
            else math.nan,
        }

    def case_json(self, result: HitRateResult) -> dict[str, Any]:
        """One case as JSON: :meth:`HitRateResult.to_json`, with its capacity in bytes and the
        prefill it saves where the report knows them."""
        j = result.to_json()
        bb = self.block_bytes
        if bb is not None and result.capacity_blocks is not None:
            j["capacity_bytes"] = result.capacity_blocks * bb
        saved = self.prefill_saved(result)
        if saved is not None:
            j.update(saved)
        return j

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        bb = self.block_bytes
        out["block_bytes"] = bb
        out["hit_rate_definitions"] = dict(HIT_RATE_DEFINITIONS)
        out["cases"] = [self.case_json(r) for r in self.cases]
        if bb is not None:
            for a, j in zip(self.advice, out["advice"], strict=True):
                j["tier_bytes"] = {
                    t.name: None if t.capacity_blocks is None else t.capacity_blocks * bb
                    for t in a.tiers
                }
        return out

    @classmethod
    def from_json(cls: type[_R], data: Mapping[str, Any]) -> _R:
        """Read what :meth:`to_json` wrote, or a report written before the result model."""
        if not isinstance(data, Mapping) or data.get("schema") != SCHEMA:
            return super().from_json(data)  # the base refuses it or reads it as legacy
        report = super().from_json({k: v for k, v in data.items() if k != "cases"})
        report.cases = _cases(data.get("cases"))
        return report

    @classmethod
    def from_legacy(cls, data: Mapping[str, Any]) -> HitRateReport:
        """A report written by ``kvferry bench hitrate --json`` before the result model (its
        own ``schema_version`` 1, ``results`` and ``reference`` at the top level).

        Those files recorded no machine, config or options: the environment is left blank, the
        options are rebuilt from what the file holds, and a note says so.

        Raises:
            ResultError: not such a report, or a malformed one.
        """
        if "results" not in data or "hit_rate_definitions" not in data:
            raise ResultError(
                "not a hit-rate report: no schema field, and none of the older report's "
                "results and hit_rate_definitions"
            )
        try:
            cases = _cases(data["results"])
            policies = list(dict.fromkeys(c.policy for c in cases)) or ["lru"]
            options = HitRateOptions(
                trace=str(data["source"]),
                block_tokens=int(data["block_tokens"]),
                policies=policies,
                kv_bytes_per_token=data.get("kv_bytes_per_token"),
                replay=any(c.mode == "replay" for c in cases),
                prefill_tokens_per_s=data.get("prefill_tokens_per_s"),
            )
            return cls(
                environment=Environment(),
                options=options,
                source=str(data["source"]),
                block_tokens=int(data["block_tokens"]),
                requests=int(data["requests"]),
                blocks=int(data["blocks"]),
                trace_duration_s=float(data["trace_duration_s"]),
                kv_bytes_per_token=data.get("kv_bytes_per_token"),
                prefill_tokens_per_s=data.get("prefill_tokens_per_s"),
                peak_rss_mib=float(data.get("peak_rss_mib") or 0.0),
                cases=cases,
                advice=[decode(Advice, a) for a in data.get("advice") or []],
                references=reference_points("reference", data.get("reference") or []),
                notes=[
                    "read from a hit-rate report written before the result model: it recorded "
                    "no environment, config or options (options rebuilt from its results)"
                ],
            )
        except (TypeError, ValueError, KeyError) as e:
            raise ResultError(f"malformed hit-rate report (before the result model): {e!r}") from e


def _cases(items: Any) -> list[HitRateResult]:
    try:
        return [HitRateResult.from_json(c) for c in items or []]
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ResultError(f"malformed hitrate result: a case {e!r}") from e


def reference_points(name: str, curve: Any) -> list[Reference]:
    """A published curve's ``(capacity_blocks, hit_rate)`` points as references."""
    return [
        Reference(name, float(rate), REFERENCE_UNIT, {"capacity_blocks": float(cap)})
        for cap, rate in curve
    ]


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
    """One row per case."""
    with _open_out(path, "CSV") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in report.cases:
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
                    r.tally.blocks,
                    r.tally.hit_blocks,
                    r.promotions,
                    r.demotions,
                    r.evictions,
                    f"{r.seconds:.6f}",
                    f"{r.lookups_per_s:.0f}",
                    r.engine,
                ]
            )


def write_json(path: str | os.PathLike[str], report: HitRateReport) -> None:
    """:meth:`HitRateReport.to_json` to ``path``.

    Raises:
        HitRateError: the file cannot be written.
    """
    with _open_out(path, "JSON report") as f:
        json.dump(report.to_json(), f, indent=1)
