"""What one client of the store bench runs: its keys and values, its phases and their timing.

Owns the work inside a client process (or inside the bench's own process when there is one
client): building the store through ``TieredStore(config, tiers=[create_tier(backend, config)])``
(the calls a user makes), the fill, the timed phases, the byte-by-byte verify and the cleanup of
shared tiers, each on ``threads`` threads, and the per-thread tallies of what happened. It knows
nothing about other clients (they meet at ``sync``), about processes or about the report: the
harness (:mod:`kvferry.bench.store.harness`) starts clients and merges their results.

Keys and values: keys are 16 bytes (8 of run prefix, 8 of counter), fresh per run (a random
nonce), so repeated runs against a shared Redis never hit each other's keys. A value is a
``value_size`` window of one seeded random pattern at an offset hashed from its key: any process
derives it from the key alone, values of different keys differ (two keys share an offset with
chance 1/65536), and a put costs no copy to build.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from kvferry.backends.base import PutStatus, Tier
from kvferry.backends.registry import create_tier
from kvferry.backends.server.client import ServerTier
from kvferry.bench.stats import Samples
from kvferry.config.models import KvferryConfig
from kvferry.errors import KvferryError
from kvferry.store.tiered import TieredStore

if TYPE_CHECKING:
    from kvferry.bench.store.options import StoreBenchOptions

__all__ = [
    "BULK_BATCH",
    "EXAMPLES",
    "PATTERN_SPAN",
    "TIMED",
    "ClientResult",
    "ClientSpec",
    "KeySpace",
    "PhaseHook",
    "ProgressFn",
    "StoreBenchError",
    "Tally",
    "VerifyTally",
    "client_main",
    "run_client",
]

BULK_BATCH = 128
"""Keys per store call in fill, verify and cleanup."""
PATTERN_SPAN = 1 << 16
"""Distinct value offsets in the pattern."""
TIMED = ("write_perf", "read_perf", "mixed")
EXAMPLES = 5
"""Bad keys described in a verify report."""

ProgressFn = Callable[[str, float, float, str], None]
"""``(phase, done, total, unit)``; unit is "keys" (fill, verify) or "s" (timed phases)."""


class StoreBenchError(KvferryError):
    """A client failed, or verify found a key missing or different from what was written."""


# -- keys and values -------------------------------------------------------------------------
class KeySpace:
    """The keys and values of one run, derived from (nonce, seed) so that every process agrees."""

    def __init__(self, nonce: bytes, seed: int, value_size: int) -> None:
        self.nonce = nonce
        self.value_size = value_size
        self._fill = xxhash.xxh3_64_digest(nonce + b"fill")
        rng = np.random.default_rng(seed)
        pattern = rng.integers(0, 256, size=value_size + PATTERN_SPAN, dtype=np.uint8)
        self._pattern = memoryview(pattern.tobytes())

    def fill_keys(self, start: int, stop: int) -> list[bytes]:
        """Keys ``start..stop-1`` of the filled set."""
        prefix = self._fill
        return [prefix + i.to_bytes(8, "little") for i in range(start, stop)]

    def write_prefix(self, client: int, thread: int) -> bytes:
        """8-byte prefix of the fresh keys one thread writes (its counter makes the rest)."""
        return xxhash.xxh3_64_digest(
            self.nonce + b"write" + client.to_bytes(4, "little") + thread.to_bytes(4, "little")
        )

    def describe(self, key: bytes) -> str:
        """``filled key #N (hex)`` or ``written key (hex)``, for reports of bad keys."""
        if key.startswith(self._fill):
            return f"filled key #{int.from_bytes(key[8:], 'little')} ({key.hex()})"
        return f"written key ({key.hex()})"

    def value(self, key: bytes) -> memoryview:
        """The bytes stored under ``key`` (a read-only view; no copy)."""
        at = xxhash.xxh3_64_intdigest(key) % PATTERN_SPAN
        return self._pattern[at : at + self.value_size]


PhaseHook = Callable[[str, TieredStore, KeySpace], None]
"""Called in a client after each phase with the phase name, its store and the key space (a
place for fault injection in tests). Must be picklable (module level) when clients > 1."""


