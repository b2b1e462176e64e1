"""Scale-out across network namespaces: 3 store servers on 3 "hosts", a kill -9 mid-replay.

Needs root and iproute2 (``kvferry.testing.netns``). Makes a NetLab: a redis-server (the
membership) in one namespace and ``--servers`` ``kvferry serve store --register`` servers in one
namespace each, all joined by veth pairs to a bridge; the client (this process, in the root
namespace) reaches them by tcp over those interfaces (``server.transport: tcp``).

1. Failover (issue 26's goals). A TieredStore over the server tier replays the trace: per
   request a prefix lookup, a get of the hit blocks, a put of the rest (``depth`` given, so
   blocks are placed by prefix chunk). Every block carries its key and is checked on read. The
   replay runs twice on disjoint keys: a control run with no failure, then a run that kill -9s
   one server after ``--kill-at`` of the requests and restarts it (same namespace, same port)
   after ``--restart-at``. Per phase (before / during / after): block-weighted prefix hit rate,
   of the failover run and of the control run over the same requests, and their ratio;
   failed client calls (exceptions out of the store, and tier calls that failed as a whole);
   blocks with wrong bytes; the time from the kill until the dead server is out of the client's
   view, and from the restarted server's ready line until the client uses it again.
2. Throughput: ``--threads`` client threads doing batch gets of ``--batch`` blocks for
   ``--seconds`` against one server, then against all of them (same run, same blocks): blocks/s
   and GB/s (1e9 B/s). Two layouts over all servers: each batch one request's prefix (one
   chunk, so one server per batch), and each batch spread over every server (blocks placed by
   their own keys: one call asks all servers at once, ``server.fanout``).

``--link-rate`` gives each server namespace's link a line rate (``tc tbf`` both ways,
``Netns.set_rate``), as each machine has its own NIC. Without it every "host" shares this
machine's cores and memory bandwidth with the client and the other servers, so more servers
cannot give more than the machine: the unlimited run shows the CPU-bound case, the limited one
whether the aggregate grows with the servers' links as it does across machines.

Smoke run (tiny sizes, not a measurement):

    sudo .venv/bin/python benchmarks/scaleout_netns.py --requests 200 --block-size 4096 \\
        --seconds 1 --threads 2

A recording: ``--requests 3993 --block-size 65536 --capacity 4GiB --seconds 10 --threads 8``
with and without ``--replicas 2``, and with ``--link-rate 1gbit`` (``--json`` writes the
numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kvferry.backends.base import TierContext
from kvferry.backends.server.client import ServerTier
from kvferry.bench.traces import read_trace, resolve_trace
from kvferry.config.models import KvferryConfig, ServerTierConfig, StoreConfig
from kvferry.store import TieredStore
from kvferry.testing.netns import NetLab, Netns, netns_unavailable
from kvferry.testing.store_server import StoreServerProcess

REDIS_PORT = 6379


def parse_rate(text: str) -> int:
    """Bits/s of "1gbit", "500mbit", "100000kbit" or a plain number."""
    units = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1}
    t = text.strip().lower()
    for unit, mult in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    if t.isdigit():
        return int(t)
    raise SystemExit(f"--link-rate {text!r}: give a rate like 1gbit, 500mbit or 100000kbit")


def value(key: bytes, size: int) -> bytes:
    """A block that carries its key: the key repeated."""
    return (key * (size // len(key) + 1))[:size]


def start_redis(ns: Netns) -> str:
    """A redis-server in ``ns`` bound to its address; its URL once it answers."""
    # Protected mode would refuse every client off loopback: this lab's network is private.
    argv = ["redis-server", "--port", str(REDIS_PORT), "--bind", ns.ip, "--save", ""]
    argv += ["--appendonly", "no", "--protected-mode", "no"]
    ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((ns.ip, REDIS_PORT), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return f"redis://{ns.ip}:{REDIS_PORT}/0"
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"redis-server in {ns.name} did not answer within 10 s")


@dataclass
class Phase:
    requests: int = 0
    blocks: int = 0
    hit: int = 0
    failed_calls: int = 0
    wrong_bytes: int = 0

    def rate(self) -> float:
        return self.hit / self.blocks if self.blocks else 0.0


@dataclass
class Replay:
    phases: dict[str, Phase] = field(default_factory=dict)
    out_of_view_s: float | None = None
    back_in_use_s: float | None = None
    tier_errors: int = 0
    stats: dict[str, float] = field(default_factory=dict)


def replay(
    requests: list[list[bytes]],
    tier: ServerTier,
    size: int,
    salt: bytes,
    kill_at: int | None = None,
    restart_at: int | None = None,
    victim: StoreServerProcess | None = None,
) -> Replay:
    """Replay ``requests`` (keys salted with ``salt``) through a TieredStore over ``tier``."""
    cfg = KvferryConfig(store=StoreConfig(slot_size=size, tiers=["server"]))
    out = Replay(phases={p: Phase() for p in ("before", "during", "after")})
    t_kill = t_up = None
    with TieredStore(cfg, tiers=[tier]) as store:
        for i, raw in enumerate(requests):
            if victim is not None and i == kill_at:
                victim.kill()
                t_kill = time.monotonic()
            if victim is not None and i == restart_at:
                victim.start()
                t_up = time.monotonic()
            phase = out.phases[
                "before"
                if kill_at is None or i < kill_at
                else "during"
                if restart_at is None or i < restart_at
                else "after"
            ]
            keys = [k[: -len(salt)] + salt for k in raw]  # ids are little-endian: top byte free
            phase.requests += 1
            phase.blocks += len(keys)
            try:
                n = store.lookup(keys)
                phase.hit += n
                outs = [memoryview(bytearray(size)) for _ in range(n)]
                got = store.get(keys[:n], outs, depth=0) if n else []
                for k, o, g in zip(keys, outs, got):
                    if g is not None and bytes(o[:g]) != value(k, size):
                        phase.wrong_bytes += 1
                store.put(keys[n:], [value(k, size) for k in keys[n:]], depth=n)
            except Exception as e:  # a failed client call is what this counts
                phase.failed_calls += 1
                print(f"request {i}: {type(e).__name__}: {e}", file=sys.stderr)
            now = time.monotonic()
            if victim is None:
                continue
            gone = victim.address in tier.down_members() or (
                victim.address not in tier._ring.members
            )
            if t_kill is not None and out.out_of_view_s is None and gone:
                out.out_of_view_s = now - t_kill
            if t_up is not None and out.back_in_use_s is None and not gone:
                out.back_in_use_s = now - t_up
        if victim is not None and t_up is not None and out.back_in_use_s is None:
            # The replay ended first: wait (10 s at most) for the client to use it again.
            deadline = time.monotonic() + 10
            while out.back_in_use_s is None and time.monotonic() < deadline:
                if victim.address in tier._ring.members and not tier.down_members():
                    out.back_in_use_s = time.monotonic() - t_up
                time.sleep(0.01)
        out.tier_errors = store.stats().tiers["server"].errors
        out.stats = tier.stats().extra  # before the store closes its tier
    return out


def throughput(
    tier: ServerTier, keys: list[bytes], size: int, threads: int, seconds: float, batch: int
) -> tuple[float, float]:
    """Blocks/s and GB/s of batch gets of ``batch`` of ``keys`` from ``threads`` threads."""
    done = [0] * threads
    stop = time.monotonic() + seconds

    def work(t: int) -> None:
        outs = [memoryview(bytearray(size)) for _ in range(batch)]
        j = t * batch
        while time.monotonic() < stop:
            ks = [keys[(j + b) % len(keys)] for b in range(batch)]
            got = tier.get(ks, outs)
            done[t] += sum(g is not None for g in got)
            j += batch * threads

    t0 = time.monotonic()
    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    elapsed = time.monotonic() - t0
    blocks = sum(done)
    return blocks / elapsed, blocks * size / elapsed / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default="mooncake-synthetic")
    ap.add_argument("--requests", type=int, default=0, help="first N requests (0: all)")
    ap.add_argument("--servers", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=65536, help="bytes per block")
    ap.add_argument("--capacity", default="1GiB", help="cpu tier of each server")
    ap.add_argument("--chunk-blocks", type=int, default=64, help="server.chunk_blocks")
    ap.add_argument("--replicas", type=int, default=1, help="server.replicas")
    ap.add_argument("--kill-at", type=float, default=0.4, help="fraction of the requests")
    ap.add_argument("--restart-at", type=float, default=0.7, help="fraction of the requests")
    ap.add_argument("--ttl", type=float, default=3.0, help="server.membership_ttl")
    ap.add_argument("--poll", type=float, default=1.0, help="server.membership_poll")
    ap.add_argument("--timeout", type=float, default=2.0, help="server.timeout")
    ap.add_argument("--threads", type=int, default=4, help="throughput: client threads")
    ap.add_argument("--batch", type=int, default=32, help="throughput: blocks per get")
    ap.add_argument("--seconds", type=float, default=5.0, help="throughput: per case")
    ap.add_argument("--fanout", type=int, default=8, help="server.fanout")
    ap.add_argument(
        "--link-rate",
        default="",
        help="each server's link rate both ways, e.g. 1gbit or 500mbit (default: none)",
    )
    ap.add_argument(
        "--skip-failover", action="store_true", help="throughput only (no replay, no kill)"
    )
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    why = netns_unavailable()
    if why is not None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    trace = read_trace(resolve_trace(args.trace), block_tokens=512)
    reqs = trace.requests[: args.requests or None]
    requests = [[int(h).to_bytes(16, "little") for h in r.hash_ids] for r in reqs]
    size = args.block_size
    kill_at = int(len(requests) * args.kill_at)
    restart_at = int(len(requests) * args.restart_at)
    rate = parse_rate(args.link_rate) if args.link_rate else 0
    doc: dict[str, Any] = {"argv": sys.argv[1:], "load_average": os.getloadavg()[0]}
    with NetLab() as lab:
        url = start_redis(lab.add("coord"))
        reg = ["--register", url, "--set", f"server.membership_ttl={args.ttl}"]
        servers = [
            StoreServerProcess(
                *reg, netns=lab.add(f"s{i}", rate_bps=rate), slot_size=size, capacity=args.capacity
            ).start()
            for i in range(args.servers)
        ]
        addrs = [s.address for s in servers]

        def tier(addresses: list[str] | None = None) -> ServerTier:
            cfg = ServerTierConfig(
                addresses=addresses or [],
                membership_url="" if addresses else url,
                membership_poll=args.poll,
                chunk_blocks=args.chunk_blocks,
                replicas=min(args.replicas, len(addresses)) if addresses else args.replicas,
                transport="tcp",
                timeout=args.timeout,
                fanout=args.fanout,
            )
            return ServerTier(cfg, TierContext(slot_size=size))

        print(
            f"{len(requests)} requests of {args.trace}, {size} B blocks, {args.servers} servers "
            f"in namespaces ({', '.join(addrs)}), chunk_blocks {args.chunk_blocks}, replicas "
            f"{args.replicas}; kill -9 {addrs[0]} at request {kill_at}, restart at {restart_at}"
        )
        if not args.skip_failover:
            control_tier = tier()
            control = replay(requests, control_tier, size, b"C", kill_at, restart_at)
            control_tier.close()
            fail_tier = tier()
            failover = replay(requests, fail_tier, size, b"F", kill_at, restart_at, servers[0])
            fail_tier.close()
            rows = []
            for name in ("before", "during", "after"):
                c, f = control.phases[name], failover.phases[name]
                ratio = f.rate() / c.rate() if c.rate() else None
                rows.append(
                    {
                        "phase": name,
                        "requests": f.requests,
                        "hit_control": round(c.rate(), 4),
                        "hit_failover": round(f.rate(), 4),
                        "ratio": None if ratio is None else round(ratio, 3),
                        "failed_calls": f.failed_calls + c.failed_calls,
                        "wrong_bytes": f.wrong_bytes + c.wrong_bytes,
                    }
                )
                print(
                    f"{name:>7}: {f.requests} requests, hit {f.rate():.4f} (control "
                    f"{c.rate():.4f}, ratio {'-' if ratio is None else f'{ratio:.3f}'}), failed "
                    f"calls {f.failed_calls + c.failed_calls}, wrong bytes "
                    f"{f.wrong_bytes + c.wrong_bytes}"
                )
            print(
                f"dead server out of view {failover.out_of_view_s} s after the kill; back in use "
                f"{failover.back_in_use_s} s after its ready line; tier calls failed as a whole: "
                f"{failover.tier_errors}; client counters {failover.stats}"
            )
            doc.update(
                phases=rows,
                out_of_view_s=failover.out_of_view_s,
                back_in_use_s=failover.back_in_use_s,
                tier_errors=failover.tier_errors,
                counters=failover.stats,
            )
        # Throughput: the same blocks, one server vs all of them.
        # "prefix": each batch is the prefix of one request (a chain from depth 0), so it is
        # placed as the replay's are, on one server per batch; "spread": blocks placed by their
        # own keys, so every batch asks every server (in parallel, server.fanout).
        n_keys = args.batch * max(args.threads * 4, -(-256 // args.batch))
        keys = [b"T" + i.to_bytes(15, "little") for i in range(n_keys)]
        vals = [value(k, size) for k in keys]
        through: dict[str, Any] = {}
        cases = [
            ("1 server", addrs[:1], True),
            (f"{len(addrs)} servers, a batch per server", addrs, True),
            (f"{len(addrs)} servers, batches spread", addrs, False),
        ]
        for label, addresses, chained in cases:
            t = tier(addresses)
            if chained:
                for g in range(0, n_keys, args.batch):
                    t.note_chain(keys[g : g + args.batch], 0)
            for g in range(0, n_keys, args.batch):
                t.put(keys[g : g + args.batch], vals[g : g + args.batch])
            bps, gbs = throughput(t, keys, size, args.threads, args.seconds, args.batch)
            t.close()
            through[label] = {"blocks_per_s": round(bps, 1), "gb_per_s": round(gbs, 4)}
            print(f"throughput, {label}: {bps:,.0f} blocks/s, {gbs:.3f} GB/s")
        one = through["1 server"]["blocks_per_s"]
        for row in through.values():
            row["vs_one"] = round(row["blocks_per_s"] / one, 3) if one else None
        doc["throughput"] = through
        for s in servers:
            s.kill()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
