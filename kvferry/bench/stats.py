"""The one statistics module of the lab: percentiles, summaries and sample buffers.

Every bench (transfer, store, endpoint, SLA profiler) records raw samples in a :class:`Samples`
buffer and reports them through :class:`Summary`, so a p99 means the same thing everywhere and
for every engine measured:

- Percentiles interpolate linearly between closest ranks, ``rank = p/100 * (n-1)``, exactly as
  Mooncake's tebench (``XferMetricStats::percentile``) and ``numpy.percentile(method="linear")``
  compute them: ``p <= 0`` is the minimum and ``p >= 100`` the maximum.
- ``std`` is the population standard deviation (``ddof=0``).

Values carry no unit here; callers name the unit in the key they report under (``latency_us``,
``bandwidth_gbps``). This module does no I/O and keeps no global state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

__all__ = ["Samples", "Summary", "percentile"]


def percentile(sorted_values: Sequence[float] | FloatArray, p: float) -> float:
    """The ``p``-th percentile of already sorted values, by linear interpolation.

    Args:
        sorted_values: values in ascending order (not checked: sorting is the caller's job, so a
            summary sorts once and asks for many percentiles).
        p: percentile in [0, 100]; ``p <= 0`` gives the minimum, ``p >= 100`` the maximum.

    Returns:
        ``v[i] * (1 - f) + v[i + 1] * f`` where ``rank = p / 100 * (n - 1)``, ``i = floor(rank)``
        and ``f = rank - i``.

    Raises:
        ValueError: ``sorted_values`` is empty, or ``p`` is NaN.
    """
    n = len(sorted_values)
    if n == 0:
        raise ValueError("percentile of an empty sequence is undefined; record a sample first")
    if math.isnan(p):
        raise ValueError("percentile p is NaN; expected a number in [0, 100]")
    if p <= 0:
        return float(sorted_values[0])
    if p >= 100:
        return float(sorted_values[n - 1])
    rank = p / 100.0 * (n - 1)
    idx = int(rank)  # floor: rank >= 0 here
    frac = rank - idx
    lo = float(sorted_values[idx])
    if idx + 1 >= n:
        return lo
    return lo * (1.0 - frac) + float(sorted_values[idx + 1]) * frac


@dataclass(frozen=True)
class Summary:
    """Count, extremes, mean, population std and tail percentiles of one set of samples."""

    count: int
    min: float
    max: float
    avg: float
    """Arithmetic mean."""
    std: float
    """Population standard deviation (ddof=0)."""
    p50: float
    p90: float
    p95: float
    p99: float
    p999: float
    """99.9th percentile."""

    @classmethod
    def of(cls, values: Iterable[float] | FloatArray) -> Summary:
        """Summarise ``values`` (any order; sorted once here).

        Raises:
            ValueError: no values, or a value is NaN (it would poison every statistic). Use
                :meth:`empty` to report "no samples".
        """
        if isinstance(values, np.ndarray):
            arr = np.asarray(values, dtype=np.float64).ravel()
        else:
            arr = np.fromiter(values, dtype=np.float64)
        if arr.size == 0:
            raise ValueError("cannot summarise zero samples; use Summary.empty() to report none")
        # np.sort copies, so the caller's array is left as it was.
        s = np.sort(arr)
        if math.isnan(s[-1]):  # np.sort puts NaN last
            raise ValueError("samples contain NaN; refusing to summarise them")
        return cls(
            count=int(s.size),
            min=float(s[0]),
            max=float(s[-1]),
            avg=float(s.mean()),
            std=float(s.std()),
            p50=percentile(s, 50),
            p90=percentile(s, 90),
            p95=percentile(s, 95),
            p99=percentile(s, 99),
            p999=percentile(s, 99.9),
        )

    @classmethod
    def empty(cls) -> Summary:
        """A summary of no samples (count 0, every statistic 0.0), for reports of empty runs."""
        return cls(
            count=0,
            min=0.0,
            max=0.0,
            avg=0.0,
            std=0.0,
            p50=0.0,
            p90=0.0,
            p95=0.0,
            p99=0.0,
            p999=0.0,
        )

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON reports (field names as keys)."""
        return asdict(self)


class Samples:
    """Append-only buffer of float samples, cheap enough to call from a bench's hot loop.

    Samples live in one preallocated float64 array that doubles when full, so ``add`` costs one
    store (no Python object per sample, no list of boxed floats to convert at the end).
    Not thread-safe: give each bench thread its own buffer and :meth:`merge` them afterwards.
    """

    __slots__ = ("_buf", "_n")

    def __init__(self, capacity: int = 1024) -> None:
        """Args:
        capacity: initial number of samples held before the first growth (at least 1).
        """
        self._buf: FloatArray = np.empty(max(1, int(capacity)), dtype=np.float64)
        self._n = 0

    def _reserve(self, extra: int) -> None:
        need = self._n + extra
        cap = self._buf.size
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        grown = np.empty(cap, dtype=np.float64)
        grown[: self._n] = self._buf[: self._n]
        self._buf = grown

    def add(self, x: float) -> None:
        """Append one sample."""
        if self._n == self._buf.size:
            self._reserve(1)
        self._buf[self._n] = x
        self._n += 1

    def extend(self, values: Iterable[float] | FloatArray) -> None:
        """Append many samples (an array is copied in one go)."""
        if isinstance(values, np.ndarray):
            arr = np.asarray(values, dtype=np.float64).ravel()
        else:
            arr = np.fromiter(values, dtype=np.float64)
        self._reserve(arr.size)
        self._buf[self._n : self._n + arr.size] = arr
        self._n += arr.size

    def merge(self, other: Samples) -> None:
        """Append every sample of ``other`` (which is left unchanged)."""
        self.extend(other.values())

    def __len__(self) -> int:
        return self._n

    def values(self) -> FloatArray:
        """The samples so far, in insertion order, as a read-only view (no copy)."""
        view = self._buf[: self._n]
        # Read-only: a caller sorting in place would silently reorder the recorded samples.
        view.flags.writeable = False
        return view

    def summary(self) -> Summary:
        """:meth:`Summary.of` the samples; :meth:`Summary.empty` when there are none."""
        if self._n == 0:
            return Summary.empty()
        return Summary.of(self.values())
