"""The prefill sweep's points: which ISLs, and where to add points where TTFT bends.

Owns :func:`base_isls` (an even spread from :data:`MIN_ISL` to the max context minus a margin)
and :func:`next_isl` (the midpoint of the widest interval beside the measured point whose TTFT
bends most). Pure: the harness measures.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

__all__ = ["MIN_ISL", "base_count", "base_isls", "margin", "next_isl"]

MIN_ISL = 100
BASE_SHARE = 2 / 3
"""Of the granularity, the share spread evenly first; the rest goes where TTFT bends."""


def margin(max_context: int, osl: int) -> int:
    """Tokens kept free under the max context: Dynamo's 512, less on a short context."""
    return max(osl, min(512, max_context // 8))


def base_count(granularity: int) -> int:
    return max(3, math.ceil(granularity * BASE_SHARE))


def base_isls(max_context: int, granularity: int, osl: int) -> list[int]:
    """The evenly spread ISLs measured first (``base_count(granularity)`` of them)."""
    top = max_context - margin(max_context, osl)
    n = base_count(granularity)
    if top <= MIN_ISL:
        return [max(1, top)]
    return sorted({round(MIN_ISL + (top - MIN_ISL) * i / (n - 1)) for i in range(n)})


def next_isl(points: Sequence[tuple[int, float]]) -> int | None:
    """The ISL to measure next: at the interior point whose TTFT has the largest second
    difference (relative to the TTFT scale), the midpoint of its wider neighbouring interval.
    None when no interval is wider than 2 tokens.

    Args:
        points: measured (ISL, TTFT ms).
    """
    pts = sorted(points)
    if len(pts) < 3:
        gaps = [(b[0] - a[0], a[0], b[0]) for a, b in itertools.pairwise(pts)]
        gap = max(gaps, default=None)
        return None if gap is None or gap[0] <= 2 else (gap[1] + gap[2]) // 2
    best: tuple[float, int, int] | None = None
    for i in range(1, len(pts) - 1):
        (x0, y0), (x1, y1), (x2, y2) = pts[i - 1], pts[i], pts[i + 1]
        # slope change between the two intervals: large where the curve bends
        bend = abs((y2 - y1) / max(1, x2 - x1) - (y1 - y0) / max(1, x1 - x0))
        lo, hi = (x0, x1) if x1 - x0 >= x2 - x1 else (x1, x2)
        if hi - lo <= 2:
            continue
        key = (bend * (hi - lo), lo, hi)
        if best is None or key[0] > best[0]:
            best = key
    if best is None:
        return None
    return (best[1] + best[2]) // 2
