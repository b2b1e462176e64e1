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
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from kvferry.backends.registry import load_tier
from kvferry.bench.result import EffectiveConfig, Reference
from kvferry.bench.store.backends import BACKENDS
from kvferry.bench.store.client import (
    ClientResult,
    ClientSpec,
    KeySpace,
    PhaseHook,
    ProgressFn,
    StoreBenchError,
    client_main,
    run_client,
)
from kvferry.bench.store.options import OPS, StoreBenchOptions, auto_slot_size
from kvferry.bench.store.report import (
    COLUMNS,
    PhaseResult,
    StoreBenchReport,
    VerifyResult,
    merge,
    row,
    write_csv,
)
from kvferry.config.models import KvferryConfig

__all__ = [
    "BACKENDS",
    "COLUMNS",
    "OPS",
    "KeySpace",
    "PhaseHook",
    "PhaseResult",
    "ProgressFn",
    "StoreBenchError",
    "StoreBenchOptions",
    "StoreBenchReport",
    "VerifyResult",
    "auto_slot_size",
    "row",
    "run",
    "write_csv",
]


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


_BENCH_KEYS = {"store.slot_size": "bench", "store.tiers": "bench"}
"""Keys a run sets itself (from its options), whatever the config said."""


def _bench_config(options: StoreBenchOptions, config: KvferryConfig) -> KvferryConfig:
    slot = options.slot_size or auto_slot_size(options.value_size)
    store = config.store.model_copy(update={"slot_size": slot, "tiers": [options.backend]})
    return config.model_copy(update={"store": store})


def run(
    options: StoreBenchOptions,
    progress: ProgressFn | None = None,
    *,
    config: KvferryConfig | None = None,
    sources: Mapping[str, str] | None = None,
    hook: PhaseHook | None = None,
) -> StoreBenchReport:
    """Prepare the backend, run every phase on every client, merge and return the report.

    A failed verify does not raise: the report says so (``report.ok``, ``report.failures``);
    :meth:`StoreBenchReport.raise_for_failures` turns it into an error.

    Args:
        options: the run.
        progress: ``(phase, done, total, unit)``, summed over clients.
        config: the config the store is built from (its ``store.slot_size`` and ``store.tiers``
            are the run's own: from ``options``); the defaults when None.
        sources: where each dotted key of ``config`` came from (``LoadedConfig.sources``), for
            the report's effective config.
        hook: called in every client after each phase (tests use it to damage the store).

    Raises:
        ConfigError: a tier that cannot be loaded, keys that do not fit.
        StoreBenchError: a client failed or a server/master did not start.
        MissingDependency: the backend's optional extra is not installed.
    """
    config = _bench_config(options, config or KvferryConfig())
    load_tier(options.backend)  # fail before any process starts
    started = time.time()
    nonce = os.urandom(8)
    with contextlib.ExitStack() as stack:
        prepared = BACKENDS[options.backend].prepare(options, config, stack)
        specs = [
            ClientSpec(i, options, prepared.configs[i], nonce, hook) for i in range(options.clients)
        ]
        if options.clients == 1:
            clients = [run_client(specs[0], lambda: None, progress or (lambda *_: None))]
        else:
            clients = _run_processes(specs, progress)
    info = {"name": options.backend, "slot_size": config.store.slot_size, **prepared.info}
    report = merge(options, clients, info, prepared.notes)
    report.config = EffectiveConfig.of(config, {**(sources or {}), **_BENCH_KEYS})
    if options.reference and options.backend == "disk":
        report.references.append(_fio_reference(options, config))
    elif options.reference:
        report.notes.append(f"--reference: no same-run reference for backend {options.backend}")
    report.started_at, report.ended_at = started, time.time()
    return report


FIO_MAX_FILE = 1 << 30
"""fio's file at most this big: the bench's keys' bytes, capped (no command takes gigabytes of
disk that the user did not ask for)."""


def _fio_reference(options: StoreBenchOptions, config: KvferryConfig) -> Reference:
    """fio on the disk tier's directory: sequential reads (a get op) or writes (a put op) of
    the slot size, one job per client thread, ``min(batch, disk.io_threads)`` in flight each
    (the tier's own parallelism for a batch), time based over the timed phase's duration."""
    from kvferry.backends.disk import default_root
    from kvferry.bench.fio import run_fio

    directory = str(Path(config.disk.path).expanduser()) if config.disk.path else default_root()
    os.makedirs(directory, exist_ok=True)
    rw: Literal["read", "write"] = "write" if options.op in ("put", "batch-put") else "read"
    jobs = options.clients * options.threads
    depth = max(1, min(options.batch, config.disk.io_threads))
    size = min(FIO_MAX_FILE, max(options.num_keys * config.store.slot_size, 64 << 20))
    got = run_fio(
        directory,
        rw=rw,
        block_size=config.store.slot_size,
        size_bytes=size,
        iodepth=depth,
        numjobs=jobs,
        direct=config.disk.direct_io,
        runtime_s=options.duration,
    )
    return Reference(
        name=f"fio_{rw}",
        value=got["gbps"],
        unit="GB/s",
        detail={
            "block_size": config.store.slot_size,
            "iodepth": depth,
            "numjobs": jobs,
            "direct": config.disk.direct_io,
            "file_bytes": size,
            "lat_p99_us": got.get("lat_p99_us"),
        },
    )
