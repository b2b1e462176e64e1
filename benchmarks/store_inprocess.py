"""In-process store: batch-get of 4 KiB blocks (128 per call) and the lookup of a 64-block prefix.

.venv/bin/python benchmarks/store_inprocess.py
"""

import time

import numpy as np

from kvferry.config.models import CpuTierConfig, KvferryConfig, StoreConfig
from kvferry.store import TieredStore

BLOCK = 4096
BATCH = 128
N_KEYS = 4096


def main() -> None:
    cfg = KvferryConfig(
        store=StoreConfig(tiers=["cpu"], slot_size=BLOCK), cpu=CpuTierConfig(buffer_number=8192)
    )
    store = TieredStore(cfg)
    keys = [i.to_bytes(16, "little") for i in range(N_KEYS)]
    for i in range(0, N_KEYS, BATCH):
        store.put(keys[i : i + BATCH], [b"x" * BLOCK] * BATCH)
    out = np.zeros((BATCH, BLOCK), np.uint8)
    views = [memoryview(out[i]) for i in range(BATCH)]
    batches = [keys[i * BATCH : (i + 1) * BATCH] for i in range(N_KEYS // BATCH)]

    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1:
        for batch in batches:
            store.get(batch, views)
            n += BATCH
    print("get", n / (time.perf_counter() - t0), "blocks/s")

    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1:
        for batch in batches:
            store.lookup(batch[:64])
            n += 1
    print("lookup64", 1e6 * (time.perf_counter() - t0) / n, "us")


if __name__ == "__main__":
    main()
