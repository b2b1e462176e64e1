"""``kvferry doctor`` as a library: run the checks against this machine and a config.

Owns :func:`run`: options in, a :class:`~kvferry.bench.doctor.report.DoctorReport` out, the
checks in the registry's order, progress told before each. A check is an isolation boundary:
one that cannot read a file says SKIP itself; one that raises anyway (a kernel that formats a
file in a way no one foresaw) becomes a FAIL row naming the exception, and the others still
run, so one odd file never costs the whole report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from kvferry.bench.doctor.base import CHECKS, CheckResult, DoctorContext
from kvferry.bench.doctor.report import DoctorOptions, DoctorReport
from kvferry.bench.doctor.system import SystemView
from kvferry.bench.result import EffectiveConfig
from kvferry.config.loader import load_config
from kvferry.config.models import KvferryConfig

__all__ = ["DoctorProgressFn", "run"]

log = logging.getLogger(__name__)

DoctorProgressFn = Callable[[str, int, int], None]
"""``progress(check, done, total)``: called before each check runs."""


def run(
    options: DoctorOptions | None = None,
    progress: DoctorProgressFn | None = None,
    *,
    config: KvferryConfig | None = None,
    sources: Mapping[str, str] | None = None,
    view: SystemView | None = None,
) -> DoctorReport:
    """Run the checks of ``options`` and return their report.

    Args:
        options: which checks; None: all, with the default wake-up samples.
        progress: told the name of each check before it runs.
        config: the effective config to judge; None: the defaults (no file, no environment).
        sources: where each of its values came from (``LoadedConfig.sources``).
        view: where the system is read; None: this machine.

    Returns:
        The report: one row per check run, the probes' measurements, the config and its
        sources.
    """
    options = options or DoctorOptions()
    if config is None:
        loaded = load_config(environ={})
        config, sources = loaded.config, loaded.sources
    ctx = DoctorContext(
        view=view or SystemView(),
        config=config,
        sources=dict(sources or {}),
        wakeup_samples=options.wakeup_samples,
    )
    report = DoctorReport(
        options=options, config=EffectiveConfig.of(config, sources), started_at=time.time()
    )
    names = options.names
    for i, name in enumerate(names):
        if progress is not None:
            progress(name, i, len(names))
        report.checks.append(_one(name, ctx))
    report.measurements = dict(ctx.measurements)
    report.ended_at = time.time()
    return report


def _one(name: str, ctx: DoctorContext) -> CheckResult:
    try:
        return CHECKS[name](ctx)
    except Exception as e:  # isolation boundary: one check's surprise is its own FAIL row
        log.warning("doctor check %s raised %s: %s", name, type(e).__name__, e)
        return CheckResult(
            name, "FAIL", f"the check raised {type(e).__name__}: {e}", "-",
            "A check that cannot judge this machine leaves that part of it unchecked.",
            "report it as a kvferry bug, with this line and the file the check reads",
        )  # fmt: skip
