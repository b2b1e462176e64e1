"""Store-server failover: batch gets across two registered servers, before and after a kill -9.

Starts its own redis-server and two ``kvferry serve store --register`` servers (membership TTL
``--ttl``), stores ``--blocks`` blocks of ``--block-size`` bytes through a server tier that reads
the membership, then batch-gets all of them in a loop:

- before: ``--batches`` batches; blocks returned and ms per batch;
- SIGKILL one server; the next batch (the first to fail on it): blocks returned, its ms, and
  whether the dead server is out of the client's view right after it (the time from the kill to
  that moment is the "out of view" figure; nothing waits for the lease's TTL);
- during: ``--batches`` more batches; and how long until Redis itself drops the lease (the TTL);
- restart the server on its port: how long until the client uses it again.

Every returned block is checked against the bytes stored under its key.

    .venv/bin/python benchmarks/server_failover.py --blocks 1000 --block-size 65536
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kvferry.backends.base import TierContext
from kvferry.backends.server.client import ServerTier
from kvferry.backends.server.membership import read_members
from kvferry.config.models import ServerTierConfig
from kvferry.testing.redis_server import RedisProcesses
from kvferry.testing.store_server import StoreServerProcess


def block(i: int, size: int) -> bytes:
    return (i.to_bytes(8, "little") * (size // 8 + 1))[:size]


def batch(view: ServerTier, keys: list[bytes], outs: list[memoryview], size: int) -> int:
    got = view.get(keys, outs)
    for i, n in enumerate(got):
        if n is not None and bytes(outs[i][:n]) != block(i, size):
            raise SystemExit(f"block {i} came back with wrong bytes")
    return sum(n is not None for n in got)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=1000)
    ap.add_argument("--block-size", type=int, default=65536)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--ttl", type=float, default=3.0, help="server.membership_ttl")
    ap.add_argument("--poll", type=float, default=1.0, help="server.membership_poll")
    ap.add_argument("--transport", choices=["auto", "tcp"], default="auto")
    args = ap.parse_args()
    size = args.block_size
    capacity = f"{(args.blocks * size * 2) >> 20}MiB"
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisProcesses(Path(tmp))
        servers: list[StoreServerProcess] = []
        try:
            url = redis().url
            reg = ["--register", url, "--set", f"server.membership_ttl={args.ttl}"]
            for _ in range(2):
                s = StoreServerProcess(*reg, slot_size=size, capacity=capacity)
                servers.append(s.start())
            cfg = ServerTierConfig(
                membership_url=url,
                membership_key="kvferry:store-servers",
                membership_poll=args.poll,
                transport=args.transport,
            )
            prefix = cfg.membership_key
            view = ServerTier(cfg, TierContext(slot_size=size))
            keys = [i.to_bytes(16, "little") for i in range(args.blocks)]
            view.put(keys, [block(i, size) for i in range(args.blocks)])
            outs = [memoryview(bytearray(size)) for _ in keys]
            victim = servers[1]
            share = len(view._ring.split(keys)[victim.address])
            print(
                f"{args.blocks} blocks of {size} B on 2 servers (survivor {args.blocks - share}, "
                f"victim {share}), transport {args.transport}, membership TTL {args.ttl:g} s, "
                f"poll {args.poll:g} s; load average {load:.2f}, {os.cpu_count()} cpus"
            )

            def run(n: int) -> tuple[list[int], list[float]]:
                got, ms = [], []
                for _ in range(n):
                    t0 = time.perf_counter()
                    got.append(batch(view, keys, outs, size))
                    ms.append((time.perf_counter() - t0) * 1e3)
                return got, ms

            got, ms = run(args.batches)
            print(f"before: {got} blocks per batch, {statistics.median(ms):.1f} ms (median)")
            victim.kill()
            t_kill = time.perf_counter()
            n = batch(view, keys, outs, size)
            first_ms = (time.perf_counter() - t_kill) * 1e3
            out_of_view = victim.address in view.down_members()
            print(
                f"kill -9 {victim.address}; next batch: {n} blocks in {first_ms:.1f} ms, no "
                f"error; dead server out of view right after it: {out_of_view} "
                f"({first_ms:.1f} ms after the kill)"
            )
            got, ms = run(args.batches)
            print(f"during: {got} blocks per batch, {statistics.median(ms):.1f} ms (median)")
            while victim.address in read_members(url, prefix, 2.0):
                time.sleep(0.01)
            print(f"Redis dropped its lease {time.perf_counter() - t_kill:.2f} s after the kill")
            victim.start()
            t_up = time.perf_counter()
            # Its lease expired, so the client dropped it from the member list: back = listed
            # and not marked down.
            while victim.address not in view._ring.members:
                time.sleep(0.01)
            print(
                f"restarted on {victim.address}: back in use after "
                f"{time.perf_counter() - t_up:.2f} s"
            )
            st = view.stats().extra
            print(
                "client counters: "
                + ", ".join(
                    f"{k} {int(st[k])}"
                    for k in ("down_misses", "failed_calls", "marked_down", "put_dropped")
                )
            )
            view.close()
        finally:
            for s in servers:
                s.kill()
            redis.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
