"""The doctor's result: every check's verdict, the probes' numbers, the config it judged.

Owns :class:`DoctorOptions` and :class:`DoctorReport`, the lab's result model for tool
``doctor`` (registered in :mod:`kvferry.bench.result`). Its JSON has the checks at the top
level, each exactly ``{"name", "status", "value", "threshold", "why", "fix"}``, beside what
every result carries (the machine, the effective config with each value's source, the times,
the command line) and ``measurements`` (wake-up p50/p99, the suggested grace period, Redis round
trips, H2D speed: the numbers behind the checks' values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from kvferry.bench.doctor.base import CHECKS, STATUSES, CheckResult, Status
from kvferry.bench.result import BenchResult
from kvferry.errors import ConfigError

__all__ = ["DoctorOptions", "DoctorReport"]


@dataclass(frozen=True)
class DoctorOptions:
    """Which checks to run and how long the wake-up probe samples.

    Validated on construction: an unknown check name raises ConfigError listing the known ones.
    """

    only: tuple[str, ...] = ()
    """The checks to run, by name; empty: all of them."""
    wakeup_samples: int = 300

    def __post_init__(self) -> None:
        object.__setattr__(self, "only", tuple(self.only))
        unknown = [name for name in self.only if name not in CHECKS]
        if unknown:
            raise ConfigError(
                f"--only {','.join(unknown)!r}: no such check; known: {', '.join(CHECKS)}"
            )
        if not 10 <= self.wakeup_samples <= 100_000:
            raise ConfigError(
                f"--wakeup-samples {self.wakeup_samples} is out of range: use 10..100000"
            )

    @property
    def names(self) -> list[str]:
        """The checks to run, in the registry's order."""
        return [name for name in CHECKS if not self.only or name in self.only]


@dataclass(kw_only=True)
class DoctorReport(BenchResult):
    """``kvferry doctor``'s result (module docstring)."""

    tool: ClassVar[str] = "doctor"

    options: DoctorOptions = field(default_factory=DoctorOptions)
    checks: list[CheckResult] = field(default_factory=list)
    measurements: dict[str, float] = field(default_factory=dict)

    def counts(self) -> dict[Status, int]:
        """Checks per status, every status present (0 when none)."""
        out: dict[Status, int] = {s: 0 for s in STATUSES}
        for c in self.checks:
            out[c.status] += 1
        return out

    def summary(self) -> str:
        """``"14 OK, 3 WARN, 0 FAIL, 4 SKIP"``."""
        return ", ".join(f"{n} {status}" for status, n in self.counts().items())

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == "FAIL"]
