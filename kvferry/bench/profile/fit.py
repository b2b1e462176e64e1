"""Fits and interpolation of a profile's points, with numpy only (no scipy).

Owns :func:`fit_quadratic` (TTFT(ISL) as ``c0 + c1 x + c2 x^2`` by ``numpy.polyfit``, with R^2),
:func:`interp_1d` (linear between measured points, clamped at the ends: TTFT at an ISL) and
:func:`interp_grid` / :func:`interp_at` (a surface over scattered decode points (x = KV usage,
y = context length) on a fixed grid). It measures and reads nothing.

The surface is griddata-like but not a Delaunay triangulation: the decode sweep measures rows
(one context length, several concurrencies), and the surface is linear between adjacent rows in
the strip they bound. At a context ``y`` between rows ``r0`` (at ``y0``) and ``r1`` (at
``y1``), ``t = (y - y0) / (y1 - y0)``, the strip spans x from ``lerp(r0.xmin, r1.xmin, t)`` to
``lerp(r0.xmax, r1.xmax, t)``; a point at fraction ``u`` of that span takes
``lerp(r0(u), r1(u), t)``, where ``r(u)`` is the row interpolated linearly at fraction ``u`` of
its own x range. That is exact for any plane, bilinear on a rectangle of four points, and it
follows rows whose x ranges do not overlap (KV usage grows with context at equal concurrency),
where interpolating along x then along y would leave holes. Cells outside every strip are
filled by the nearest measured point, distances taken with x and y each scaled to its measured
range (Dynamo fills griddata's NaNs the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from kvferry.bench.profile.options import ProfileError

__all__ = ["GRID_SIZE", "QuadraticFit", "fit_quadratic", "interp_1d", "interp_at", "interp_grid"]

GRID_SIZE = 100
"""Cells per axis of the fixed decode grid (Dynamo's planner uses 100 x 100)."""

Array = NDArray[np.float64]


@dataclass(frozen=True)
class QuadraticFit:
    """``y = c0 + c1 x + c2 x^2`` and how well it fits the points it was fitted to."""

    c0: float
    c1: float
    c2: float
    r2: float
    """Coefficient of determination, 1 - SS_res / SS_tot (1.0 when every y is equal and met)."""

    def __call__(self, x: float) -> float:
        return self.c0 + self.c1 * x + self.c2 * x * x

    def formula(self, x: str = "isl") -> str:
        return f"{self.c0:.4g} + {self.c1:.4g}*{x} + {self.c2:.4g}*{x}^2"


def fit_quadratic(x: Sequence[float], y: Sequence[float]) -> QuadraticFit:
    """Least-squares quadratic through ``(x, y)``.

    Raises:
        ProfileError: fewer than 3 points, or fewer than 3 distinct x.
    """
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if len(xs) != len(ys) or len(np.unique(xs)) < 3:
        raise ProfileError(
            f"a quadratic fit needs 3 or more points at distinct x, got {len(np.unique(xs))}"
        )
    c2, c1, c0 = (float(c) for c in np.polyfit(xs, ys, 2))
    predicted = c0 + c1 * xs + c2 * xs * xs
    ss_res = float(np.sum((ys - predicted) ** 2))
    ss_tot = float(np.sum((ys - ys.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    return QuadraticFit(c0, c1, c2, r2)


def interp_1d(x: Sequence[float], y: Sequence[float], at: float) -> float:
    """Linear interpolation between measured points, clamped to the end values outside them.

    Raises:
        ProfileError: no points.
    """
    if not x:
        raise ProfileError("nothing to interpolate: no measured points")
    order = np.argsort(np.asarray(x, dtype=np.float64))
    xs = np.asarray(x, dtype=np.float64)[order]
    ys = np.asarray(y, dtype=np.float64)[order]
    return float(np.interp(at, xs, ys))


def _rows(x: Array, y: Array, z: Array) -> list[tuple[float, Array, Array]]:
    """The points grouped by y: ``(y, sorted x, z in that order)`` per distinct y, y ascending."""
    out = []
    for yv in np.unique(y):
        sel = y == yv
        order = np.argsort(x[sel])
        out.append((float(yv), x[sel][order], z[sel][order]))
    return out


def interp_at(
    x: Sequence[float],
    y: Sequence[float],
    z: Sequence[float],
    gx: Array,
    gy: Array,
    *,
    fill: bool = True,
) -> Array:
    """The surface through the points ``(x, y) -> z`` at every ``(gx[j], gy[i])``: an array of
    shape ``(len(gy), len(gx))`` (module docstring: linear in the strips between measured
    rows, nearest outside them; ``fill=False``: NaN outside them).

    Raises:
        ProfileError: no points, or arrays of different lengths.
    """
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    zs = np.asarray(z, dtype=np.float64)
    if not (len(xs) == len(ys) == len(zs)) or len(xs) == 0:
        raise ProfileError(
            f"a surface needs equal, non-empty x, y, z arrays, got {len(xs)}, {len(ys)}, {len(zs)}"
        )
    rows = _rows(xs, ys, zs)
    row_y = np.array([r[0] for r in rows])
    out = np.full((len(gy), len(gx)), np.nan)
    for i, yv in enumerate(gy):
        if yv < row_y[0] or yv > row_y[-1]:
            continue
        k = int(np.searchsorted(row_y, yv, side="right")) - 1
        _, x0, z0 = rows[k]
        if yv == row_y[k]:
            inside = (gx >= x0[0]) & (gx <= x0[-1])
            out[i, inside] = np.interp(gx[inside], x0, z0)
            continue
        y1, x1, z1 = rows[k + 1]
        t = (yv - row_y[k]) / (y1 - row_y[k])
        lo = x0[0] + t * (x1[0] - x0[0])
        hi = x0[-1] + t * (x1[-1] - x0[-1])
        inside = (gx >= lo) & (gx <= hi)
        u = (gx[inside] - lo) / (hi - lo) if hi > lo else np.zeros(int(inside.sum()))
        v0 = np.interp(x0[0] + u * (x0[-1] - x0[0]), x0, z0)
        v1 = np.interp(x1[0] + u * (x1[-1] - x1[0]), x1, z1)
        out[i, inside] = (1 - t) * v0 + t * v1
    holes = np.isnan(out)
    if fill and holes.any():
        sx = float(np.ptp(xs)) or 1.0
        sy = float(np.ptp(ys)) or 1.0
        hy, hx = np.nonzero(holes)
        dx = (gx[hx][:, None] - xs[None, :]) / sx
        dy = (gy[hy][:, None] - ys[None, :]) / sy
        out[hy, hx] = zs[np.argmin(dx * dx + dy * dy, axis=1)]
    return out


def interp_grid(
    x: Sequence[float], y: Sequence[float], z: Sequence[float], size: int = GRID_SIZE
) -> tuple[Array, Array, Array]:
    """The surface on the fixed ``size x size`` grid spanning the measured x and y:
    ``(gx, gy, gz)`` with ``gz[i, j]`` at ``(gx[j], gy[i])``."""
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if len(xs) == 0:
        raise ProfileError("nothing to interpolate: no measured decode points")
    gx = np.linspace(float(xs.min()), float(xs.max()), size)
    gy = np.linspace(float(ys.min()), float(ys.max()), size)
    return gx, gy, interp_at(x, y, z, gx, gy)
