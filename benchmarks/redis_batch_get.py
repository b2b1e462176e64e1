"""Redis baseline: batch get of N x S-byte blocks from a real redis-server, in GB/s (1e9 B/s).

Measures, against the same server and the same stored blocks, taking turns:

- ``tier``: ``RedisTier.get`` (kvferry's redis tier: one MGET, reply parsed off the socket
  straight into the output buffers);
- ``mget``: redis-py ``MGET`` (hiredis parser), then one copy per value into the buffers;
- ``pipeline``: redis-py pipelined ``GET`` (transaction=False), then the same copy.

Each method runs ``--warmup`` seconds unmeasured, then batches back to back for ``--duration``
seconds in all, split into ``--rounds`` slices that take turns with the other methods (so that
a shared host's noise falls on all of them alike); the figure is bytes read / time in get.
Unless ``--url`` is given the script starts its own redis-server (no persistence) on a free
port and stops it at the end.

    .venv/bin/python benchmarks/redis_batch_get.py --batch 128 --value-size 65536 --duration 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import redis

from kvferry.backends.base import TierContext
from kvferry.backends.redis import RedisTier
from kvferry.config.models import RedisTierConfig

PREFIX = "bench:redis_batch_get:"


@contextmanager
def redis_server(binary: str) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"redis-server on port {port} did not start")
                time.sleep(0.02)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def percentile(sorted_values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (rank = p/100 * (n-1))."""
    rank = p / 100 * (len(sorted_values) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


def measure(fn: Callable[[], object], warmup: float, duration: float) -> list[float]:
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="", help="existing Redis URL; default: start one")
    parser.add_argument("--redis-server", default="redis-server", help="redis-server binary")
    parser.add_argument("--batch", type=int, default=128, help="blocks per get")
    parser.add_argument("--value-size", type=int, default=65536, help="bytes per block")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per method")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds the duration is split into"
    )
    parser.add_argument("--methods", default="tier,mget,pipeline", help="comma-separated")
    parser.add_argument("--json", default="", help="write the results here as JSON")
    args = parser.parse_args()

    @contextmanager
    def server() -> Iterator[str]:
        if args.url:
            yield args.url
            return
        binary = shutil.which(args.redis_server)
        if binary is None:
            sys.exit(f"{args.redis_server} not found; pass --url or install redis-server")
        with redis_server(binary) as url:
            yield url

    n, size = args.batch, args.value_size
    keys = [i.to_bytes(8, "little") + b"kvferry!" for i in range(n)]
    values = [os.urandom(size) for _ in range(n)]
    outs = [memoryview(bytearray(size)) for _ in range(n)]
    results: dict[str, dict[str, float]] = {}
    with server() as url:
        config = RedisTierConfig(url=url, key_prefix=PREFIX)
        tier = RedisTier(config, TierContext(slot_size=size))
        client = redis.Redis.from_url(url, socket_read_size=1 << 20)
        rkeys = [PREFIX.encode() + k for k in keys]
        try:
            tier.delete(keys)
            tier.put(keys, values)

            def copy(vals: Sequence[object]) -> None:
                for out, v in zip(outs, vals):
                    if isinstance(v, bytes):
                        out[: len(v)] = v  # one copy: reply bytes -> output buffer

            def pipelined() -> None:
                pipe = client.pipeline(transaction=False)
                for rk in rkeys:
                    pipe.get(rk)
                copy(pipe.execute())

            methods: dict[str, Callable[[], object]] = {
                "tier": lambda: tier.get(keys, outs),
                "mget": lambda: copy(client.mget(rkeys)),
                "pipeline": pipelined,
            }
            names = args.methods.split(",")
            for name in names:
                for out in outs:
                    out[:] = bytes(size)
                methods[name]()
                if any(bytes(o) != v for o, v in zip(outs, values)):
                    sys.exit(f"{name}: blocks came back with other bytes")
            # interleaved rounds: on a shared, noisy host every method sees the same weather
            samples: dict[str, list[float]] = {name: [] for name in names}
            for rnd in range(args.rounds):
                for name in names:
                    warmup = args.warmup if rnd == 0 else 0.0
                    samples[name] += measure(methods[name], warmup, args.duration / args.rounds)
            for name in names:
                times = samples[name]
                ordered = sorted(times)
                results[name] = {
                    "gb_per_s": len(times) * n * size / sum(times) / 1e9,
                    "batches": len(times),
                    "p50_ms": percentile(ordered, 50) * 1e3,
                    "p99_ms": percentile(ordered, 99) * 1e3,
                }
                r = results[name]
                print(
                    f"{name:9s} {n} x {size} B: {r['gb_per_s']:.3f} GB/s  "
                    f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  ({len(times)} batches)"
                )
            tier.delete(keys)
        finally:
            client.close()
            tier.close()
    if args.json:
        report = {
            "schema": 1,
            "options": vars(args),
            "machine": {"node": platform.node(), "cpus": os.cpu_count()},
            "redis_py": redis.__version__,
            "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
