"""The store benchmark harness (kvferry's master_bench): Put, Get, BatchPut, BatchGet and mixed.

Owns the options, the client processes (spawned, meeting at a barrier before every phase), the
merge of their samples into one row per phase and op, the verdict of verify and the report
(table rows, JSON, CSV). What a client does inside its process lives in
:mod:`kvferry.bench.store.client`; what a backend needs before its clients start (a store server,
a ``mooncake_master``, a directory) in :mod:`kvferry.bench.store.backends`. Every backend runs
through the calls a user makes: ``TieredStore(config, tiers=[create_tier(backend, config)])``,
then ``put`` and ``get``.

Phases, in order (as Mooncake's store bench runs them):
    fill        put ``num_keys`` keys (batches of 128) so that reads hit
    write_perf  put/batch-put fresh keys for ``duration`` s after ``warmup`` s
    read_perf   get/batch-get the filled keys, in order from a random start per thread
    mixed       a get with probability ``read_ratio``, else a put of fresh keys
    verify      get every key the run wrote (filled and fresh) back and compare every byte
``op`` picks the middle phase; fill and verify always run (verify unless ``verify=False``).

Definitions (GB = 1e9 bytes; percentiles from :mod:`kvferry.bench.stats`):
    op          one store call (a batch call is one op); its latency is the call's wall time
    blocks      keys in the ops; bytes: bytes stored (put) or returned (get)
    seconds     timed phases: the measured window of each thread, averaged over all threads;
                fill/verify: the longest thread's wall time
    ops/s, blocks/s, GB/s = ops, blocks, bytes / seconds

Local tiers (cpu, disk) are private to a process: with ``clients > 1`` every client has its own
store (a disk directory each), fills all ``num_keys`` keys into it and verifies them. Shared
tiers (redis, server, mooncake) are filled and verified once, each client taking a share, and
every key the run wrote is deleted from them at the end. With one client, it runs in this
process (no spawn).

A verify failure is a failure: a key whose bytes differ, or more keys missing than the store
evicted or refused (NO_SPACE) during the run; a store server's evictions are read from the
server (its STATS), since it evicts on its own side. The report says so (``ok``, ``failures``) and
``raise_for_failures`` raises it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvferry.backends.registry import load_tier
from kvferry.bench.stats import Samples, Summary
from kvferry.bench.store.backends import PREPARERS
from kvferry.bench.store.client import (
    BULK_BATCH,
    EXAMPLES,
    TIMED,
    ClientResult,
    ClientSpec,
    KeySpace,
    PhaseHook,
    ProgressFn,
    StoreBenchError,
    client_main,
    run_client,
)
from kvferry.bench.transfer.harness import machine_info
from kvferry.config.models import KvferryConfig
from kvferry.errors import ConfigError

__all__ = [
    "BACKENDS",
    "OPS",
    "KeySpace",
    "PhaseHook",
    "PhaseResult",
    "StoreBenchError",
    "StoreBenchOptions",
    "StoreBenchReport",
    "VerifyResult",
    "run_store_bench",
    "write_csv",
    "write_json",
]

SCHEMA_VERSION = 1
BACKENDS = ("cpu", "disk", "redis", "server", "mooncake")
OPS = ("put", "get", "batch-put", "batch-get", "mixed")
PERF_PHASE = {
    "put": "write_perf",
    "batch-put": "write_perf",
    "get": "read_perf",
    "batch-get": "read_perf",
    "mixed": "mixed",
}


@dataclass(frozen=True)
class StoreBenchOptions:
    """One store bench run (sizes in bytes, times in seconds); flag names in ``validate``."""

    backend: str = "cpu"
    op: str = "batch-get"
    value_size: int = 4096
    batch_size: int = 0
    """Keys per call of batch-put, batch-get and mixed; 0 = 128 for batch ops, 1 otherwise."""
    clients: int = 1
    """Client processes (the first runs in this process when there is only one)."""
    threads: int = 1
    """Threads per client process."""
    duration: float = 5.0
    warmup: float = 1.0
    num_keys: int = 10_000
    read_ratio: float = 0.9
    """Fraction of gets in the mixed phase."""
    seed: int = 0
    verify: bool = True
    slot_size: int = 0
    """store.slot_size; 0 = value_size rounded up (see :func:`auto_slot_size`)."""
    address: str | None = None
    """server: a running store server; mooncake: a running master (host:port). None: start one."""

    @property
    def batch(self) -> int:
        if self.batch_size:
            return self.batch_size
        return BULK_BATCH if self.op.startswith("batch-") else 1

    @property
    def phases(self) -> tuple[str, ...]:
        perf = PERF_PHASE.get(self.op, "read_perf")
        return ("fill", perf, "verify") if self.verify else ("fill", perf)

    def validate(self) -> None:
        """Raises ConfigError naming the flag when a value makes no sense."""
        checks = [
            (self.backend in BACKENDS, "--backend", self.backend, ", ".join(BACKENDS)),
            (self.op in OPS, "--op", self.op, ", ".join(OPS)),
            (self.value_size >= 1, "--value-size", self.value_size, ">= 1 byte"),
            (0 <= self.batch_size <= 65536, "--batch-size", self.batch_size, "1..65536"),
            (
                self.batch_size <= 1 or self.op not in ("put", "get"),
                "--batch-size",
                self.batch_size,
                f"1 with --op {self.op} (one key per call); use --op batch-{self.op}",
            ),
            (1 <= self.clients <= 256, "--clients", self.clients, "1..256"),
            (1 <= self.threads <= 256, "--threads", self.threads, "1..256"),
            (self.duration > 0, "--duration", self.duration, "> 0 seconds"),
            (self.warmup >= 0, "--warmup", self.warmup, ">= 0 seconds"),
            (self.num_keys >= 1, "--num-keys", self.num_keys, ">= 1"),
            (
                self.num_keys >= self.batch or self.op in ("put", "batch-put"),
                "--num-keys",
                self.num_keys,
                f">= the batch size ({self.batch}) so one batch reads distinct keys",
            ),
            (0.0 <= self.read_ratio <= 1.0, "--read-ratio", self.read_ratio, "in [0, 1]"),
            (
                self.slot_size == 0 or self.slot_size >= self.value_size,
                "--slot-size",
                self.slot_size,
                f">= --value-size ({self.value_size})",
            ),
            (
                self.address is None or self.backend in ("server", "mooncake"),
                "--address",
                self.address,
                "given only with --backend server or mooncake",
            ),
            (
                self.address is None or _is_host_port(self.address),
                "--address",
                self.address,
                "HOST:PORT",
            ),
        ]
        for ok, flag, value, valid in checks:
            if not ok:
                raise ConfigError(f"{flag} {value!r} is invalid: must be {valid}")


def _is_host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def auto_slot_size(value_size: int) -> int:
    """The slot for a value: a multiple of 4 KiB from 4 KiB up (page-aligned slots for the disk
    tier's O_DIRECT), else the next power of two, at least 64 bytes (store.slot_size minimum)."""
    if value_size >= 4096:
        return -(-value_size // 4096) * 4096
    return max(64, 1 << (value_size - 1).bit_length())


# -- running the clients ---------------------------------------------------------------------
def _run_processes(specs: list[ClientSpec], on_progress: ProgressFn | None) -> list[ClientResult]:
    """Run one spawned process per spec; they meet at a barrier before every phase. Forwards
    their progress (summed over clients) and returns their results in client order."""
    ctx = mp.get_context("spawn")
    events, results = ctx.Queue(), ctx.Queue()
    barrier = ctx.Barrier(len(specs))
    procs = [
        ctx.Process(target=client_main, args=(s, barrier, events, results), daemon=True)
        for s in specs
    ]
    progress: dict[str, dict[int, tuple[float, float]]] = {}
    collected: dict[int, ClientResult] = {}
    try:
        for p in procs:
            p.start()
        while len(collected) < len(specs):
            while True:
                try:
                    index, phase, done, total, unit = events.get_nowait()
                except queue.Empty:
                    break
                per = progress.setdefault(phase, {})
                per[index] = (done, total)
                if on_progress is not None:
                    on_progress(
                        phase,
                        sum(d for d, _ in per.values()),
                        sum(t for _, t in per.values()),
                        unit,
                    )
            try:
                index, kind, payload = results.get(timeout=0.1)
            except queue.Empty:
                dead = [
                    (i, p.exitcode)
                    for i, p in enumerate(procs)
                    if i not in collected and p.exitcode not in (None, 0)
                ]
                if dead:
                    raise StoreBenchError(
                        f"client {dead[0][0]} exited with status {dead[0][1]}"
                    ) from None
                continue
            if kind != "ok":
                raise StoreBenchError(_first_cause(results, index, kind, payload))
            collected[index] = payload
    finally:
        with contextlib.suppress(Exception):
            barrier.abort()
        for p in procs:
            p.join(timeout=30 if len(collected) == len(specs) else 5)
            if p.is_alive():
                p.terminate()
                p.join()
    return [collected[i] for i in range(len(specs))]


def _first_cause(results: Any, index: int, kind: str, payload: str) -> str:
    """The message of the client that failed first: a client that only saw the barrier break
    (because another one failed) waits up to 2 s for the other's report."""
    deadline = time.monotonic() + 2.0
    while kind == "broken" and (left := deadline - time.monotonic()) > 0:
        try:
            other = results.get(timeout=left)
        except queue.Empty:
            break
        if other[1] not in ("ok", "broken"):
            index, kind, payload = other
    return f"client {index} failed: {payload}"


def _bench_config(options: StoreBenchOptions, config: KvferryConfig) -> KvferryConfig:
    slot = options.slot_size or auto_slot_size(options.value_size)
    store = config.store.model_copy(update={"slot_size": slot, "tiers": [options.backend]})
    return config.model_copy(update={"store": store})


def run_store_bench(
    options: StoreBenchOptions,
    config: KvferryConfig | None = None,
    *,
    on_progress: ProgressFn | None = None,
    hook: PhaseHook | None = None,
) -> StoreBenchReport:
    """Prepare the backend, run every phase on every client, merge and return the report.

    A failed verify does not raise: the report says so (``report.ok``, ``report.failures``);
    :meth:`StoreBenchReport.raise_for_failures` turns it into an error.

    Raises:
        ConfigError: a bad option, a tier that cannot be loaded, keys that do not fit.
        StoreBenchError: a client failed or a server/master did not start.
        MissingDependency: the backend's optional extra is not installed.
    """
    options.validate()
    config = _bench_config(options, config or KvferryConfig())
    load_tier(options.backend)  # fail before any process starts
    nonce = os.urandom(8)
    with contextlib.ExitStack() as stack:
        prepared = PREPARERS[options.backend](options, config, stack)
        specs = [
            ClientSpec(i, options, prepared.configs[i], nonce, hook) for i in range(options.clients)
        ]
        if options.clients == 1:
            clients = [run_client(specs[0], lambda: None, on_progress or (lambda *_: None))]
        else:
            clients = _run_processes(specs, on_progress)
    info = {"name": options.backend, "slot_size": config.store.slot_size, **prepared.info}
    return merge(options, clients, info, prepared.notes)


# -- the report ------------------------------------------------------------------------------
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


@dataclass
class StoreBenchReport:
    options: StoreBenchOptions
    backend: dict[str, object]
    phases: list[PhaseResult]
    verify: VerifyResult | None
    store: dict[str, int]
    notes: list[str] = field(default_factory=list)

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
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": "kvferry bench store",
            "options": asdict(self.options),
            "machine": machine_info(),
            "backend": self.backend,
            "notes": self.notes,
            "phases": [p.to_dict() for p in self.phases],
            "verify": None
            if self.verify is None
            else {**asdict(self.verify), "ok": self.verify.ok},
            "store": self.store,
            "ok": self.ok,
            "failures": self.failures,
        }


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
    return StoreBenchReport(options, dict(backend), phases, verify, store, list(notes))


# -- output ----------------------------------------------------------------------------------
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


def write_json(path: str | os.PathLike[str], report: StoreBenchReport) -> None:
    with open(path, "w") as f:
        json.dump(report.to_json(), f, indent=2)