# -- per-thread accounting -------------------------------------------------------------------
@dataclass
class Tally:
    """What one thread did in one phase with one kind of op."""

    ops: int = 0
    blocks: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    stored: int = 0
    exists: int = 0
    no_space: int = 0
    seconds: float = 0.0
    samples_ns: Samples = field(default_factory=lambda: Samples(4096))

    def got(self, ns: int, res: Sequence[int | None]) -> None:
        self.ops += 1
        self.blocks += len(res)
        self.samples_ns.add(ns)
        for n in res:
            if n is None:
                self.misses += 1
            else:
                self.hits += 1
                self.bytes += n

    def put(self, ns: int, status: Sequence[PutStatus], value_size: int) -> None:
        self.ops += 1
        self.blocks += len(status)
        self.samples_ns.add(ns)
        for s in status:
            if s is PutStatus.STORED:
                self.stored += 1
                self.bytes += value_size
            elif s is PutStatus.EXISTS:
                self.exists += 1
            else:
                self.no_space += 1


@dataclass
class VerifyTally:
    """What verify found in one client (shared by its threads under a lock)."""

    keys: int = 0
    missing: int = 0
    mismatched: int = 0
    examples: list[str] = field(default_factory=list)

    def bad(self, what: str) -> None:
        if len(self.examples) < EXAMPLES:
            self.examples.append(what)


@dataclass
class ClientResult:
    """Everything one client sends back to the harness."""

    index: int
    shared: bool
    tallies: dict[tuple[str, str], list[Tally]]
    verify: VerifyTally
    counters: dict[str, int]
    """Store counters summed over tiers: evictions, errors, no_space."""


@dataclass(frozen=True)
class ClientSpec:
    """Everything one client needs (picklable: it crosses into a spawned process)."""

    index: int
    options: StoreBenchOptions
    config: KvferryConfig
    nonce: bytes
    hook: PhaseHook | None = None


