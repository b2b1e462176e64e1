"""Time-weighted load curves of one run of the endpoint bench (aiperf's sweep-line metrics),
pure numpy.

Owns the ``effective_*``, ``active_*`` and ``tokens_in_flight`` metrics: step functions of
time built from every request's interval (aiperf 0.13 ``aiperf/analysis/sweepline*.py`` and
``metrics/accumulator_sweeps.py``, ported definition for definition), summarised over the
run's window. No records, no files: :mod:`kvferry.bench.endpoint.aggregate` passes arrays.

Per request ``i``: ``start`` (sent), ``gen`` (first content response = start + TTFT), ``end``
(aiperf's request end: the last streamed message), ``isl``, ``osl`` and the gaps between its
content responses (``icl``); NaN where a request has none (a failed request has no ``gen``).

- ``effective_concurrency``: requests in ``[start, end)``; ``..._prefill_concurrency``: in
  ``[start, gen)``; ``..._decode_concurrency``: in ``[gen, end)``.
- ``effective_prefill_throughput``: each request adds ``isl / (gen - start)`` tokens/s over
  ``[start, gen)``.
- ``effective_decode_throughput``: each request spreads ``osl - 1`` tokens evenly over its
  non-zero content gaps (``(osl - 1) / n_gaps / gap`` over each gap); without any gaps in the
  run, ``(osl - 1) / (end - gen)`` over ``[gen, end)``.
- ``effective_total_throughput``: prefill plus ``(osl - 1) / (end - gen)`` over ``[gen, end)``.
- ``effective_{decode,prefill}_throughput_per_user``: the throughput divided by the phase's
  concurrency (0 where none is in that phase).
- ``tokens_in_flight``: ``isl`` from start to end, plus the output tokens as they arrive (one
  at ``gen``, then ``(osl - 1) / n_gaps`` at each later content response).

Statistics are time-weighted over the window ``[window_start, window_end]``: avg = integral /
window, std likewise, min/max over the segments that last, p50/p90/p95/p99 by cumulative
duration (the first segment value whose cumulative share reaches q). ``active_*`` weigh only
the segments where the phase has a request in flight (decode, prefill, or any for total).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["SWEEP_METRICS", "SweepInputs", "SweepStats", "sweep_stats"]

FloatArray = npt.NDArray[np.float64]
Curve = tuple[FloatArray, FloatArray]
NS_PER_S = 1e9

SWEEP_METRICS: dict[str, tuple[str, str]] = {
    "effective_concurrency": ("Effective Concurrency", "requests"),
    "effective_decode_throughput": ("Effective Decode Throughput", "tokens/sec"),
    "effective_prefill_throughput": ("Effective Prefill Throughput", "tokens/sec"),
    "effective_decode_concurrency": ("Effective Decode Concurrency", "requests"),
    "effective_prefill_concurrency": ("Effective Prefill Concurrency", "requests"),
    "effective_total_throughput": ("Effective Total Throughput", "tokens/sec"),
    "effective_decode_throughput_per_user": (
        "Effective Decode Throughput Per User",
        "tokens/sec/user",
    ),
    "effective_prefill_throughput_per_user": (
        "Effective Prefill Throughput Per User",
        "tokens/sec/user",
    ),
    "tokens_in_flight": ("Tokens In Flight", "tokens"),
    "active_decode_throughput": ("Active Decode Throughput", "tokens/sec"),
    "active_prefill_throughput": ("Active Prefill Throughput", "tokens/sec"),
    "active_decode_throughput_per_user": ("Active Decode Throughput Per User", "tokens/sec/user"),
    "active_prefill_throughput_per_user": (
        "Active Prefill Throughput Per User",
        "tokens/sec/user",
    ),
    "active_total_throughput": ("Active Total Throughput", "tokens/sec"),
}
"""Tag -> (header, unit), in aiperf's order."""

_EMPTY: Curve = (np.zeros(0), np.zeros(0))


