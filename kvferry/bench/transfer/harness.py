"""The transfer benchmark harness (kvferry's tebench): one sweep, any backend, one stats module.

Owns the sweep (block size x batch size x threads in powers of two), the timing of every batch,
the per-case statistics and the report (table, JSON, CSV). It drives backends only through
``TransferBenchBackend``, so kvferry's engine and Mooncake's are measured by the same code.

Definitions (as Mooncake's tebench prints them):
    BW (GB/s)     = bytes moved / 1e9 / wall seconds of the case (threads averaged)
    Avg Lat (us)  = total duration x threads / batches   (time per batch seen by the system)
    Avg/P99/P999 Tx (us) = statistics of the per-batch submit-to-completion time
Percentiles interpolate linearly between closest ranks (``kvferry.bench.stats``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvferry.bench.stats import Samples, Summary
from kvferry.bench.transfer.backends.base import Op, TransferBenchBackend
from kvferry.bench.transfer.backends.registry import load as load_backend
from kvferry.config.models import KvferryConfig
from kvferry.config.units import format_size_approx
from kvferry.errors import ConfigError, KvferryError

SCHEMA_VERSION = 1
READY_PREFIX = "kvferry-target-ready "


class ConsistencyError(KvferryError):
    """--check-consistency found a byte that differs from what was written."""


@dataclass(frozen=True)
class TransferBenchOptions:
    """The sweep, with tebench's flag names and defaults (sizes in bytes, duration in seconds)."""

    backend: str = "kvferry"
    seg_type: str = "DRAM"
    total_buffer_size: int = 1 << 30
    start_block_size: int = 4096
    max_block_size: int = 1 << 26
    start_batch_size: int = 1
    max_batch_size: int = 1
    max_threads: int = 1
    duration: float = 5.0
    warmup: float = 1.0
    op: str = "read"
    check_consistency: bool = False
    transport: str = "auto"
    pin_threads: bool = True
    rounds: int = 1

    def validate(self) -> None:
        """Raises ConfigError naming the flag when a value makes no sense."""
        checks = [
            (self.total_buffer_size > 0, "--total-buffer-size", self.total_buffer_size, "> 0"),
            (self.start_block_size > 0, "--start-block-size", self.start_block_size, "> 0"),
            (
                self.max_block_size >= self.start_block_size,
                "--max-block-size",
                self.max_block_size,
                f">= --start-block-size ({self.start_block_size})",
            ),
            (self.start_batch_size >= 1, "--start-batch-size", self.start_batch_size, ">= 1"),
            (
                self.max_batch_size >= self.start_batch_size,
                "--max-batch-size",
                self.max_batch_size,
                f">= --start-batch-size ({self.start_batch_size})",
            ),
            (1 <= self.max_threads <= 256, "--max-threads", self.max_threads, "1..256"),
            (self.duration > 0, "--duration", self.duration, "> 0 seconds"),
            (self.warmup >= 0, "--warmup", self.warmup, ">= 0 seconds"),
            (1 <= self.rounds <= 1000, "--rounds", self.rounds, "1..1000"),
            (self.op in ("read", "write", "mix"), "--op", self.op, "read, write or mix"),
            (self.seg_type in ("DRAM", "VRAM"), "--seg-type", self.seg_type, "DRAM or VRAM"),
        ]
        for ok, flag, value, valid in checks:
            if not ok:
                raise ConfigError(f"{flag} {value!r} is invalid: must be {valid}")


@dataclass(frozen=True)
class Case:
    block_size: int
    batch_size: int
    threads: int


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
    def cpu_s_per_gb(self) -> float:
        return self.initiator_cpu_s / (self.bytes / 1e9) if self.bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


@dataclass
class TransferBenchReport:
    options: TransferBenchOptions
    backends: dict[str, dict[str, object]] = field(default_factory=dict)
    cases: list[CaseResult] = field(default_factory=list)
    references: dict[str, dict[str, float]] = field(default_factory=dict)
    ratios: list[RoundRatios] = field(default_factory=list)

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
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": "kvferry bench transfer",
            "options": asdict(self.options),
            "machine": machine_info(),
            "backends": self.backends,
            "references": self.references,
            "cases": [c.to_dict() for c in self.cases],
            "ratios": [r.to_dict() for r in self.ratios],
        }


@dataclass
class RoundRatios:
    """One case measured in alternating rounds: ``base`` against ``other`` round by round.

    A ratio taken within a round compares two runs seconds apart, so a machine whose speed
    drifts over minutes (a shared VM) moves both sides of it alike.
    """

    block_size: int
    batch_size: int
    threads: int
    base: str
    other: str
    bw: list[float] = field(default_factory=list)  # base BW / other BW, per round
    p99: list[float] = field(default_factory=list)  # base P99 Tx / other P99 Tx, per round

    @property
    def bw_median(self) -> float:
        return float(np.median(self.bw)) if self.bw else float("nan")

    @property
    def p99_median(self) -> float:
        return float(np.median(self.p99)) if self.p99 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bw_median": self.bw_median, "p99_median": self.p99_median}


def machine_info() -> dict[str, object]:
    """What the numbers were measured on."""
    info: dict[str, object] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "numa_nodes": len(numa_cpusets()),
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return info


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


