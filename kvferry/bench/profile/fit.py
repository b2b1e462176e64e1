"""Fits and interpolation of a profile's points, with numpy only (no scipy).

Owns :func:`fit_quadratic` (TTFT(ISL) as ``c0 + c1 x + c2 x^2`` by ``numpy.polyfit``, with R^2),
:func:`interp_1d` (linear between measured points, clamped at the ends: TTFT at an ISL) and
:func:`interp_grid` / :func:`interp_at` (a surface over scattered decode points (x = KV usage,
y = context length) on a fixed grid). It measures and reads nothing.

The surface is griddata-like but not a Delaunay triangulation: the decode sweep measures rows
(one context length, several concurrencies), so each row is interpolated linearly along x
within its measured range, then each grid column linearly along y between the rows that
cover it; that is exact for any plane and bilinear on a rectangle of four points. Cells
outside every row's range are filled by the nearest measured point, distances taken with x
and y each scaled to its measured range (Dynamo fills griddata's NaNs the same way).
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
    x: Sequence[float], y: Sequence[float], z: Sequence[float], gx: Array, gy: Array
) -> Array:
    """The surface through the points ``(x, y) -> z`` at every ``(gx[j], gy[i])``: an array of
    shape ``(len(gy), len(gx))`` (module docstring: rows in x, then columns in y, then nearest).

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
    # along x within each row: NaN outside the row's measured range
    along = np.full((len(rows), len(gx)), np.nan)
    for r, (_, rx, rz) in enumerate(rows):
        inside = (gx >= rx[0]) & (gx <= rx[-1])
        along[r, inside] = np.interp(gx[inside], rx, rz)
    row_y = np.array([r[0] for r in rows])
    out = np.full((len(gy), len(gx)), np.nan)
    for j in range(len(gx)):
        have = ~np.isnan(along[:, j])
        if not have.any():
            continue
        cy, cz = row_y[have], along[have, j]
        inside = (gy >= cy[0]) & (gy <= cy[-1])
        out[inside, j] = np.interp(gy[inside], cy, cz)
    holes = np.isnan(out)
    if holes.any():
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