@dataclass(frozen=True)
class SweepStats:
    """Time-weighted statistics of one curve (all 0 when it has no segment in the window)."""

    avg: float = 0.0
    min: float = 0.0
    max: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    std: float = 0.0

    def scaled(self, k: float) -> SweepStats:
        return SweepStats(*(v * k for v in (self.avg, self.min, self.max, self.p50, self.p90,
                                            self.p95, self.p99, self.std)))  # fmt: skip


@dataclass(frozen=True)
class SweepInputs:
    """Per-request arrays (ns and tokens, NaN where missing) and the content gaps (ns)."""

    start: FloatArray
    gen: FloatArray
    end: FloatArray
    isl: FloatArray
    osl: FloatArray
    icl: list[FloatArray]
    """Per request, the gaps between its content responses (empty for one response)."""


def _cumsum(ts: FloatArray, deltas: FloatArray) -> Curve:
    """Sort events by time (ends before starts at ties) and accumulate them."""
    kind = (deltas > 0).astype(np.int8)
    order = np.lexsort((kind, ts))
    vals = np.cumsum(deltas[order])
    if len(vals):
        peak = float(np.max(np.abs(vals)))
        if peak > 0:  # float residue of +x then -x is 0, not -1e-12
            vals = np.where(np.abs(vals) < 1e-9 * peak, 0.0, vals)
    return ts[order], vals


