"""Replay: a trace against the store a config describes, with real bytes, at the trace's
timestamps (scaled) or as fast as possible.

Owns :func:`replay`. It runs the same per-request calls as a simulation over the configured
tiers (cpu, disk, redis, server, ...), so a replay's hit rate equals a simulation's with the
same capacities, policy and watermarks (a test holds them to it), and adds what only real bytes
show: latency, bandwidth, RSS, and a check of every block read back.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from typing import Any

from kvferry.bench.hitrate.simulation import (
    HitRateResult,
    ProgressFn,
    Tally,
    _store_config,
    _tier_counts,
    trace_keys,
)
from kvferry.bench.hitrate.spec import HitRateError, TierSpec
from kvferry.bench.stats import Samples
from kvferry.bench.traces import Trace
from kvferry.config.models import KvferryConfig
from kvferry.store.tiered import TieredStore

__all__ = ["replay"]


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def replay(
    trace: Trace,
    config: KvferryConfig,
    *,
    kv_bytes_per_token: int,
    policy: str | None = None,
    speedup: float | None = None,
    on_progress: ProgressFn | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> HitRateResult:
    """Replay ``trace`` against the store the config describes, with real bytes.

    Each block is ``kv_bytes_per_token * block_tokens`` bytes (``store.slot_size`` is set to
    that); every put block carries its key in its first 16 bytes and every block read back is
    checked for it, so a store that served the wrong bytes shows as ``corrupt_blocks``.

    Args:
        trace: the requests, replayed in file order.
        config: tiers and their capacities (``store.tiers``, ``cpu.capacity``, ...).
        kv_bytes_per_token: from the model's KV geometry (:func:`kv_bytes_per_token`).
        policy: eviction policy (default: the config's).
        speedup: replay at the trace's timestamps divided by this; None: as fast as possible.

    Reports, beside the hit rates: QPS, request latency and per-block get/put latency
    percentiles, effective bandwidth (bytes read + written per second), the write ratio, and
    RSS at the start, the end and its peak.
    """
    if kv_bytes_per_token < 1:
        raise HitRateError("kv_bytes_per_token must be >= 1")
    if speedup is not None and not speedup > 0:
        raise HitRateError(f"speedup must be > 0, got {speedup}")
    block_bytes = kv_bytes_per_token * trace.block_tokens
    cfg = _store_config(config, policy or config.store.eviction_policy, block_bytes)
    salt = os.urandom(8)
    keys = trace_keys(trace, salt)
    longest = max((len(k) for k in keys), default=0)
    arena = bytearray(block_bytes * max(longest, 1))
    outs = [memoryview(arena)[i * block_bytes : (i + 1) * block_bytes] for i in range(longest)]
    src = bytearray(block_bytes * max(longest, 1))
    for i in range(0, len(src), 4096):  # a non-zero pattern, so a dropped copy is visible
        src[i : i + 8] = i.to_bytes(8, "little")
    values = [memoryview(src)[i * block_bytes : (i + 1) * block_bytes] for i in range(longest)]
    store = TieredStore(cfg)
    tally = Tally()
    bt = trace.block_tokens
    request_us = Samples()
    get_block_us = Samples()
    put_block_us = Samples()
    bytes_read = bytes_written = corrupt = late = 0
    rss = [_rss_mib()]
    rss_every = max(1, len(trace.requests) // 50)
    total = len(trace.requests)
    t0_trace = trace.requests[0].timestamp_ms if trace.requests else 0.0
    try:
        start = clock()
        for i, (req, ks) in enumerate(zip(trace.requests, keys)):
            if speedup is not None:
                due = start + (req.timestamp_ms - t0_trace) / 1000.0 / speedup
                wait = due - clock()
                if wait > 0:
                    sleep(wait)
                elif wait < -0.001:
                    late += 1
            for j, k in enumerate(ks):  # the key in the first 16 bytes of each block put
                values[j][:16] = k
            t0 = time.perf_counter_ns()
            n = store.lookup(ks)
            t1 = time.perf_counter_ns()
            hit = 0
            if n:
                got = store.get(ks[:n], outs[:n], depth=0)
                for j, length in enumerate(got):
                    if length is None:
                        break
                    if outs[j][:16] != ks[j] or length != block_bytes:
                        corrupt += 1
                        break
                    hit += 1
            t2 = time.perf_counter_ns()
            if hit < len(ks):
                store.put(ks[hit:], values[hit : len(ks)], depth=hit)
            t3 = time.perf_counter_ns()
            tally.add(req, len(ks), hit, bt)
            request_us.add((t3 - t0) / 1e3)
            if hit:
                get_block_us.add((t2 - t1) / 1e3 / hit)
                bytes_read += hit * block_bytes
            if hit < len(ks):
                put_block_us.add((t3 - t2) / 1e3 / (len(ks) - hit))
                bytes_written += (len(ks) - hit) * block_bytes
            if i % rss_every == 0:
                rss.append(_rss_mib())
                if on_progress is not None:
                    on_progress(i, total)
        seconds = clock() - start
        rss.append(_rss_mib())
        hits, promotions, demotions, evictions, dropped = _tier_counts(store)
        tier_specs = [TierSpec(t.label, t.capacity_blocks) for t in store.tiers]
    finally:
        store.close()
    if on_progress is not None:
        on_progress(total, total)
    moved = bytes_read + bytes_written
    extra: dict[str, Any] = {
        "block_bytes": block_bytes,
        "kv_bytes_per_token": kv_bytes_per_token,
        "speedup": speedup,
        "qps": total / seconds if seconds > 0 else 0.0,
        "requests_late": late,
        "request_latency_us": request_us.summary().to_dict() if len(request_us) else None,
        "get_latency_per_block_us": get_block_us.summary().to_dict() if len(get_block_us) else None,
        "put_latency_per_block_us": put_block_us.summary().to_dict() if len(put_block_us) else None,
        "bytes_read": bytes_read,
        "bytes_written": bytes_written,
        "bandwidth_gbps": moved / seconds / 1e9 if seconds > 0 else 0.0,
        "write_ratio": bytes_written / moved if moved else 0.0,
        "corrupt_blocks": corrupt,
        "rss_start_mib": rss[0],
        "rss_end_mib": rss[-1],
        "rss_peak_mib": max(rss),
        "rss_samples_mib": rss,
    }
    return HitRateResult(
        mode="replay",
        policy=cfg.store.eviction_policy,
        tiers=tier_specs,
        tally=tally,
        tier_hit_blocks=hits,
        promotions=promotions,
        demotions=demotions,
        evictions=evictions,
        dropped=dropped,
        seconds=seconds,
        replay=extra,
    )
