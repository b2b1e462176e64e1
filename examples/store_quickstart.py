"""The tiered store from Python: hash tokens, put blocks, look up a prefix, load it back.

.venv/bin/python examples/store_quickstart.py
"""

from __future__ import annotations

import tempfile

from kvferry import BlockHasher, TieredStore, load_config

with tempfile.TemporaryDirectory() as disk_dir:
    config = load_config(
        flags={
            "store.tiers": ["cpu", "disk"],
            "store.slot_size": "4KiB",
            "cpu.capacity": "64KiB",  # 16 slots: small, so eviction demotes to disk
            "disk.path": disk_dir,
            "disk.capacity": "4MiB",
        }
    ).config
    hasher = BlockHasher(tokens_per_block=16, model_name="tiny-llama", cache_salt="tenant-a")
    tokens = list(range(40 * 16 + 5))  # 40 full blocks and a partial one (never a key)
    hashes = hasher.hashes(tokens)
    blocks = [bytes([i]) * 4096 for i in range(len(hashes))]

    with TieredStore(config) as store:
        print("put:", {s.value for s in store.put(hashes, blocks)})
        print("lookup (all tiers):", store.lookup(hashes), "of", len(hashes))
        print("lookup (cpu only):", store.lookup(hashes, tier="cpu"))
        other = BlockHasher(16, model_name="tiny-llama", cache_salt="tenant-b").hashes(tokens)
        print("tenant-b sees:", store.lookup(other))

        handle = store.prepare_load(hashes[:8])  # promote from disk, pin, lend read-only views
        print("loaded:", handle.n, "blocks; first byte of each:", [b[0] for b in handle.buffers])
        store.complete_load(handle)

        ticket = store.prepare_store(hasher.hashes(list(range(1000, 1032))))
        for i in ticket.pending():
            ticket.buffers[i][:] = b"\x07" * 4096  # e.g. a device-to-host copy lands here
        print("two-phase put:", [s.value for s in store.complete_store(ticket)])

        stats = store.stats()
        print(
            f"hit rate {stats.hit_rate:.3f} (block-weighted), "
            f"{stats.request_hit_rate_mean:.3f} (per-request mean)"
        )
        for name, tier in stats.tiers.items():
            print(
                f"  {name}: evictions={tier.evictions} demotions={tier.demotions} "
                f"promotions={tier.promotions} used={stats.usage[name].used_blocks}"
            )
