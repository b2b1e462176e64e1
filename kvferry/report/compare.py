"""A/B comparison of two sets of bench results: the same cases side by side, a ratio per metric
and a verdict per case (better, worse, within noise), with the noise band taken from the data.

Owns :func:`compare_results` (base results, head results -> :class:`Comparison`), the verdicts
(:class:`Verdict`) and the report section that shows them (:meth:`Comparison.section`). It
measures nothing and reads no file: the caller loads the results (``load_result``) and decides
what a regression costs (``kvferry report --compare BASE --fail-on-regression`` exits non-zero).

Matching. Results are compared tool by tool; within a tool, cases are matched by identity:

- transfer: contender label (``kvferry``, ``kvferry+transfer.workers=2``), op, block size, batch
  size, threads;
- store: backend, workload op (``batch-get``), value size, phase, the phase's op (``get``);
- hitrate: trace (file name), block tokens, mode, policy, tiers with their capacities;
- serve: load level (concurrency, request rate or trace schedule, and its in-flight cap);
- router: load (prefix ratio or trace) and policy.

A case on one side only is a verdict ``only in base`` / ``only in head`` (per metric), never
dropped; a tool on one side only matches nothing and says so in :attr:`Comparison.notes`. Options
outside the identity that differ between the sides (duration, transport, clients...) are listed
in the notes too: they are often the point of the A/B, and always what a reader must know.
Several results of one tool on one side whose cases share an identity (three runs of the same
command, or a pre-model serve-vs-aiperf file with one case per round) are rounds of that case:
its value is their median, its spread theirs.

Metrics, with their direction: transfer BW (GB/s, higher is better), P99 Tx (us, lower) and
initiator CPU seconds per GB (lower, when the run measured CPU); store ops/s and GB/s (higher)
and P99 latency (us, lower); hitrate block hit rate (higher; the section also gives the change
in percentage points); serve TTFT p50 and p99, ITL p50 (ms, lower), request throughput and
goodput (requests/s, higher); router TTFT p50 (ms, lower) and the workers' hit rate (higher).

Noise. ``ratio = head / base``; beyond ``1 + band`` in the metric's good direction it is
``better``, beyond ``1 - band`` in the bad one ``worse``, otherwise ``within noise``. The band:

- ``rounds``: where a side has per-round values of the case (transfer ``--rounds N``: each
  case's ``round_bw_gbps`` / ``round_p99_tx_us``, or in older files the per-round ratios of
  two contenders, :attr:`Ratio.rounds`; or several runs of one case, above), each side's spread
  is half the relative range of its rounds, ``(max - min) / 2 / median``, and the band is the
  sum of the two sides' (a side without rounds is taken to be as noisy as the other). A ratio
  beyond that band means, to first order, that the two sides' round ranges do not overlap:
  every round of one side beat every round of the other. The range, not a standard deviation:
  with the 3 to 8 rounds a bench runs, a standard deviation is itself too noisy to trust, and
  the range is what a reader sees in the rounds. The band is floored at :data:`MIN_BAND`:
  rounds seconds apart share the machine's state of the moment, so their spread understates
  how far two runs minutes apart can drift.
- ``default``: no per-round data: :data:`DEFAULT_BAND`.

Hit rates of a simulation are exact counts (an A/A gives a ratio of exactly 1), so for them the
band is a threshold of what matters, not a noise estimate.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kvferry.bench.result import BenchResult, encode
from kvferry.config.units import format_size_approx
from kvferry.errors import ConfigError
from kvferry.report.model import Finding, Section, Table

__all__ = [
    "BETTER",
    "DEFAULT_BAND",
    "MIN_BAND",
    "ONLY_BASE",
    "ONLY_HEAD",
    "WITHIN",
    "WORSE",
    "Comparison",
    "Verdict",
    "compare_results",
]

DEFAULT_BAND = 0.30
"""The band (+-30%) where a case has no per-round data, from A/A runs on this project's machine
(a 2-core VM shared with other builds; ``benchmarks/aa_noise.py`` prints these numbers).

