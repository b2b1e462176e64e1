"""``kvferry doctor``: the production checklist as code, each check OK / WARN / FAIL / SKIP.

The modules, one concern each:

- :mod:`.system`: :class:`SystemView`, where checks read ``/proc``, ``/sys``, ``/dev/shm`` and
  the probes they call (injectable: tests point it at fake trees);
- :mod:`.probes`: the measuring ones (wake-up latency and the grace period it suggests, Redis
  round trip, TCP connect, pinned H2D);
- :mod:`.base`: :class:`CheckResult`, :class:`DoctorContext`, the :data:`CHECKS` registry;
- :mod:`.checks`: the host checks (memory, limits, network);
- :mod:`.checks_io`: storage, services, devices, wake-up, config;
- :mod:`.report`: :class:`DoctorOptions`, :class:`DoctorReport` (tool ``doctor``);
- :mod:`.harness`: :func:`run`, options to report.

Importing this package registers every check (no I/O, no thread, no torch).
"""

from kvferry.bench.doctor import checks, checks_io  # noqa: F401  (register the checks)
from kvferry.bench.doctor.base import CHECKS, STATUSES, CheckResult, DoctorContext, Status
from kvferry.bench.doctor.harness import DoctorProgressFn, run
from kvferry.bench.doctor.report import DoctorOptions, DoctorReport
from kvferry.bench.doctor.system import SystemView

__all__ = [
    "CHECKS",
    "STATUSES",
    "CheckResult",
    "DoctorContext",
    "DoctorOptions",
    "DoctorProgressFn",
    "DoctorReport",
    "Status",
    "SystemView",
    "run",
]
