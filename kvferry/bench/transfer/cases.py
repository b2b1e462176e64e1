"""One case of the transfer sweep: what it is, how it is run and timed, and what it measured.

Owns the case grid (block size x batch size x threads in powers of two, and the cases that do
not fit the buffer), the timed loop (:func:`run_case`: warm-up, then every batch timed on every
thread, threads pinned to NUMA nodes), the byte-by-byte consistency check, one case's result
(:class:`CaseResult`, with the per-batch statistics of :mod:`kvferry.bench.stats`) and the merge
of several rounds of one case. It drives engines only through ``TransferBenchBackend`` and knows
nothing about targets, contenders or the report.

Definitions (as Mooncake's tebench prints them):
    BW (GB/s)     = bytes moved / 1e9 / wall seconds of the case (threads averaged)
    Avg Lat (us)  = total duration x threads / batches   (time per batch seen by the system)
    Avg/P99/P999 Tx (us) = statistics of the per-batch submit-to-completion time
Percentiles interpolate linearly between closest ranks (``kvferry.bench.stats``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvferry.bench.stats import Samples, Summary
from kvferry.bench.transfer.backends.base import Op, TransferBenchBackend
from kvferry.bench.transfer.options import TransferBenchOptions
from kvferry.errors import KvferryError

__all__ = [
    "Case",
    "CaseResult",
    "ConsistencyError",
    "check_consistency",
    "merge_rounds",
    "numa_cpusets",
    "plan_cases",
    "run_case",
]


class ConsistencyError(KvferryError):
    """--check-consistency found a byte that differs from what was written."""


@dataclass(frozen=True)
class Case:
    """One point of the sweep: ``batch_size`` blocks of ``block_size`` bytes per batch, on
    ``threads`` threads at once."""

    block_size: int
    batch_size: int
    threads: int

    @property
    def label(self) -> str:
        """``BLOCKxBATCHxTHREADS`` (``4096x128x1``): how ratios name their case."""
        return f"{self.block_size}x{self.batch_size}x{self.threads}"


@dataclass
class CaseResult:
    """One row of the sweep."""

    backend: str
    block_size: int
    batch_size: int
    threads: int
    op: str
    batches: int
    bytes: int
    seconds: float
    bw_gbps: float
    avg_lat_us: float
    transfer_us: Summary
    initiator_cpu_s: float
    target_cpu_s: float | None
    consistency_checked: bool = False
    consistency_bytes: int = 0
    """Bytes --check-consistency wrote with a pattern, read back and compared (every round)."""
    round_bw_gbps: list[float] = field(default_factory=list)
    """BW of each round on its own, in the order they ran: the spread an A/B comparison reads
    its noise band from (empty in files written before rounds were kept)."""
    round_p99_tx_us: list[float] = field(default_factory=list)
    """P99 Tx of each round on its own (as :attr:`round_bw_gbps`)."""

    @classmethod
    def measured(
        cls,
        backend: str,
        case: Case,
        op: str,
        *,
        batches: int,
        moved: int,
        seconds: float,
        samples: Samples,
        initiator_cpu_s: float,
        target_cpu_s: float | None,
        consistency_bytes: int | None,
    ) -> CaseResult:
        """A result from what was counted (``seconds`` averaged over threads); BW, Avg Lat and
        the per-batch summary derived as tebench defines them; ``consistency_bytes`` None: not
        checked."""
        threads = case.threads
        return cls(
            backend=backend,
            block_size=case.block_size,
            batch_size=case.batch_size,
            threads=threads,
            op=op,
            batches=batches,
            bytes=moved,
            seconds=seconds,
            bw_gbps=moved / 1e9 / seconds if seconds > 0 else 0.0,
            avg_lat_us=seconds * 1e6 * threads / batches if batches else 0.0,
            transfer_us=samples.summary() if batches else Summary.empty(),
            initiator_cpu_s=initiator_cpu_s,
            target_cpu_s=target_cpu_s,
            consistency_checked=consistency_bytes is not None,
            consistency_bytes=consistency_bytes or 0,
        )

    @property
    def case(self) -> Case:
        return Case(self.block_size, self.batch_size, self.threads)

    @property
    def cpu_s_per_gb(self) -> float:
        return self.initiator_cpu_s / (self.bytes / 1e9) if self.bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Its fields and what derives from them (``samples``, CPU seconds per GB), as JSON
        carries them."""
        d = asdict(self)
        d["transfer_us"] = self.transfer_us.to_dict()
        d["samples"] = self.transfer_us.count
        d["initiator_cpu_s_per_gb"] = self.cpu_s_per_gb
        d["target_cpu_s_per_gb"] = (
            self.target_cpu_s / (self.bytes / 1e9)
            if self.bytes and self.target_cpu_s is not None
            else None
        )
        return d


