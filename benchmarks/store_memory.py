"""Memory cost of the store's index and bookkeeping per cached block, and RSS under churn.

    .venv/bin/python benchmarks/store_memory.py --blocks 1000000
    .venv/bin/python benchmarks/store_memory.py --churn-seconds 600

Part 1 fills a cpu-only TieredStore with N tiny blocks and reports (RSS after - RSS before -
pool bytes) / N: what the prefix index, the eviction policy, the tier's slot map and the key
objects cost per block. Part 2 runs put/get/evict churn over a store 4x smaller than the key
space for the given time and samples peak RSS (VmHWM) and current RSS each 10% of the run:
a flat line means no growth per request.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from kvferry.config.models import CpuTierConfig, KvferryConfig, StoreConfig
from kvferry.store import TieredStore


def rss_bytes() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value, _unit = line.split()
                out[name[:-1]] = int(value) * 1024
    return out["VmRSS"], out["VmHWM"]


def per_block(n: int, slot: int) -> dict[str, float]:
    cfg = KvferryConfig(
        store=StoreConfig(tiers=["cpu"], slot_size=slot, evict_start_threshold=1.0),
        cpu=CpuTierConfig(buffer_number=n),
    )
    before, _ = rss_bytes()
    store = TieredStore(cfg)
    pool_touched, _ = rss_bytes()
    value = b"v" * 16
    batch = 1024
    for start in range(0, n, batch):
        keys = [os.urandom(16) for _ in range(min(batch, n - start))]
        store.put(keys, [value] * len(keys))
    after, _ = rss_bytes()
    assert store.stats().usage["cpu"].used_blocks == n
    store.close()
    return {
        "blocks": n,
        "pool_bytes": n * slot,
        "rss_pool_only": pool_touched - before,
        "bytes_per_block": (after - pool_touched) / n,
    }


def churn(seconds: float, slot: int) -> dict[str, object]:
    cfg = KvferryConfig(
        store=StoreConfig(tiers=["cpu"], slot_size=slot), cpu=CpuTierConfig(buffer_number=65536)
    )
    store = TieredStore(cfg)
    rng = random.Random(1)
    keys = [rng.randbytes(16) for _ in range(4 * 65536)]
    value = b"x" * slot
    outs = [memoryview(bytearray(slot)) for _ in range(64)]
    samples = []
    t0 = time.monotonic()
    ops = 0
    next_sample = 0.0
    while (elapsed := time.monotonic() - t0) < seconds:
        ks = rng.sample(keys, 64)
        if rng.random() < 0.5:
            store.put(ks, [value] * 64)
        else:
            store.get(ks, outs)
            h = store.prepare_load(ks[:8])
            store.complete_load(h)
        ops += 1
        if elapsed >= next_sample:
            rss, hwm = rss_bytes()
            samples.append({"t": round(elapsed, 1), "rss_mib": rss / 2**20, "hwm_mib": hwm / 2**20})
            next_sample += seconds / 10
    rss, hwm = rss_bytes()
    samples.append({"t": round(seconds, 1), "rss_mib": rss / 2**20, "hwm_mib": hwm / 2**20})
    st = store.stats()
    store.close()
    return {
        "seconds": seconds,
        "batches": ops,
        "evictions": st.tiers["cpu"].evictions,
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--slot", type=int, default=64)
    ap.add_argument("--churn-seconds", type=float, default=0.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    result: dict[str, object] = {}
    if args.blocks:
        result["per_block"] = per_block(args.blocks, args.slot)
        print(json.dumps(result["per_block"]))
    if args.churn_seconds:
        result["churn"] = churn(args.churn_seconds, 4096)
        for s in result["churn"]["samples"]:  # type: ignore[index]
            print(s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
