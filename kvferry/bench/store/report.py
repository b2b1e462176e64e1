"""What a store-bench run reports, on the lab's one result model, and how it reads and prints.

Owns :class:`StoreBenchReport` (a :class:`~kvferry.bench.result.BenchResult` of tool ``store``):
the options, facts about the backend, one :class:`PhaseResult` per phase and op (the bench's
cases; ``phases`` in JSON, as before the result model, so one metric path reads files of both
ages), the verify verdict, the store's own counters, and the failures they add up to. Also the
merge of the clients' tallies into those rows (:func:`merge`), the table cells
(:data:`COLUMNS`, :func:`row`), the CSV, and the reader of files written before the result
model (:meth:`StoreBenchReport.from_legacy`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from kvferry.bench.result import BenchResult, Environment, decode
from kvferry.bench.stats import Samples, Summary
from kvferry.bench.store.client import BULK_BATCH, EXAMPLES, TIMED, ClientResult, StoreBenchError
from kvferry.bench.store.options import StoreBenchOptions

__all__ = [
    "COLUMNS",
    "CSV_FIELDS",
    "PhaseResult",
    "StoreBenchReport",
    "VerifyResult",
    "merge",
    "row",
    "write_csv",
]


@dataclass
class PhaseResult:
    """One row: one phase and one kind of op, over every thread of every client."""

    phase: str
    op: str
    batch_size: int
    clients: int
    threads: int
    ops: int
    blocks: int
    bytes: int
    seconds: float
    ops_per_s: float
    blocks_per_s: float
    gbps: float
    latency_us: Summary
    hits: int = 0
    misses: int = 0
    stored: int = 0
    exists: int = 0
    no_space: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.blocks if self.blocks else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency_us"] = self.latency_us.to_dict()
        if self.op == "get":
            d["hit_rate"] = self.hit_rate
        return d


@dataclass
class VerifyResult:
    keys: int
    missing: int
    mismatched: int
    evictions: int
    """Blocks the store evicted during the run (a store server's own count for ``server``)."""
    examples: list[str]
    refused: int = 0
    """Puts the store answered NO_SPACE: those keys were never stored."""

    @property
    def ok(self) -> bool:
        """No byte differs, and no more keys are missing than the store evicted or refused."""
        return self.mismatched == 0 and self.missing <= self.evictions + self.refused


@dataclass(kw_only=True)
class StoreBenchReport(BenchResult):
    """One ``kvferry bench store`` run (see the module docstring)."""

    tool: ClassVar[str] = "store"

    options: StoreBenchOptions
    backend: dict[str, Any] = field(default_factory=dict)
    """Facts about the backend: its name, slot size, capacity, path, addresses..."""
    phases: list[PhaseResult] = field(default_factory=list)
    verify: VerifyResult | None = None
    store: dict[str, int] = field(default_factory=dict)
    """The store's own counters over the run, summed over clients: evictions, errors,
    no_space."""

    @property
    def failures(self) -> list[str]:
        out = []
        v = self.verify
        if v is not None and not v.ok:
            out.append(
                f"verify failed: of {v.keys} keys, {v.mismatched} differ from what was written "
                f"and {v.missing} are missing, while the store evicted {v.evictions} and "
                f"refused {v.refused} (NO_SPACE); " + "; ".join(v.examples)
            )
        if self.store.get("errors"):
            out.append(f"the store counted {self.store['errors']} tier errors (read as misses)")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def raise_for_failures(self) -> None:
        """Raises StoreBenchError naming every failure."""
        if self.failures:
            raise StoreBenchError("; ".join(self.failures))

    def to_json(self) -> dict[str, Any]:
        """The result model's JSON, with what derives from it for readers of the file alone:
        each get row's hit rate, verify's verdict, the run's ``ok`` and ``failures``."""
        out = super().to_json()
        out["phases"] = [p.to_dict() for p in self.phases]
        if self.verify is not None:
            out["verify"]["ok"] = self.verify.ok
        out["ok"] = self.ok
        out["failures"] = self.failures
        return out

    @classmethod
    def from_legacy(cls, data: Mapping[str, Any]) -> StoreBenchReport:
        """A report from a file ``kvferry bench store`` wrote before the result model
        (``"tool": "kvferry bench store"``, ``machine``)."""
        machine: Mapping[str, Any] = data.get("machine") or {}
        environment = Environment(
            host=str(machine.get("hostname", "")),
            platform=str(machine.get("platform", "")),
            cpus=int(machine.get("cpus") or 0),
            cpu_model=str(machine.get("cpu_model", "")),
            python=str(machine.get("python", "")),
        )
        verify = data.get("verify")
        return cls(
            environment=environment,
            options=decode(StoreBenchOptions, data["options"]),
            backend=dict(data.get("backend") or {}),
            phases=[decode(PhaseResult, p) for p in data.get("phases") or []],
            verify=None if verify is None else decode(VerifyResult, verify),
            store={k: int(v) for k, v in (data.get("store") or {}).items()},
            notes=[
                *data.get("notes", []),
                "read from a file written before the result model: no start and end times, "
                "no effective config; the environment is what its 'machine' object recorded",
            ],
        )


def merge(
    options: StoreBenchOptions,
    clients: Sequence[ClientResult],
    backend: dict[str, object],
    notes: Sequence[str] = (),
) -> StoreBenchReport:
    """Merge the clients' tallies into one row per (phase, op) and one verify result."""
    phases: list[PhaseResult] = []
    keys = [k for k in clients[0].tallies] if clients else []
    for phase, op in keys:
        tallies = [t for c in clients for t in c.tallies.get((phase, op), [])]
        samples = Samples(sum(len(t.samples_ns) for t in tallies) or 1)
        for t in tallies:
            samples.merge(t.samples_ns)
        windows = [t.seconds for t in tallies if t.seconds > 0]
        if phase in TIMED:
            seconds = sum(windows) / len(windows) if windows else 0.0
        else:
            seconds = max(windows, default=0.0)
        ops = sum(t.ops for t in tallies)
        blocks = sum(t.blocks for t in tallies)
        nbytes = sum(t.bytes for t in tallies)
        latency = Summary.of(samples.values() / 1000.0) if len(samples) else Summary.empty()
        phases.append(
            PhaseResult(
                phase=phase,
                op=op,
                batch_size=options.batch if phase in TIMED else BULK_BATCH,
                clients=options.clients,
                threads=options.threads,
                ops=ops,
                blocks=blocks,
                bytes=nbytes,
                seconds=seconds,
                ops_per_s=ops / seconds if seconds else 0.0,
                blocks_per_s=blocks / seconds if seconds else 0.0,
                gbps=nbytes / 1e9 / seconds if seconds else 0.0,
                latency_us=latency,
                hits=sum(t.hits for t in tallies),
                misses=sum(t.misses for t in tallies),
                stored=sum(t.stored for t in tallies),
                exists=sum(t.exists for t in tallies),
                no_space=sum(t.no_space for t in tallies),
            )
        )
    store = {
        name: sum(c.counters.get(name, 0) for c in clients)
        for name in ("evictions", "errors", "no_space")
    }
    verify = None
    if options.verify:
        examples = [f"client {c.index}: {e}" for c in clients for e in c.verify.examples]
        verify = VerifyResult(
            keys=sum(c.verify.keys for c in clients),
            missing=sum(c.verify.missing for c in clients),
            mismatched=sum(c.verify.mismatched for c in clients),
            evictions=store["evictions"],
            examples=examples[:EXAMPLES],
            refused=store["no_space"],
        )
    return StoreBenchReport(
        options=options,
        backend=dict(backend),
        phases=phases,
        verify=verify,
        store=store,
        notes=list(notes),
    )


# -- table and CSV ---------------------------------------------------------------------------
COLUMNS = (
    "Phase",
    "Op",
    "Batch",
    "Ops",
    "Ops/s",
    "Blocks/s",
    "GB/s",
    "Mean (us)",
    "P50 (us)",
    "P90 (us)",
    "P99 (us)",
    "P999 (us)",
    "Hit/Stored",
)


def row(result: PhaseResult) -> list[str]:
    t = result.latency_us
    if result.op == "get":
        outcome = f"{100.0 * result.hit_rate:.1f}% hit"
    else:
        outcome = f"{result.stored}/{result.blocks}"
    return [
        result.phase,
        result.op,
        str(result.batch_size),
        str(result.ops),
        f"{result.ops_per_s:,.0f}",
        f"{result.blocks_per_s:,.0f}",
        f"{result.gbps:.4f}",
        f"{t.avg:.1f}",
        f"{t.p50:.1f}",
        f"{t.p90:.1f}",
        f"{t.p99:.1f}",
        f"{t.p999:.1f}",
        outcome,
    ]


CSV_FIELDS = (
    "backend",
    "phase",
    "op",
    "value_size",
    "batch_size",
    "clients",
    "threads",
    "ops",
    "blocks",
    "bytes",
    "seconds",
    "ops_per_s",
    "blocks_per_s",
    "gbps",
    "lat_min_us",
    "lat_mean_us",
    "lat_p50_us",
    "lat_p90_us",
    "lat_p99_us",
    "lat_p999_us",
    "lat_max_us",
    "hits",
    "misses",
    "stored",
    "exists",
    "no_space",
)


def write_csv(path: str | os.PathLike[str], report: StoreBenchReport) -> None:
    """One row per (phase, op) of ``report``."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for r in report.phases:
            t = r.latency_us
            writer.writerow(
                [
                    report.options.backend,
                    r.phase,
                    r.op,
                    report.options.value_size,
                    r.batch_size,
                    r.clients,
                    r.threads,
                    r.ops,
                    r.blocks,
                    r.bytes,
                    f"{r.seconds:.6f}",
                    f"{r.ops_per_s:.3f}",
                    f"{r.blocks_per_s:.3f}",
                    f"{r.gbps:.6f}",
                    f"{t.min:.3f}",
                    f"{t.avg:.3f}",
                    f"{t.p50:.3f}",
                    f"{t.p90:.3f}",
                    f"{t.p99:.3f}",
                    f"{t.p999:.3f}",
                    f"{t.max:.3f}",
                    r.hits,
                    r.misses,
                    r.stored,
                    r.exists,
                    r.no_space,
                ]
            )