def numa_cpusets() -> list[set[int]]:
    """CPU sets of the NUMA nodes (one set of all CPUs when the topology is not exposed)."""
    nodes: list[set[int]] = []
    base = Path("/sys/devices/system/node")
    for node in sorted(base.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            cpus = _parse_cpulist((node / "cpulist").read_text())
        except OSError:
            continue
        if cpus:
            nodes.append(cpus)
    if not nodes:
        nodes.append(set(range(os.cpu_count() or 1)))
    return nodes


def _parse_cpulist(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _pin_current_thread(thread_index: int) -> None:
    """Bind the calling thread to the CPUs of NUMA node (thread_index mod nodes)."""
    if not hasattr(os, "sched_setaffinity"):
        return
    nodes = numa_cpusets()
    allowed = os.sched_getaffinity(0)
    cpus = nodes[thread_index % len(nodes)] & allowed
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)  # 0 = the calling thread on Linux


def _powers(start: int, stop: int) -> list[int]:
    out = []
    value = start
    while value <= stop:
        out.append(value)
        value *= 2
    return out


def plan_cases(options: TransferBenchOptions, capacity: int) -> tuple[list[Case], list[Case]]:
    """The sweep in order, and the cases skipped because they do not fit the buffer."""
    cases: list[Case] = []
    skipped: list[Case] = []
    for block in _powers(options.start_block_size, options.max_block_size):
        for batch in _powers(options.start_batch_size, options.max_batch_size):
            for threads in _powers(1, options.max_threads):
                case = Case(block, batch, threads)
                if block * batch * threads > capacity:
                    skipped.append(case)
                else:
                    cases.append(case)
    return cases, skipped


def _cpu_seconds(pid: int | None) -> float | None:
    """User+system CPU seconds of a process (this one when pid is None)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, IndexError, ValueError):
        return None


def run_case(
    backend: TransferBenchBackend,
    case: Case,
    options: TransferBenchOptions,
    target_pid: int | None = None,
    keep: list[Samples] | None = None,
) -> CaseResult:
    """Warm up, then run ``case`` for ``options.duration`` seconds and summarise it (its
    samples are appended to ``keep`` when given)."""
    block, batch, threads = case.block_size, case.batch_size, case.threads
    per_thread = block * batch
    errors: list[BaseException] = []
    samples = [Samples(4096) for _ in range(threads)]
    counts = [0] * threads
    run_seconds = [0.0] * threads
    start_gate = threading.Barrier(threads + 1)
    measure_gate = threading.Barrier(threads + 1)
    stop = threading.Event()
    measuring = threading.Event()

    def worker(t: int) -> None:
        try:
            if options.pin_threads:
                _pin_current_thread(t)
            offsets = [t * per_thread + i * block for i in range(batch)]
            ops: list[Op] = ["read", "write"] if options.op == "mix" else [options.op]  # type: ignore[list-item]
            run_batch = backend.run_batch
            clock = time.perf_counter_ns
            mine = samples[t]
            start_gate.wait()
            i = 0
            while not measuring.is_set():  # warm-up: connections, caches, page tables
                run_batch(ops[i % len(ops)], offsets, offsets, block)
                i += 1
            measure_gate.wait()
            began = clock()
            n = 0
            while not stop.is_set():
                t0 = clock()
                run_batch(ops[i % len(ops)], offsets, offsets, block)
                mine.add((clock() - t0) / 1000.0)
                i += 1
                n += 1
            run_seconds[t] = (clock() - began) / 1e9
            counts[t] = n
        except BaseException as e:  # a worker's failure ends the case with that error
            errors.append(e)
            stop.set()
            measuring.set()
            start_gate.abort()
            measure_gate.abort()

    workers = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        start_gate.wait()
        time.sleep(options.warmup)
        measuring.set()
        measure_gate.wait()
    cpu0, tcpu0 = _cpu_seconds(None), _cpu_seconds(target_pid)
    if not errors:
        stop.wait(options.duration)
    stop.set()
    for w in workers:
        w.join()
    cpu1, tcpu1 = _cpu_seconds(None), _cpu_seconds(target_pid)
    if errors:
        raise errors[0]
    merged = Samples(sum(len(s) for s in samples) or 1)
    for s in samples:
        merged.merge(s)
    if keep is not None:
        keep.append(merged)
    batches = sum(counts)
    total_duration = sum(run_seconds) / threads  # seconds, averaged over threads
    moved = per_thread * batches
    consistency = check_consistency(backend, case) if options.check_consistency else None
    return CaseResult.measured(
        backend.name,
        case,
        options.op,
        batches=batches,
        moved=moved,
        seconds=total_duration,
        samples=merged,
        initiator_cpu_s=(cpu1 or 0.0) - (cpu0 or 0.0),
        target_cpu_s=(tcpu1 - tcpu0) if tcpu0 is not None and tcpu1 is not None else None,
        consistency_bytes=consistency,
    )


def check_consistency(backend: TransferBenchBackend, case: Case) -> int:
    """Write a known pattern with the case's geometry, read it back, compare every byte.

    Returns:
        The bytes compared (all of them matched).

    Raises:
        ConsistencyError: any byte differs (the offset and both values are reported).
    """
    block, batch, threads = case.block_size, case.batch_size, case.threads
    span = block * batch * threads
    rng = np.random.default_rng(block * 1_000_003 + batch * 101 + threads)
    pattern = rng.integers(0, 256, size=span, dtype=np.uint8)
    offsets = [i * block for i in range(batch * threads)]
    backend.write_local(0, pattern)
    backend.run_batch("write", offsets, offsets, block)
    backend.write_local(0, np.zeros(span, dtype=np.uint8))
    backend.run_batch("read", offsets, offsets, block)
    local = backend.read_local(0, span)
    bad = np.flatnonzero(local != pattern)
    if bad.size:
        at = int(bad[0])
        raise ConsistencyError(
            f"consistency check failed for block {block} x batch {batch} x threads {threads}: "
            f"{bad.size} bytes differ, first at offset {at} (wrote {pattern[at]}, read {local[at]})"
        )
    return span


def merge_rounds(rounds: Sequence[CaseResult], samples: Sequence[Samples]) -> CaseResult:
    """One result of several runs of the same case by the same backend: batches, bytes,
    seconds and CPU summed, the per-batch samples pooled, each round's BW and P99 kept."""
    first = rounds[0]
    pooled = Samples(sum(len(s) for s in samples) or 1)
    for s in samples:
        pooled.merge(s)
    target_cpu = [r.target_cpu_s for r in rounds]
    merged = CaseResult.measured(
        first.backend,
        Case(first.block_size, first.batch_size, first.threads),
        first.op,
        batches=sum(r.batches for r in rounds),
        moved=sum(r.bytes for r in rounds),
        seconds=sum(r.seconds for r in rounds),
        samples=pooled,
        initiator_cpu_s=sum(r.initiator_cpu_s for r in rounds),
        target_cpu_s=None if None in target_cpu else sum(t or 0.0 for t in target_cpu),
        consistency_bytes=sum(r.consistency_bytes for r in rounds)
        if all(r.consistency_checked for r in rounds)
        else None,
    )
    merged.round_bw_gbps = [r.bw_gbps for r in rounds]
    merged.round_p99_tx_us = [r.transfer_us.p99 for r in rounds]
    return merged
