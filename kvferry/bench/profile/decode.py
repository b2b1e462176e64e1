"""The decode sweep's grid: context lengths x concurrencies, clamped to the KV capacity.

Owns :func:`decode_grid`: the ISLs (an even spread from 100 to the max context minus the OSL,
as Dynamo's range) and per ISL the concurrencies, a geometric spread from 1 to the clamp
``min(max_kv_tokens // (ISL + OSL), max_concurrency)``, so no point runs the engine past its
KV capacity (into preemption) without saying so. Pure: the harness measures.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DecodeCell", "decode_grid", "kv_clamp"]

MIN_ISL = 100


@dataclass(frozen=True)
class DecodeCell:
    isl: int
    concurrency: int
    clamp: int
    """The most requests of this ISL the KV cache (and ``max_concurrency``) holds."""
    kv_bound: bool
    """The clamp is the KV capacity's, not ``max_concurrency``'s."""


def kv_clamp(max_kv_tokens: int, isl: int, osl: int) -> int:
    """Requests of ``isl + osl`` tokens that fit in ``max_kv_tokens`` at once (at least 1)."""
    return max(1, max_kv_tokens // (isl + osl))


def decode_grid(
    max_context: int,
    max_kv_tokens: int,
    osl: int,
    contexts: int,
    concurrency_points: int,
    max_concurrency: int,
) -> list[DecodeCell]:
    """Every (ISL, concurrency) to measure, ISL ascending then concurrency ascending."""
    top = max_context - osl
    if top <= MIN_ISL:
        isls = [max(1, top)]
    else:
        n = max(1, contexts)
        isls = sorted({round(MIN_ISL + (top - MIN_ISL) * i / max(1, n - 1)) for i in range(n)})
    cells: list[DecodeCell] = []
    for isl in isls:
        by_kv = kv_clamp(max_kv_tokens, isl, osl)
        clamp = min(by_kv, max_concurrency)
        k = max(1, concurrency_points)
        if k == 1 or clamp == 1:
            levels = [clamp]
        else:
            levels = sorted({max(1, round(clamp ** (i / (k - 1)))) for i in range(k)})
        cells += [DecodeCell(isl, c, clamp, by_kv <= max_concurrency) for c in levels]
    return cells