def _events(parts: list[tuple[FloatArray, FloatArray]]) -> Curve:
    if not parts:
        return _EMPTY
    return _cumsum(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _lookup(ts: FloatArray, vals: FloatArray, at: FloatArray) -> FloatArray:
    idx = np.searchsorted(ts, at, side="right").astype(np.intp) - 1
    return np.where(idx >= 0, vals[np.clip(idx, 0, len(vals) - 1)], 0.0)


def _divide(num: Curve, den: Curve) -> Curve:
    if len(num[0]) == 0 or len(den[0]) == 0:
        return _EMPTY
    ts = np.unique(np.concatenate([num[0], den[0]]))
    n = _lookup(num[0], num[1], ts)
    d = _lookup(den[0], den[1], ts)
    out = np.zeros_like(n)
    np.divide(n, d, out=out, where=d > 0)
    return ts, out


def _concurrency(a: FloatArray, b: FloatArray) -> Curve:
    ok = ~np.isnan(a) & ~np.isnan(b)
    k = int(ok.sum())
    if k == 0:
        return _EMPTY
    return _cumsum(np.concatenate([a[ok], b[ok]]), np.concatenate([np.ones(k), -np.ones(k)]))


def _rate_events(
    a: FloatArray, b: FloatArray, tokens: FloatArray, ok: npt.NDArray[np.bool_]
) -> list[tuple[FloatArray, FloatArray]]:
    """Events of ``tokens / (b - a)`` held over ``[a, b)``, for the requests in ``ok``."""
    if not ok.any():
        return []
    r = tokens[ok] / (b[ok] - a[ok])
    return [(a[ok], r), (b[ok], -r)]


def _decoding(x: SweepInputs) -> npt.NDArray[np.bool_]:
    """Requests with a decode phase that carries tokens: ``[gen, end)`` non-empty, OSL >= 1."""
    ok: npt.NDArray[np.bool_] = (
        ~np.isnan(x.gen) & ~np.isnan(x.osl) & (x.end - x.gen > 0) & (x.osl >= 1)
    )
    return ok


def _gap_events(x: SweepInputs) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Every content gap of every request: (its request, its start, its end, its length)."""
    rec = np.concatenate([np.full(len(g), i, dtype=np.intp) for i, g in enumerate(x.icl)])
    vals = np.concatenate([np.asarray(g, dtype=np.float64) for g in x.icl])
    ends = np.concatenate(
        [x.gen[i] + np.cumsum(np.asarray(g, dtype=np.float64)) for i, g in enumerate(x.icl)]
    )
    return rec, ends - vals, ends, vals


def _decode_throughput(x: SweepInputs) -> Curve:
    if not any(len(g) for g in x.icl):
        return _events(_rate_events(x.gen, x.end, x.osl - 1.0, _decoding(x)))
    rec, starts, ends, vals = _gap_events(x)
    nonzero = np.bincount(rec[vals > 0], minlength=len(x.osl)).astype(np.float64)
    per_req = nonzero[rec]
    tokens = x.osl[rec]
    per_gap = np.where(per_req > 0, (tokens - 1.0) / np.where(per_req > 0, per_req, 1.0), 0.0)
    rate = np.where(vals > 0, per_gap / np.where(vals > 0, vals, 1.0), 0.0)
    ok = ~np.isnan(x.gen[rec]) & (vals > 0) & ~np.isnan(tokens) & (tokens >= 1)
    if not ok.any():
        return _EMPTY
    return _cumsum(np.concatenate([starts[ok], ends[ok]]), np.concatenate([rate[ok], -rate[ok]]))


def _tokens_in_flight(x: SweepInputs) -> Curve:
    prefill = ~np.isnan(x.start) & ~np.isnan(x.isl) & ~np.isnan(x.gen) & (x.gen > x.start)
    has_end = ~np.isnan(x.end)
    parts: list[tuple[FloatArray, FloatArray]] = []
    if not any(len(g) for g in x.icl):
        decode = ~np.isnan(x.gen) & ~np.isnan(x.osl) & (x.end - x.gen > 0)
        if prefill.any():
            parts.append((x.start[prefill], x.isl[prefill]))
        if decode.any():
            parts.append((x.gen[decode], x.osl[decode]))
        in_end, out_end = prefill & has_end, decode & has_end
    else:
        rec, _, ends, vals = _gap_events(x)
        counts = np.bincount(rec, minlength=len(x.osl)).astype(np.float64)[rec]
        tokens = x.osl[rec]
        per_gap = np.where(counts > 0, (tokens - 1.0) / counts, 0.0)
        ok = ~np.isnan(x.gen[rec]) & (vals >= 0) & ~np.isnan(tokens) & (tokens >= 1)
        has_gaps = np.bincount(rec[ok], minlength=len(x.osl)) > 0
        # A gap ending at (or, by stamp jitter, past) its request's end would add its tokens
        # after the end freed them: clamp it just below.
        rec_end = x.end[rec]
        late = ~np.isnan(rec_end) & (ends >= rec_end)
        ends = np.where(late, np.nextafter(rec_end, -np.inf), ends)
        first = ~np.isnan(x.gen) & has_gaps & ~np.isnan(x.osl) & (x.osl >= 1)
        if first.any():
            parts.append((x.gen[first], np.ones(int(first.sum()))))
        if ok.any():
            parts.append((ends[ok], per_gap[ok]))
        if prefill.any():
            parts.append((x.start[prefill], x.isl[prefill]))
        in_end, out_end = prefill & has_end, has_gaps & has_end
    both, in_only, out_only = in_end & out_end, in_end & ~out_end, out_end & ~in_end
    if both.any():
        parts.append((x.end[both], -(x.isl[both] + x.osl[both])))
    if in_only.any():
        parts.append((x.end[in_only], -x.isl[in_only]))
    if out_only.any():
        parts.append((x.end[out_only], -x.osl[out_only]))
    return _events(parts)


def _segments(curve: Curve, lo: float, hi: float) -> tuple[FloatArray, FloatArray]:
    """(durations, values) of the step function clipped to ``[lo, hi]``."""
    ts, vals = curve
    a = max(0, int(np.searchsorted(ts, lo, side="right")) - 1)
    b = min(len(ts), int(np.searchsorted(ts, hi, side="left")) + 1)
    starts = np.concatenate([[lo], ts[a:b]])
    values = np.concatenate([[float(vals[a - 1]) if a > 0 else 0.0], vals[a:b]])
    ends = np.concatenate([starts[1:], [hi]])
    dur = np.maximum(np.minimum(ends, hi) - np.maximum(starts, lo), 0.0)
    keep = dur > 0
    return dur[keep], values[keep]


def _stats(dur: FloatArray, val: FloatArray, total: float) -> SweepStats:
    if dur.size == 0 or total <= 0:
        return SweepStats()
    avg = float(np.sum(val * dur) / total)
    std = float(np.sqrt(np.sum(dur * (val - avg) ** 2) / total))
    order = np.argsort(val)
    cum = np.cumsum(dur[order])
    idx = np.minimum(np.searchsorted(cum / cum[-1], [0.50, 0.90, 0.95, 0.99]), len(val) - 1)
    p50, p90, p95, p99 = (float(v) for v in val[order][idx])
    return SweepStats(avg, float(np.min(val)), float(np.max(val)), p50, p90, p95, p99, std)


def _time_weighted(curve: Curve, lo: float, hi: float) -> SweepStats:
    if len(curve[0]) == 0 or hi - lo <= 0:
        return SweepStats()
    dur, val = _segments(curve, lo, hi)
    return _stats(dur, val, hi - lo)


def _active_weighted(rate: Curve, mask: Curve, lo: float, hi: float) -> SweepStats:
    """Time-weighted over the segments where ``mask`` is positive only."""
    if hi - lo <= 0 or len(rate[0]) == 0 or len(mask[0]) == 0:
        return SweepStats()
    inner = [
        c[0][int(np.searchsorted(c[0], lo, side="right")) : int(np.searchsorted(c[0], hi))]
        for c in (rate, mask)
    ]
    grid = np.unique(np.concatenate([[lo, hi], *inner]))
    if len(grid) < 2:
        return SweepStats()
    starts, dur = grid[:-1], np.diff(grid)
    on = (_lookup(mask[0], mask[1], starts) > 0) & (dur > 0)
    if not on.any():
        return SweepStats()
    return _stats(dur[on], _lookup(rate[0], rate[1], starts)[on], float(dur[on].sum()))


def sweep_stats(x: SweepInputs, window: tuple[float, float] | None = None) -> dict[str, SweepStats]:
    """The :data:`SWEEP_METRICS` of a run, in their display units (throughputs per second).

    Args:
        x: the run's requests.
        window: ``(start, end)`` in the requests' clock; None: from the first event to the last.

    Returns:
        Every sweep metric, or nothing when no request has both a start and an end.
    """
    conc = _concurrency(x.start, x.end)
    if len(conc[0]) == 0:
        return {}
    lo, hi = window if window is not None else (float(conc[0][0]), float(conc[0][-1]))
    gen_conc = _concurrency(x.gen, x.end)
    prefill_conc = _concurrency(x.start, x.gen)
    decode = _decode_throughput(x)
    prefill_ok = ~np.isnan(x.start) & ~np.isnan(x.gen) & ~np.isnan(x.isl) & (x.gen - x.start > 0)
    prefill_events = _rate_events(x.start, x.gen, x.isl, prefill_ok)
    prefill = _events(prefill_events)
    total = _events(prefill_events + _rate_events(x.gen, x.end, x.osl - 1.0, _decoding(x)))
    decode_per_user = _divide(decode, gen_conc)
    prefill_per_user = _divide(prefill, prefill_conc)
    per_second = (False, True, True, False, False, True, True, True, False)
    curves = (conc, decode, prefill, gen_conc, prefill_conc, total, decode_per_user,
              prefill_per_user, _tokens_in_flight(x))  # fmt: skip
    out: dict[str, SweepStats] = {}
    for tag, curve, rate in zip(SWEEP_METRICS, curves, per_second, strict=False):
        stats = _time_weighted(curve, lo, hi)
        out[tag] = stats.scaled(NS_PER_S) if rate else stats
    for tag, rate_curve, mask in (
        ("active_decode_throughput", decode, gen_conc),
        ("active_prefill_throughput", prefill, prefill_conc),
        ("active_decode_throughput_per_user", decode_per_user, gen_conc),
        ("active_prefill_throughput_per_user", prefill_per_user, prefill_conc),
        ("active_total_throughput", total, conc),
    ):
        out[tag] = _active_weighted(rate_curve, mask, lo, hi).scaled(NS_PER_S)
    return out