def _share(n: int, part: int, parts: int) -> range:
    """The ``part``-th of ``parts`` contiguous shares of ``range(n)``."""
    return range(n * part // parts, n * (part + 1) // parts)


def _run_threads(
    target: Callable[[int], None],
    threads: int,
    phase: str,
    emit: ProgressFn,
    status: Callable[[], tuple[float, float, str]],
) -> None:
    """Run ``target(t)`` on ``threads`` threads, report progress every 0.1 s, and re-raise the
    first error once all are done (a phase is bounded: its keys or its deadline)."""
    errors: list[BaseException] = []

    def wrap(t: int) -> None:
        try:
            target(t)
        except BaseException as e:  # a thread's failure ends the phase with that error
            errors.append(e)

    workers = [threading.Thread(target=wrap, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        while w.is_alive():
            w.join(0.1)
            emit(phase, *status())
    emit(phase, *status())
    if errors:
        raise errors[0]


def run_client(spec: ClientSpec, sync: Callable[[], None], emit: ProgressFn) -> ClientResult:
    """One client: open the store, run every phase (meeting the others at ``sync`` before each),
    clean up, and return what its threads measured."""
    opts, ks = spec.options, KeySpace(spec.nonce, spec.options.seed, spec.options.value_size)
    tier = create_tier(opts.backend, spec.config)
    try:
        store = TieredStore(spec.config, tiers=[tier])
    except BaseException:
        tier.close()
        raise
    tallies: dict[tuple[str, str], list[Tally]] = {}
    verify = VerifyTally()
    written = [0] * opts.threads
    shared = store.first.shared
    fill_range = _share(opts.num_keys, spec.index, opts.clients) if shared else range(opts.num_keys)
    wrote = False  # nothing to clean up from a shared tier before the fill began
    try:
        # One real round trip before anything is timed: a tier that cannot be reached fails
        # here with its own message instead of reading as a run of misses.
        store.first.contains([ks.fill_keys(0, 1)[0]])
        all_keys = ks.fill_keys(0, opts.num_keys)
        # A store server evicts on its own side; client 0 reads its count before the first
        # barrier and after the last, so the run's evictions are counted once.
        watch = isinstance(store.first, ServerTier) and spec.index == 0
        evicted_before = _server_evictions(store.first) if watch else 0
        sync()
        for phase in opts.phases:
            if phase == "fill":
                wrote = True
                keys = ks.fill_keys(fill_range.start, fill_range.stop)
                tallies[(phase, "put")] = _bulk(store, ks, keys, opts, phase, emit, None)
            elif phase == "verify":
                # Everything this client wrote: its fill keys and the fresh keys of the timed
                # phase (a local tier may have evicted some; the verdict allows for that).
                keys = ks.fill_keys(fill_range.start, fill_range.stop)
                keys += _written_keys(ks, spec.index, written)
                tallies[(phase, "get")] = _bulk(store, ks, keys, opts, phase, emit, verify)
            else:
                tallies.update(_timed(store, ks, all_keys, spec, phase, emit, written))
            if spec.hook is not None:
                spec.hook(phase, store, ks)
            sync()
        stats = store.stats()
        counters = {
            "evictions": sum(c.evictions for c in stats.tiers.values()),
            "errors": sum(c.errors for c in stats.tiers.values()),
            "no_space": sum(c.no_space for c in stats.tiers.values()),
        }
        if watch:
            counters["evictions"] += _server_evictions(store.first) - evicted_before
    finally:
        try:
            if shared and wrote:
                _cleanup(store, ks, spec, fill_range, written)
        finally:
            store.close()
    return ClientResult(spec.index, shared, tallies, verify, counters)


def _server_evictions(tier: Tier) -> int:
    """Blocks the store servers behind a server tier have evicted so far, over all their
    tiers (their STATS)."""
    assert isinstance(tier, ServerTier)
    total = 0
    for doc in tier.server_stats().values():
        tiers = doc.get("tiers", {})
        total += sum(int(row.get("evictions", 0)) for row in tiers.values())
    return total


def _bulk(
    store: TieredStore,
    ks: KeySpace,
    keys: list[bytes],
    opts: StoreBenchOptions,
    phase: str,
    emit: ProgressFn,
    verify: VerifyTally | None,
) -> list[Tally]:
    """Put (verify is None) or get and compare ``keys``, split over the threads."""
    tallies = [Tally() for _ in range(opts.threads)]
    done = [0] * opts.threads
    lock = threading.Lock()

    def work(t: int) -> None:
        mine, tally = _share(len(keys), t, opts.threads), tallies[t]
        clock, vs = time.perf_counter_ns, opts.value_size
        outs = [memoryview(bytearray(vs)) for _ in range(BULK_BATCH)]
        began = clock()
        for a in range(mine.start, mine.stop, BULK_BATCH):
            b = min(a + BULK_BATCH, mine.stop)
            batch = keys[a:b]
            if verify is None:
                values = [ks.value(k) for k in batch]
                t0 = clock()
                status = store.put(batch, values)
                tally.put(clock() - t0, status, vs)
            else:
                t0 = clock()
                got = store.get(batch, outs[: len(batch)])
                tally.got(clock() - t0, got)
                with lock:
                    _compare(ks, batch, outs, got, verify)
            done[t] += len(batch)
        tally.seconds = (clock() - began) / 1e9

    _run_threads(
        work, opts.threads, phase, emit, lambda: (float(sum(done)), float(len(keys)), "keys")
    )
    return tallies


def _compare(
    ks: KeySpace,
    batch: list[bytes],
    outs: list[memoryview],
    got: list[int | None],
    verify: VerifyTally,
) -> None:
    for k, out, n in zip(batch, outs, got):
        verify.keys += 1
        if n is None:
            verify.missing += 1
            verify.bad(f"{ks.describe(k)} is missing")
            continue
        want = ks.value(k)
        if n != len(want) or out[:n].tobytes() != want.tobytes():
            verify.mismatched += 1
            have = out[:n].tobytes()
            at = next((j for j, (x, y) in enumerate(zip(have, want.tobytes())) if x != y), n)
            verify.bad(
                f"{ks.describe(k)} differs: {n} bytes read, "
                f"{len(want)} written, first difference at byte {at}"
            )


def _timed(
    store: TieredStore,
    ks: KeySpace,
    all_keys: list[bytes],
    spec: ClientSpec,
    phase: str,
    emit: ProgressFn,
    written: list[int],
) -> dict[tuple[str, str], list[Tally]]:
    """Run a timed phase: ``warmup`` seconds unrecorded, then ``duration`` seconds recorded."""
    opts = spec.options
    batch, vs, n_keys = opts.batch, opts.value_size, len(all_keys)
    gets = [Tally() for _ in range(opts.threads)]
    puts = [Tally() for _ in range(opts.threads)]
    ratio = {"read_perf": 1.0, "write_perf": 0.0}.get(phase, opts.read_ratio)
    t_start = time.perf_counter_ns()
    warm_end = t_start + int(opts.warmup * 1e9)
    end = warm_end + int(opts.duration * 1e9)
    total = opts.warmup + opts.duration

    def work(t: int) -> None:
        rng = random.Random(opts.seed * 1_000_003 + spec.index * 1009 + t)
        outs = [memoryview(bytearray(vs)) for _ in range(batch)]
        prefix = ks.write_prefix(spec.index, t)
        pos = rng.randrange(n_keys) if n_keys else 0
        g, p = gets[t], puts[t]
        clock, value = time.perf_counter_ns, ks.value
        began = 0
        while True:
            now = clock()
            if now >= end:
                break
            measuring = now >= warm_end
            if measuring and not began:
                began = now
            if ratio >= 1.0 or (ratio > 0.0 and rng.random() < ratio):
                if pos + batch <= n_keys:
                    keys = all_keys[pos : pos + batch]
                else:
                    keys = all_keys[pos:] + all_keys[: pos + batch - n_keys]
                pos = (pos + batch) % n_keys
                t0 = clock()
                got = store.get(keys, outs)
                dt = clock() - t0
                if measuring:
                    g.got(dt, got)
            else:
                n = written[t]
                keys = [prefix + (n + i).to_bytes(8, "little") for i in range(batch)]
                written[t] = n + batch
                values = [value(k) for k in keys]
                t0 = clock()
                status = store.put(keys, values)
                dt = clock() - t0
                if measuring:
                    p.put(dt, status, vs)
        seconds = (clock() - began) / 1e9 if began else 0.0
        g.seconds = p.seconds = seconds

    def status() -> tuple[float, float, str]:
        elapsed = (time.perf_counter_ns() - t_start) / 1e9
        return min(elapsed, total), total, "s"

    _run_threads(work, opts.threads, phase, emit, status)
    out: dict[tuple[str, str], list[Tally]] = {}
    if ratio > 0.0:
        out[(phase, "get")] = gets
    if ratio < 1.0:
        out[(phase, "put")] = puts
    return out


def _written_keys(ks: KeySpace, client: int, written: list[int]) -> list[bytes]:
    """The fresh keys the threads of ``client`` put (``written[t]`` each, warm-up included)."""
    keys: list[bytes] = []
    for t, n in enumerate(written):
        prefix = ks.write_prefix(client, t)
        keys.extend(prefix + i.to_bytes(8, "little") for i in range(n))
    return keys


def _cleanup(
    store: TieredStore, ks: KeySpace, spec: ClientSpec, fill: range, written: list[int]
) -> None:
    """Delete from a shared tier every key this client wrote (its share of the fill too)."""
    keys = ks.fill_keys(fill.start, fill.stop) + _written_keys(ks, spec.index, written)
    for a in range(0, len(keys), BULK_BATCH * 8):
        store.delete(keys[a : a + BULK_BATCH * 8])


# -- the entry point of a spawned client ------------------------------------------------------
def client_main(
    spec: ClientSpec, barrier: Any, events: Any, results: Any
) -> None:  # pragma: no cover - runs in a spawned process (its work is covered in-process)
    def emit(phase: str, done: float, total: float, unit: str) -> None:
        events.put((spec.index, phase, done, total, unit))

    def sync() -> None:
        barrier.wait()

    try:
        result = run_client(spec, sync, emit)
    except BaseException as e:
        if isinstance(e, threading.BrokenBarrierError):
            kind = "broken"  # another client failed first; its own report says why
        else:
            kind = "kvferry" if isinstance(e, KvferryError) else "crash"
        text = str(e) if kind == "kvferry" else traceback.format_exc()
        results.put((spec.index, kind, f"{type(e).__name__}: {text}"))
        with contextlib.suppress(Exception):
            barrier.abort()
        return
    results.put((spec.index, "ok", result))