Measured: the same command run twice or more in a row, every pair compared, the deviation of a
ratio being ``max(r, 1/r) - 1``. The 60 pairs of transfer cases recorded as repeat runs in
``benchmarks/results/*_runN.json`` (tcp and shm, 1 to 12 rounds, kvferry and Mooncake): BW
ratios 0.76-1.90, deviation median 0.10, 90th percentile 0.32, and +-5% holds only 30% of them,
+-10% 50%, +-20% 73%, +-30% 83%; CPU s/GB alike (90th percentile 0.32, 87% within +-30%).
Recorded for this band (load average 3.1-3.4 throughout): ``kvferry bench transfer --local
--transport tcp --start-block-size 4KiB --max-block-size 1MiB --start-batch-size 16
--max-batch-size 16 --max-threads 1 --duration 1 --warmup 0.3 --rounds 3`` twice
(``aa_transfer_tcp_run1/2.json``: BW ratios 0.83-1.90 over 9 block sizes, CPU s/GB 0.75-1.02)
and ``kvferry bench store --backend cpu --duration 3 --warmup 1`` six times
(``aa_store_cpu_run1-6.json``: ops/s ratios 0.64-3.19, P99 0.04-20.8, as other jobs came and
went). So +-5%, the band a quiet dedicated machine may support, would call 70% of this
machine's A/A pairs better or worse; +-30% holds ~85% of single transfer runs. Store runs
moved more than that here: compare several runs per side (their spread is then the band), and
pass a narrower band (``kvferry report --noise-band``) where your own A/A supports it."""

MIN_BAND = 0.05
"""The floor of a band derived from rounds (+-5%). Three rounds within 1% of each other happen by
chance (the range of 3 draws is about 1.7 standard deviations), and rounds seconds apart
cannot see a change of the machine between two runs: in the transfer A/A above, the 1 MiB case
moved 1.24x while its two runs' 3 rounds each spread +-8% and +-10%."""

BETTER = "better"
WORSE = "worse"
WITHIN = "within noise"
ONLY_BASE = "only in base"
ONLY_HEAD = "only in head"

BandSource = Literal["rounds", "default"]

HIT_RATE_UNIT = "hit rate"
"""The unit of a hit rate (a fraction of lookups, shown in %)."""

MAX_REGRESSION_FINDINGS = 12
"""Regressions listed one finding each, per tool; the rest are counted in one more finding (the
table has every row)."""


@dataclass
class Verdict:
    """One metric of one case, base against head."""

    tool: str
    case: str
    metric: str
    unit: str
    higher_is_better: bool
    base: float | None
    head: float | None
    ratio: float | None
    """``head / base``; None where a side lacks the value or base is 0."""
    band: float
    """The noise band used, as a fraction (0.05 = +-5%)."""
    band_source: str
    """``rounds`` (from the runs' per-round spread) or ``default``."""
    verdict: str
    """``better``, ``worse``, ``within noise``, ``only in base`` or ``only in head``."""

    @property
    def evidence(self) -> str:
        """One line: the case, both values, the ratio and the band it was read against."""
        ratio = "" if self.ratio is None else f" (x{self.ratio:.3f}"
        if ratio:
            ratio += f", band +-{self.band:.1%} from {self.band_source})"
        return (
            f"{self.tool} {self.case}: {self.metric} base {_value(self.base, self.unit)} -> "
            f"head {_value(self.head, self.unit)}{ratio}"
        )


@dataclass
class Comparison:
    """Every verdict of a base-against-head comparison, and what the reader must know beside
    them (:attr:`notes`)."""

    base_sources: list[str]
    head_sources: list[str]
    verdicts: list[Verdict]
    default_band: float
    notes: list[str] = field(default_factory=list)
    """Tools on one side only, options that differ between the sides, the machines and
    commits of each side."""

    def regressions(self) -> list[Verdict]:
        """The verdicts ``worse``: a metric of a case beyond the noise band in its bad
        direction."""
        return [v for v in self.verdicts if v.verdict == WORSE]

    def improvements(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.verdict == BETTER]

    def counts(self) -> dict[str, int]:
        """Verdicts by kind, every kind present (0 where none)."""
        out = dict.fromkeys((BETTER, WORSE, WITHIN, ONLY_BASE, ONLY_HEAD), 0)
        for v in self.verdicts:
            out[v.verdict] += 1
        return out

    def section(self) -> Section:
        """The comparison as a report section: a table per tool (case, metric, base, head,
        ratio, band, verdict), a finding per regression and one per tool for improvements."""
        counts = self.counts()
        summary = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
        intro = [
            f"Head ({_listing(self.head_sources)}) against base ({_listing(self.base_sources)}): "
            f"{len(self.verdicts)} metric(s) of matched cases"
            + (f": {summary}." if summary else "."),
            "Ratio = head / base. A verdict is better or worse when the ratio is beyond "
            "1 +- band in the metric's good or bad direction (↑ higher is better, ↓ lower is "
            "better), else within noise. Band from rounds: half the relative range of each "
            f"side's rounds, summed, at least +-{MIN_BAND:.0%}; default: "
            f"+-{self.default_band:.1%} where a case has no rounds (from A/A runs: BENCHMARKS.md, "
            "A/B compare).",
            *self.notes,
        ]
        section = Section(title="Comparison: head against base", anchor="compare")
        section.intro = "\n\n".join(intro)
        for tool, verdicts in _by_tool(self.verdicts).items():
            section.tables.append(_table(tool, verdicts))
            section.findings.extend(_findings(tool, verdicts))
        if not self.verdicts:
            section.findings.append(
                Finding(
                    "warn",
                    "Nothing to compare",
                    "No case of base matched a case of head: no tool has results on both sides.",
                    evidence="; ".join(self.notes) or "no results",
                    recommendation="Compare results of the same bench (transfer with "
                    "transfer, store with store, ...).",
                )
            )
        return section


# --- matching --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Metric:
    name: str
    unit: str
    higher_is_better: bool


@dataclass
class _Row:
    """One case of one result: its identity, label, and each metric's value and rounds."""

    key: tuple[Any, ...]
    label: str
    values: dict[_Metric, float | None]
    rounds: dict[_Metric, list[float]] = field(default_factory=dict)


@dataclass
class _Case:
    """A case of one side: the rows of every result that share its identity, merged."""

    label: str
    values: dict[_Metric, float | None]
    rounds: dict[_Metric, list[float]]


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


TRANSFER_BW = _Metric("BW", "GB/s", True)
TRANSFER_P99 = _Metric("P99 Tx", "us", False)
TRANSFER_CPU = _Metric("CPU s/GB", "s/GB", False)
STORE_OPS = _Metric("ops/s", "ops/s", True)
STORE_GBPS = _Metric("GB/s", "GB/s", True)
STORE_P99 = _Metric("P99 latency", "us", False)
BLOCK_HIT_RATE = _Metric("block hit rate", HIT_RATE_UNIT, True)
SERVE_TTFT_P50 = _Metric("TTFT p50", "ms", False)
SERVE_TTFT_P99 = _Metric("TTFT p99", "ms", False)
SERVE_ITL_P50 = _Metric("ITL p50", "ms", False)
SERVE_THROUGHPUT = _Metric("request throughput", "requests/s", True)
SERVE_GOODPUT = _Metric("goodput", "requests/s", True)
ROUTER_TTFT_P50 = _Metric("TTFT p50", "ms", False)
ROUTER_HIT_RATE = _Metric("hit rate", HIT_RATE_UNIT, True)


def _transfer_rows(result: BenchResult) -> list[_Row]:
    from kvferry.bench.transfer.report import BW, P99

    # older files keep no per-case rounds, only two contenders' per-round ratios: their spread
    # stands in for each contender's own (both took part in every round)
    ratio_rounds: dict[tuple[str, str, str], list[float]] = {}
    for r in result.ratios:
        if len(r.rounds) >= 2:
            for label in (r.subject, r.reference):
                ratio_rounds.setdefault((label, r.case, r.metric), list(r.rounds))
    rows = []
    for c in getattr(result, "cases", []):
        case = c.case
        values = {
            TRANSFER_BW: _finite(c.bw_gbps),
            TRANSFER_P99: _finite(c.transfer_us.p99) if c.transfer_us.count else None,
            TRANSFER_CPU: _finite(c.cpu_s_per_gb) if c.initiator_cpu_s > 0 else None,
        }
        rounds = {
            TRANSFER_BW: list(c.round_bw_gbps) or ratio_rounds.get((c.backend, case.label, BW), []),
            TRANSFER_P99: list(c.round_p99_tx_us)
            or ratio_rounds.get((c.backend, case.label, P99), []),
        }
        label = (
            f"{c.backend} {c.op} {format_size_approx(c.block_size)} x{c.batch_size} t{c.threads}"
        )
        key = (c.backend, c.op, c.block_size, c.batch_size, c.threads)
        rows.append(_Row(key, label, values, rounds))
    return rows


def _store_rows(result: BenchResult) -> list[_Row]:
    options = result.options  # type: ignore[attr-defined]
    rows = []
    for p in getattr(result, "phases", []):
        key = (options.backend, options.op, options.value_size, p.phase, p.op)
        size = format_size_approx(options.value_size)
        label = f"{options.backend} {options.op} {size}, {p.phase} ({p.op})"
        values = {
            STORE_OPS: _finite(p.ops_per_s),
            STORE_GBPS: _finite(p.gbps),
            STORE_P99: _finite(p.latency_us.p99) if p.latency_us.count else None,
        }
        rows.append(_Row(key, label, values))
    return rows


def _hitrate_rows(result: BenchResult) -> list[_Row]:
    trace = os.path.basename(str(getattr(result, "source", "")))
    block_tokens = getattr(result, "block_tokens", 0)
    rows = []
    for h in getattr(result, "cases", []):
        tiers = tuple((t.name, t.capacity_blocks) for t in h.tiers)
        key = (trace, block_tokens, h.mode, h.policy, tiers)
        where = "+".join(f"{name}:{'unbounded' if cap is None else cap}" for name, cap in tiers)
        if len(tiers) == 1:
            cap = tiers[0][1]
            where = "unbounded" if cap is None else f"{cap} blocks"
        label = f"{h.policy} {where}" + (" (replay)" if h.mode == "replay" else "")
        label += f" [{trace}]" if trace else ""
        rows.append(_Row(key, label, {BLOCK_HIT_RATE: _finite(h.block_hit_rate)}))
    return rows


def _serve_rows(result: BenchResult) -> list[_Row]:
    rows = []
    for lv in getattr(result, "cases", []):
        level = lv.level
        m = lv.metrics
        values = {
            SERVE_TTFT_P50: _finite(m.value("time_to_first_token", "p50")),
            SERVE_TTFT_P99: _finite(m.value("time_to_first_token", "p99")),
            SERVE_ITL_P50: _finite(m.value("inter_token_latency", "p50")),
            SERVE_THROUGHPUT: _finite(m.value("request_throughput")),
        }
        if "goodput" in m.metrics:
            values[SERVE_GOODPUT] = _finite(m.value("goodput"))
        label = level.label + (f" (cap {level.max_concurrency})" if level.max_concurrency else "")
        rows.append(_Row((level.kind, level.value, level.max_concurrency), label, values))
    return rows


def _router_rows(result: BenchResult) -> list[_Row]:
    rows = []
    for c in getattr(result, "cases", []):
        load = f"prefix ratio {c.label}" if c.prefix_ratio is not None else c.label
        values = {ROUTER_TTFT_P50: _finite(c.ttft_p50_ms), ROUTER_HIT_RATE: _finite(c.hit_rate)}
        rows.append(_Row((c.label, c.policy), f"{load}, {c.policy}", values))
    return rows


_ROWS: dict[str, Callable[[BenchResult], list[_Row]]] = {
    "transfer": _transfer_rows,
    "store": _store_rows,
    "hitrate": _hitrate_rows,
    "serve": _serve_rows,
    "router": _router_rows,
}
"""Each tool's cases as rows; a tool not here (a later bench) is noted, not compared."""


def _side(results: Sequence[BenchResult]) -> dict[str, dict[tuple[Any, ...], _Case]]:
    """tool -> identity -> case, in the order the results list them. Rows sharing an identity
    are rounds of one case (module docstring)."""
    grouped: dict[str, dict[tuple[Any, ...], list[_Row]]] = {}
    for result in results:
        rows = _ROWS.get(result.tool)
        if rows is None:
            grouped.setdefault(result.tool, {})
            continue
        for row in rows(result):
            grouped.setdefault(result.tool, {}).setdefault(row.key, []).append(row)
    out: dict[str, dict[tuple[Any, ...], _Case]] = {}
    for tool, by_key in grouped.items():
        cases = out.setdefault(tool, {})
        for key, rows_ in by_key.items():
            metrics = list(dict.fromkeys(m for r in rows_ for m in r.values))
            values: dict[_Metric, float | None] = {}
            rounds: dict[_Metric, list[float]] = {}
            for m in metrics:
                seen = [v for r in rows_ if (v := r.values.get(m)) is not None]
                if len(rows_) == 1:
                    values[m] = rows_[0].values.get(m)
                    rounds[m] = list(rows_[0].rounds.get(m, []))
                else:  # several runs of the case: each is a round
                    values[m] = statistics.median(seen) if seen else None
                    rounds[m] = seen
            cases[key] = _Case(rows_[0].label, values, rounds)
    return out


# --- noise and verdicts ----------------------------------------------------------------------


def _half_range(rounds: Sequence[float]) -> float | None:
    """Half the relative range of ``rounds``: ``(max - min) / 2 / median``; None with fewer
    than two rounds or a median of 0."""
    finite = [r for r in rounds if math.isfinite(r)]
    if len(finite) < 2:
        return None
    mid = statistics.median(finite)
    if mid == 0:
        return None
    return (max(finite) - min(finite)) / 2 / abs(mid)


def _band(
    base_rounds: Sequence[float], head_rounds: Sequence[float], default: float
) -> tuple[float, BandSource]:
    known = [s for s in (_half_range(base_rounds), _half_range(head_rounds)) if s is not None]
    if not known:
        return default, "default"
    # a side without rounds is taken to be as noisy as the other
    spread = sum(known) if len(known) == 2 else 2 * known[0]
    return max(MIN_BAND, spread), "rounds"


def _decide(metric: _Metric, base: float, head: float, band: float) -> tuple[float | None, str]:
    if base == 0:
        if head == 0:
            return None, WITHIN
        up = head > 0
        return None, BETTER if up == metric.higher_is_better else WORSE
    ratio = head / base
    if ratio > 1 + band:
        return ratio, BETTER if metric.higher_is_better else WORSE
    if ratio < 1 - band:
        return ratio, WORSE if metric.higher_is_better else BETTER
    return ratio, WITHIN


def _verdicts(
    tool: str,
    base: dict[tuple[Any, ...], _Case],
    head: dict[tuple[Any, ...], _Case],
    default_band: float,
) -> list[Verdict]:
    out = []
    for key in [*base, *(k for k in head if k not in base)]:
        b, h = base.get(key), head.get(key)
        label = (b or h).label  # type: ignore[union-attr]  # one of them is there
        metrics = list(dict.fromkeys([*(b.values if b else {}), *(h.values if h else {})]))
        for m in metrics:
            bv = b.values.get(m) if b else None
            hv = h.values.get(m) if h else None
            if bv is None and hv is None:
                continue  # neither side measured it (no CPU time, no goodput)
            band, source = _band(
                b.rounds.get(m, []) if b else [], h.rounds.get(m, []) if h else [], default_band
            )
            if bv is None or hv is None:
                verdict, ratio = (ONLY_HEAD if bv is None else ONLY_BASE), None
            else:
                ratio, verdict = _decide(m, bv, hv, band)
            out.append(
                Verdict(
                    tool=tool,
                    case=label,
                    metric=m.name,
                    unit=m.unit,
                    higher_is_better=m.higher_is_better,
                    base=bv,
                    head=hv,
                    ratio=ratio,
                    band=band,
                    band_source=source,
                    verdict=verdict,
                )
            )
    return out


# --- notes -----------------------------------------------------------------------------------


def _describe(result: BenchResult) -> str:
    """A result without a file name: its tool, start time, host and commit."""
    env = result.environment
    when = (
        time.strftime("%Y-%m-%d %H:%M", time.localtime(result.started_at))
        if result.started_at
        else "time not recorded"
    )
    commit = f" @ {env.git_commit[:10]}" if env.git_commit else ""
    dirty = " (dirty)" if env.git_dirty else ""
    host = f" on {env.host}" if env.host else ""
    return f"{result.tool} {when}{host}{commit}{dirty}"


def _listing(items: Sequence[str], most: int = 4) -> str:
    if not items:
        return "no results"
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def _option_values(results: Iterable[BenchResult]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in results:
        options = getattr(r, "options", None)
        if options is None:
            continue
        encoded = encode(options)
        if isinstance(encoded, dict):
            for k, v in encoded.items():
                out.setdefault(k, set()).add(repr(v))
    return out


def _machine(results: Sequence[BenchResult]) -> str:
    hosts = sorted({r.environment.host for r in results if r.environment.host})
    commits = sorted(
        {
            r.environment.git_commit[:10] + ("+dirty" if r.environment.git_dirty else "")
            for r in results
            if r.environment.git_commit
        }
    )
    parts = [f"host {', '.join(hosts)}" if hosts else "host not recorded"]
    parts.append(f"commit {', '.join(commits)}" if commits else "commit not recorded")
    return "; ".join(parts)


def _notes(base: Sequence[BenchResult], head: Sequence[BenchResult]) -> list[str]:
    notes = [f"Base: {_machine(base)}. Head: {_machine(head)}."] if base or head else []
    base_tools = list(dict.fromkeys(r.tool for r in base))
    head_tools = list(dict.fromkeys(r.tool for r in head))
    for tool in base_tools + [t for t in head_tools if t not in base_tools]:
        on_base = [r for r in base if r.tool == tool]
        on_head = [r for r in head if r.tool == tool]
        if tool not in _ROWS:
            notes.append(f"{tool}: no comparison is defined for this bench; not compared.")
            continue
        if not on_base or not on_head:
            present, where, missing = (
                (on_base, "base", "head") if on_base else (on_head, "head", "base")
            )
            cases = sum(len(_ROWS[tool](r)) for r in present)
            notes.append(
                f"{tool}: {len(present)} result(s) with {cases} case(s) on {where} only, none "
                f"on {missing}: not compared."
            )
            continue
        b, h = _option_values(on_base), _option_values(on_head)
        differ = [
            f"{k} {'/'.join(sorted(b.get(k, {'-'})))} -> {'/'.join(sorted(h.get(k, {'-'})))}"
            for k in dict.fromkeys([*b, *h])
            if b.get(k) != h.get(k)
        ]
        if differ:
            notes.append(f"{tool} options differ (base -> head): " + "; ".join(differ) + ".")
    return notes


# --- the entry point -------------------------------------------------------------------------


def compare_results(
    base: Sequence[BenchResult],
    head: Sequence[BenchResult],
    *,
    default_band: float = DEFAULT_BAND,
    base_sources: Sequence[str] | None = None,
    head_sources: Sequence[str] | None = None,
) -> Comparison:
    """Compare ``head`` against ``base``, case by case and metric by metric (module docstring).

    Args:
        base: the results before the change (any benches, in any order).
        head: the results after it.
        default_band: the noise band (a fraction: 0.05 = +-5%) where a case has no rounds.
        base_sources: how to name the base results (their files); by default each result's
            tool, start time, host and commit.
        head_sources: the same for head.

    Returns:
        Every verdict, base's cases first in their order, then head's new ones, and the notes.

    Raises:
        ConfigError: ``default_band`` is not a fraction in [0, 1).
    """
    if not isinstance(default_band, int | float) or not 0 <= default_band < 1:
        raise ConfigError(
            f"noise band {default_band!r}: expected a fraction in [0, 1), e.g. 0.05 for +-5%"
        )
    left, right = _side(base), _side(head)
    verdicts: list[Verdict] = []
    for tool in left:
        if tool in right and tool in _ROWS:
            verdicts.extend(_verdicts(tool, left[tool], right[tool], float(default_band)))
    return Comparison(
        base_sources=list(base_sources)
        if base_sources is not None
        else [_describe(r) for r in base],
        head_sources=list(head_sources)
        if head_sources is not None
        else [_describe(r) for r in head],
        verdicts=verdicts,
        default_band=float(default_band),
        notes=_notes(base, head),
    )


# --- the section -----------------------------------------------------------------------------

COLUMNS = ["Case", "Metric", "Base", "Head", "Ratio", "Band", "Verdict"]
"""The columns of each tool's table."""


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == HIT_RATE_UNIT:
        return f"{100 * value:.2f}%"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f} {unit}"
    return f"{value:.4g} {unit}"


def _ratio_cell(v: Verdict) -> str:
    if v.ratio is None:
        return "-"
    cell = f"{v.ratio:.3f}"
    if v.unit == HIT_RATE_UNIT and v.base is not None and v.head is not None:
        cell += f" ({100 * (v.head - v.base):+.2f} pp)"  # a rate's change in points, too
    return cell


def _by_tool(verdicts: Sequence[Verdict]) -> dict[str, list[Verdict]]:
    out: dict[str, list[Verdict]] = {}
    for v in verdicts:
        out.setdefault(v.tool, []).append(v)
    return out


def _table(tool: str, verdicts: Sequence[Verdict]) -> Table:
    rows = [
        [
            v.case,
            f"{v.metric} {'↑' if v.higher_is_better else '↓'}",
            _value(v.base, v.unit),
            _value(v.head, v.unit),
            _ratio_cell(v),
            f"±{v.band:.1%} ({v.band_source})",
            v.verdict,
        ]
        for v in verdicts
    ]
    sources = sorted({v.band_source for v in verdicts})
    return Table(
        columns=list(COLUMNS),
        rows=rows,
        title=f"{tool}: head against base",
        numeric=[False, False, True, True, True, True, False],
        note=(
            "Ratio = head / base (hit rates: and the change in percentage points). "
            f"Bands from: {', '.join(sources)}. ↑ higher is better, ↓ lower is better."
        ),
    )


def _findings(tool: str, verdicts: Sequence[Verdict]) -> list[Finding]:
    out: list[Finding] = []
    worse = [v for v in verdicts if v.verdict == WORSE]
    for v in worse[:MAX_REGRESSION_FINDINGS]:
        out.append(
            Finding(
                "bad",
                f"{tool} {v.case}: {v.metric} worse",
                f"{v.metric} moved beyond the noise band in its bad direction "
                f"({'lower' if v.higher_is_better else 'higher'} is worse).",
                evidence=v.evidence,
                recommendation="Rerun both sides with --rounds to confirm; if it holds, "
                "bisect the commits between base and head.",
            )
        )
    if len(worse) > MAX_REGRESSION_FINDINGS:
        rest = worse[MAX_REGRESSION_FINDINGS:]
        out.append(
            Finding(
                "bad",
                f"{tool}: {len(rest)} more regression(s)",
                "Further metrics worse beyond noise; the table lists every one.",
                evidence="; ".join(f"{v.case} {v.metric}" for v in rest),
            )
        )
    better = [v for v in verdicts if v.verdict == BETTER]
    if better:

        def gain(v: Verdict) -> float:
            r = v.ratio if v.ratio else 1.0
            return r if v.higher_is_better else 1 / r

        best = sorted(better, key=gain, reverse=True)[:3]
        out.append(
            Finding(
                "good",
                f"{tool}: {len(better)} metric(s) better beyond noise",
                "Head beats base beyond the noise band; the largest gains are the evidence.",
                evidence="; ".join(v.evidence for v in best),
            )
        )
    return out