# -- target processes ----------------------------------------------------------------------
def serve_target(
    backend: TransferBenchBackend,
    total_buffer_size: int,
    announce: Callable[[str], None],
    stop: threading.Event | None = None,
) -> None:
    """Run a target until ``stop`` is set or SIGINT/SIGTERM arrives."""
    name = backend.start_target(total_buffer_size)
    announce(name)
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        backend.close()


@contextlib.contextmanager
def spawn_local_target(
    backend: str, options: TransferBenchOptions, config: KvferryConfig
) -> Iterator[tuple[str, int]]:
    """Start a target process on loopback (the ``--local`` mode); yield (segment, pid)."""
    with tempfile.TemporaryDirectory(prefix="kvferry-bench-") as tmp:
        config_file = Path(tmp) / "config.json"
        doc = config.model_dump(mode="json")
        doc["listen"]["port"] = 0
        doc["listen"]["bind_address"] = "127.0.0.1"
        if config.listen.auth_token is not None:
            doc["listen"]["auth_token"] = config.listen.auth_token.get_secret_value()
        config_file.write_text(json.dumps(doc))
        cmd = [
            sys.executable,
            "-m",
            "kvferry",
            "bench",
            "transfer",
            "--target",
            "--backend",
            backend,
            "--transport",
            options.transport,
            "--seg-type",
            options.seg_type,
            "--total-buffer-size",
            str(options.total_buffer_size),
            "--config",
            str(config_file),
            "--quiet",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            name = _await_ready(proc)
            yield name, proc.pid
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _await_ready(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(READY_PREFIX):
            return line[len(READY_PREFIX) :].strip()
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise KvferryError(f"the target process did not start: {err.strip()[-2000:]}")


# -- the sweep -------------------------------------------------------------------------------
def make_backend(
    name: str, options: TransferBenchOptions, config: KvferryConfig
) -> TransferBenchBackend:
    cls = load_backend(name)
    return cls(transport=options.transport, seg_type=options.seg_type, config=config)


def _connect(backend: TransferBenchBackend, options: TransferBenchOptions, target_seg: str) -> int:
    """Connect ``backend`` with a local buffer for the largest case; the bytes a case may use."""
    local_size = min(
        options.total_buffer_size,
        options.max_block_size * options.max_batch_size * options.max_threads,
    )
    backend.connect(target_seg, max(local_size, options.start_block_size))
    return min(backend.target_capacity(), max(local_size, options.start_block_size))


@dataclass
class Contender:
    """A backend connected for an interleaved run, with the target it runs against."""

    name: str
    backend: TransferBenchBackend
    target_seg: str
    target_pid: int | None = None


def run_interleaved(
    contenders: Sequence[Contender],
    options: TransferBenchOptions,
    *,
    on_case: Callable[[CaseResult], None] | None = None,
    progress: Callable[[int, int, Case], None] | None = None,
) -> tuple[list[CaseResult], list[RoundRatios], list[Case]]:
    """Run every case ``options.rounds`` times, each round once per contender, the order
    rotating from round to round; report each contender's rounds merged (samples pooled, bytes
    and seconds summed) and, with two or more contenders, the first against the second round
    by round. Cases are those that fit every contender's target."""
    capacity = min(_connect(c.backend, options, c.target_seg) for c in contenders)
    cases, skipped = plan_cases(options, capacity)
    results: list[CaseResult] = []
    ratios: list[RoundRatios] = []
    steps = len(cases) * options.rounds * len(contenders)
    step = 0
    for case in cases:
        runs: dict[str, list[CaseResult]] = {c.name: [] for c in contenders}
        kept: dict[str, list[Samples]] = {c.name: [] for c in contenders}
        for r in range(options.rounds):
            k = r % len(contenders)
            for c in [*contenders[k:], *contenders[:k]]:
                if progress:
                    progress(step, steps, case)
                step += 1
                runs[c.name].append(run_case(c.backend, case, options, c.target_pid, kept[c.name]))
        for c in contenders:
            merged = merge_rounds(runs[c.name], kept[c.name])
            merged.backend = c.name  # the contender's label: two configs of one engine differ
            results.append(merged)
            if on_case:
                on_case(merged)
        if len(contenders) > 1:
            base, other = contenders[0].name, contenders[1].name
            entry = RoundRatios(case.block_size, case.batch_size, case.threads, base, other)
            for a, b in zip(runs[base], runs[other], strict=True):
                entry.bw.append(a.bw_gbps / b.bw_gbps if b.bw_gbps else float("inf"))
                entry.p99.append(
                    a.transfer_us.p99 / b.transfer_us.p99 if b.transfer_us.p99 else float("inf")
                )
            ratios.append(entry)
    return results, ratios, skipped


def merge_rounds(rounds: Sequence[CaseResult], samples: Sequence[Samples]) -> CaseResult:
    """One result of several runs of the same case by the same backend: batches, bytes,
    seconds and CPU summed, the per-batch samples pooled."""
    first = rounds[0]
    pooled = Samples(sum(len(s) for s in samples) or 1)
    for s in samples:
        pooled.merge(s)
    target_cpu = [r.target_cpu_s for r in rounds]
    return CaseResult.measured(
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


# -- output ----------------------------------------------------------------------------------
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
