"""How the report writes numbers, sizes and times into table cells: one place, so a value reads
the same in every section and a test can format a result's number the way the page shows it.

Pure functions of their arguments; nothing here reads a result.
"""

from __future__ import annotations

import datetime
import math

__all__ = ["DASH", "count", "num", "pct", "ratio", "size", "utc", "when"]

DASH = "–"
"""A cell with no value (not measured, not recorded)."""


def num(x: float | int | None, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, thousands separated (``12,345``, ``0.0123``,
    ``4.56``); None or NaN: :data:`DASH`."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    if x == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(x)))
    if magnitude >= digits - 1:
        return f"{x:,.0f}"
    return f"{x:,.{digits - 1 - magnitude}f}"


def count(n: int | None) -> str:
    return DASH if n is None else f"{n:,}"


def pct(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage (``0.4567`` -> ``45.7%``)."""
    if x is None or not math.isfinite(x):
        return DASH
    return f"{100.0 * x:.{digits}f}%"


def ratio(x: float | None) -> str:
    """A ratio of two measurements (``1.07x``)."""
    if x is None or not math.isfinite(x):
        return DASH
    return f"{x:.2f}x"


def size(n: int | None) -> str:
    """Bytes in the largest binary unit they fill (``4 KiB``, ``1.5 MiB``, ``512 B``)."""
    if n is None:
        return DASH
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            value = n / factor
            return f"{value:g} {unit}" if value == int(value) else f"{value:.3g} {unit}"
    return f"{n} B"


def utc(ts: float | None) -> str:
    """A Unix time as ``2025-01-31 14:05:09 UTC``; 0 or None (not recorded): :data:`DASH`."""
    if not ts:
        return DASH
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def when(started: float, ended: float) -> str:
    """When a run ran and for how long (``2025-01-31 14:05:09 UTC, 42.1 s``)."""
    if not started:
        return "not recorded"
    if ended > started:
        return f"{utc(started)}, {num(ended - started)} s"
    return utc(started)
