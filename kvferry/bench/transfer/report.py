"""What a transfer-bench run reports, on the lab's one result model, and how it reads and prints.

Owns :class:`TransferBenchReport` (a :class:`~kvferry.bench.result.BenchResult` of tool
``transfer``): the options, the contenders (each ``backend`` entry with its overrides and what
its engine says about itself), the cases (one :class:`~kvferry.bench.transfer.cases.CaseResult`
per contender and case, rounds pooled), the cases skipped for not fitting, the same-run
references (loopback socket stream, memcpy) and, with two contenders or more, the first over
the second per case as :class:`~kvferry.bench.result.Ratio` with the value of every round. Also
the table cells (:data:`COLUMNS`, :func:`row`), the CSV and the reader of files written before
the result model (:meth:`TransferBenchReport.from_legacy`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kvferry.bench.result import BenchResult, Environment, Ratio, Reference, decode
from kvferry.bench.transfer.cases import Case, CaseResult
from kvferry.bench.transfer.options import TransferBenchOptions
from kvferry.config.units import format_size_approx

__all__ = [
    "BW",
    "COLUMNS",
    "P99",
    "ContenderInfo",
    "TransferBenchReport",
    "round_ratio",
    "row",
    "write_csv",
]

BW = "bw_gbps"
"""The metric of bandwidth ratios (higher is better for the subject)."""
P99 = "p99_tx_us"
"""The metric of P99 per-batch time ratios (lower is better for the subject)."""


@dataclass
class ContenderInfo:
    """One engine measured in the run: the ``backend`` entry as typed (its results' name), the
    registry name, its config overrides and what the engine reported about itself (version,
    transport, its transfer config)."""

    label: str
    backend: str
    overrides: dict[str, str] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)


def round_ratio(
    metric: str, subject: str, reference: str, case: Case, rounds: list[float]
) -> Ratio:
    """A per-case ratio from its rounds: the value is their median, which a machine's drift
    over minutes does not skew (each round compares two runs seconds apart)."""
    value = float(np.median(rounds)) if rounds else float("nan")
    return Ratio(metric, subject, reference, value, list(rounds), case.label)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


@dataclass(kw_only=True)
class TransferBenchReport(BenchResult):
    """One ``kvferry bench transfer`` run (see the module docstring)."""

    tool: ClassVar[str] = "transfer"

    options: TransferBenchOptions
    contenders: list[ContenderInfo] = field(default_factory=list)
    cases: list[CaseResult] = field(default_factory=list)
    skipped: list[Case] = field(default_factory=list)
    """Cases of the grid larger than a buffer: not run."""

    @property
    def backends(self) -> dict[str, dict[str, Any]]:
        """Contender label -> what its engine reported (transport, version, config)."""
        return {c.label: c.engine for c in self.contenders}

    def ratio_rows(self) -> list[tuple[Case, Ratio, Ratio | None]]:
        """(case, BW ratio, P99 ratio) per case, in sweep order."""
        by_case: dict[str, dict[str, Ratio]] = {}
        for r in self.ratios:
            by_case.setdefault(r.case, {})[r.metric] = r
        out: list[tuple[Case, Ratio, Ratio | None]] = []
        seen: set[str] = set()
        for c in self.cases:
            case = c.case
            entry = by_case.get(case.label, {})
            if case.label in seen or BW not in entry:
                continue
            seen.add(case.label)
            out.append((case, entry[BW], entry.get(P99)))
        return out

    def consistency_verdict(self) -> str | None:
        """What ``--check-consistency`` checked, one line (None: it was not asked for). A
        mismatch never gets here: it raises ConsistencyError and ends the run."""
        if not self.options.check_consistency:
            return None
        checked = [c for c in self.cases if c.consistency_checked]
        if not checked:
            return "consistency: no case ran, nothing was checked"
        backends = ", ".join(dict.fromkeys(c.backend for c in checked))
        rounds = f" x {self.options.rounds} rounds" if self.options.rounds > 1 else ""
        total = sum(c.consistency_bytes for c in checked)
        unchecked = len(self.cases) - len(checked)
        return (
            f"consistency: {_count(len(checked), 'case')}{rounds} of {backends}, every byte of "
            f"{format_size_approx(total)} written with a pattern then read back matched: OK"
            + (f" ({_count(unchecked, 'case')} not checked)" if unchecked else "")
        )

    def to_json(self) -> dict[str, Any]:
        """The result model's JSON; each case also carries what derives from it (``samples``,
        CPU seconds per GB), for readers of the file alone."""
        out = super().to_json()
        out["cases"] = [c.to_dict() for c in self.cases]
        return out

    @classmethod
    def from_legacy(cls, data: Mapping[str, Any]) -> TransferBenchReport:
        """A report from a file ``kvferry bench transfer`` wrote before the result model
        (``"tool": "kvferry bench transfer"``, ``machine``, ``backends`` keyed by label,
        references by name, ratios as base/other with per-round lists)."""
        options = dict(data["options"])
        backends: Mapping[str, Mapping[str, Any]] = data.get("backends") or {}
        if backends:  # then, options.backend held the first entry's name only
            options["backend"] = ",".join(backends)
        options.setdefault("reference", bool(data.get("references")))
        opts = decode(TransferBenchOptions, options)
        contenders = []
        for label, engine in backends.items():
            name, *pairs = label.split("+")
            overrides = dict(p.partition("=")[::2] for p in pairs)
            contenders.append(ContenderInfo(label, name, overrides, dict(engine)))
        machine: Mapping[str, Any] = data.get("machine") or {}
        environment = Environment(
            host=str(machine.get("hostname", "")),
            platform=str(machine.get("platform", "")),
            cpus=int(machine.get("cpus") or 0),
            cpu_model=str(machine.get("cpu_model", "")),
            python=str(machine.get("python", "")),
        )
        references = [
            Reference(
                name, float(ref["gbps"]), "GB/s", {k: v for k, v in ref.items() if k != "gbps"}
            )
            for name, ref in (data.get("references") or {}).items()
        ]
        ratios: list[Ratio] = []
        for r in data.get("ratios") or []:
            case = Case(r["block_size"], r["batch_size"], r["threads"])
            ratios.append(round_ratio(BW, r["base"], r["other"], case, r["bw"]))
            ratios.append(round_ratio(P99, r["base"], r["other"], case, r["p99"]))
        return cls(
            environment=environment,
            options=opts,
            contenders=contenders,
            cases=[decode(CaseResult, c) for c in data.get("cases") or []],
            references=references,
            ratios=ratios,
            notes=[
                "read from a file written before the result model: no start and end times, "
                "no effective config; the environment is what its 'machine' object recorded"
                + (f" ({machine['numa_nodes']} NUMA node(s))" if "numa_nodes" in machine else "")
            ],
        )


# -- table and CSV -----------------------------------------------------------------------------
COLUMNS = (
    "BlkSize (B)",
    "Batch",
    "Threads",
    "BW (GB/S)",
    "Avg Lat (us)",
    "Avg Tx (us)",
    "P99 Tx (us)",
    "P999 Tx (us)",
)


def row(result: CaseResult) -> list[str]:
    """The cells of :data:`COLUMNS` for one case."""
    t = result.transfer_us
    return [
        str(result.block_size),
        str(result.batch_size),
        str(result.threads),
        f"{result.bw_gbps:.6f}",
        f"{result.avg_lat_us:.1f}",
        f"{t.avg:.1f}",
        f"{t.p99:.1f}",
        f"{t.p999:.1f}",
    ]


def write_csv(path: str | os.PathLike[str], results: Sequence[CaseResult]) -> None:
    """One CSV row per case."""
    fields = [
        "backend",
        "op",
        "block_size",
        "batch_size",
        "threads",
        "batches",
        "bytes",
        "seconds",
        "bw_gbps",
        "avg_lat_us",
        "tx_min_us",
        "tx_avg_us",
        "tx_p50_us",
        "tx_p90_us",
        "tx_p95_us",
        "tx_p99_us",
        "tx_p999_us",
        "tx_max_us",
        "initiator_cpu_s_per_gb",
    ]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for r in results:
            t = r.transfer_us
            writer.writerow(
                [
                    r.backend,
                    r.op,
                    r.block_size,
                    r.batch_size,
                    r.threads,
                    r.batches,
                    r.bytes,
                    f"{r.seconds:.6f}",
                    f"{r.bw_gbps:.6f}",
                    f"{r.avg_lat_us:.3f}",
                    f"{t.min:.3f}",
                    f"{t.avg:.3f}",
                    f"{t.p50:.3f}",
                    f"{t.p90:.3f}",
                    f"{t.p95:.3f}",
                    f"{t.p99:.3f}",
                    f"{t.p999:.3f}",
                    f"{t.max:.3f}",
                    f"{r.cpu_s_per_gb:.4f}",
                ]
            )
