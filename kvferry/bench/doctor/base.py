"""What every doctor check is: its result, its context, the registry, shared helpers.

Owns :class:`CheckResult` (the six keys ``--json`` writes for a check), :class:`DoctorContext`
(the system view, the effective config and its sources, the measurements probes add),
:data:`CHECKS` (name -> function, in the order the doctor runs and prints them) and the
:func:`check` decorator that fills it. The checks themselves live in :mod:`.checks` (the host:
memory, limits, network) and :mod:`.checks_io` (storage, services, devices, the wake-up probe
and the config); importing :mod:`kvferry.bench.doctor` registers both.
"""

from __future__ import annotations

import ipaddress
import re
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from kvferry.bench.doctor.system import SystemView
from kvferry.config.models import KvferryConfig
from kvferry.config.units import format_size_approx

__all__ = [
    "CHECKS",
    "STATUSES",
    "CheckFn",
    "CheckResult",
    "DoctorContext",
    "Status",
    "check",
    "count_limit",
    "is_loopback",
    "limit",
    "pool_bytes",
    "size",
    "unreadable",
    "url_host",
]

Status = Literal["OK", "WARN", "FAIL", "SKIP"]
STATUSES: tuple[Status, ...] = ("OK", "WARN", "FAIL", "SKIP")


@dataclass
class CheckResult:
    """One check's verdict, as ``--json`` writes it (exactly these keys)."""

    name: str
    status: Status
    value: str
    """What was measured, with its unit."""
    threshold: str
    why: str
    """Why it matters for kvferry, one sentence."""
    fix: str
    """A concrete command or config key; empty when there is nothing to do."""


@dataclass
class DoctorContext:
    """What a check is given: the system, the effective config, and where measurements go."""

    view: SystemView
    config: KvferryConfig
    sources: dict[str, str] = field(default_factory=dict)
    wakeup_samples: int = 300
    measurements: dict[str, float] = field(default_factory=dict)
    """Numbers a probe measured (``wakeup_p50_us``), kept in the report beside the checks."""


CheckFn = Callable[[DoctorContext], CheckResult]
CHECKS: dict[str, CheckFn] = {}
"""Every check by name, in the order the doctor runs and prints them."""


def check(name: str) -> Callable[[CheckFn], CheckFn]:
    """Register a check under ``name`` (a duplicate is a bug: it raises)."""

    def add(fn: CheckFn) -> CheckFn:
        if name in CHECKS:
            raise ValueError(f"doctor check {name!r} is registered twice")
        CHECKS[name] = fn
        return fn

    return add


def size(n: int | float) -> str:
    """Bytes as the largest binary unit they reach, with a space (``4 MiB``)."""
    text = format_size_approx(int(n))
    return re.sub(r"(\d)([KMGT]?i?B)$", r"\1 \2", text)


def limit(n: int) -> str:
    return "unlimited" if n == resource.RLIM_INFINITY else size(n)


def count_limit(n: int) -> str:
    return "unlimited" if n == resource.RLIM_INFINITY else str(n)


def pool_bytes(config: KvferryConfig) -> int:
    """Bytes of the cpu tier's pool (``cpu.buffer_number`` slots, or ``cpu.capacity``)."""
    slot = config.store.slot_size
    slots = config.cpu.buffer_number or config.cpu.capacity // slot
    return slots * slot


def unreadable(name: str, path: str, why: str, fix: str = "") -> CheckResult:
    """SKIP: the file a check reads is absent or unreadable here."""
    return CheckResult(name, "SKIP", f"could not read {path}", "-", why, fix)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(url: str) -> str:
    """The host of a URL (``redis://h:6379/0`` -> ``h``); empty when it has none."""
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""
