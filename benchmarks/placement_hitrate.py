"""Prefix hit rate after losing 1 of N store servers: per-block vs per-chunk placement vs replicas.

A pure computation over a trace (no servers, no timing): the server tier's real placement
(``kvferry.backends.server.placement.Placement`` on a ``HashRing`` of N addresses) places every
block of every request, as a client that noted each request's chain would (the store notes a
lookup's whole prompt before the put of its new blocks). Then, with an infinite cache:

- before: each request hits its leading blocks that an earlier request already stored (the
  trace's ideal block-weighted hit rate);
- after: the same, but a block counts only if one of its servers is not the dead one; averaged
  over which of the N servers dies and over ``--rings`` rings (address sets), since one ring's
  luck decides which prefixes a server holds.

Also per placement: how evenly the servers hold blocks (max/mean of blocks stored per server,
copies counted) and serve hits (max/mean of hit blocks read per server, the hot spot a big
chunk makes of a popular prefix). The trace's blocks are its hash ids (``--block-tokens``, 512
in the bundled Mooncake trace); a chunk of K blocks spans K x block_tokens tokens, so
``server.chunk_blocks`` = 64 at vLLM's 16 tokens per block spans 1024 tokens = 2 trace blocks.

    .venv/bin/python benchmarks/placement_hitrate.py --chunks 1,2,4,8,16,32,64,128 \
        --json benchmarks/results/placement_hitrate.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from kvferry.backends.server.placement import Placement
from kvferry.backends.server.ring import HashRing
from kvferry.bench.traces import read_trace, resolve_trace


def evaluate(
    requests: list[list[bytes]], servers: int, chunk: int, replicas: int, rings: int
) -> dict[str, float]:
    before_hits = total = 0
    after: list[float] = []
    store_balance: list[float] = []
    read_balance: list[float] = []
    for r in range(rings):
        members = [f"10.{r}.0.{i + 1}:15428" for i in range(servers)]
        ring = HashRing(members)
        place = Placement(chunk, replicas, memo_blocks=1 << 24)
        where: dict[bytes, list[str]] = {}
        held = dict.fromkeys(members, 0)
        read = dict.fromkeys(members, 0)
        hits_after = dict.fromkeys(members, 0)
        hits_before = 0
        blocks = 0
        for keys in requests:
            place.note_chain(keys, 0)
            writers = place.writers(ring, keys)
            blocks += len(keys)
            n = 0
            while n < len(keys) and keys[n] in where:
                n += 1
            hits_before += n
            for k in keys[:n]:
                read[where[k][0]] += 1
            for dead in members:  # leading blocks with a copy on a live server
                m = 0
                while m < n and where[keys[m]] != [dead]:
                    m += 1  # (a single copy on the dead one ends the prefix there)
                hits_after[dead] += m
            for k, w in zip(keys[n:], writers[n:]):
                if k not in where:
                    where[k] = w
                    for s in w:
                        held[s] += 1
        before_hits, total = hits_before, blocks
        after.append(statistics.fmean(hits_after.values()) / blocks)
        store_balance.append(max(held.values()) / statistics.fmean(held.values()))
        read_balance.append(max(read.values()) / statistics.fmean(read.values()))
    before = before_hits / total
    mean_after = statistics.fmean(after)
    return {
        "chunk_blocks": chunk,
        "replicas": replicas,
        "hit_before": round(before, 4),
        "hit_after": round(mean_after, 4),
        "after_over_before": round(mean_after / before, 3),
        "after_over_before_worst_ring": round(min(after) / before, 3),
        "stored_max_over_mean": round(statistics.fmean(store_balance), 3),
        "read_max_over_mean": round(statistics.fmean(read_balance), 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default="mooncake-synthetic", help="trace file or bundled name")
    ap.add_argument("--block-tokens", type=int, default=512, help="tokens per hash id")
    ap.add_argument("--servers", type=int, default=3)
    ap.add_argument("--chunks", default="1,2,4,8,16,32,64", help="chunk sizes in trace blocks")
    ap.add_argument("--rings", type=int, default=5, help="address sets to average over")
    ap.add_argument("--requests", type=int, default=0, help="first N requests only (0: all)")
    ap.add_argument("--json", help="write the rows here as JSON")
    args = ap.parse_args()
    trace = read_trace(resolve_trace(args.trace), block_tokens=args.block_tokens)
    reqs = trace.requests[: args.requests or None]
    requests = [[int(h).to_bytes(16, "little") for h in r.hash_ids] for r in reqs]
    rows = [evaluate(requests, args.servers, int(c), 1, args.rings) for c in args.chunks.split(",")]
    for c in (1, int(args.chunks.split(",")[-1])):
        rows.append(evaluate(requests, args.servers, c, 2, args.rings))
    head = (
        f"{'chunk (blocks)':>14} {'tokens':>7} {'replicas':>8} {'hit before':>10} "
        f"{'hit after':>9} {'after/before':>12} {'worst ring':>10} {'stored max/mean':>15} "
        f"{'reads max/mean':>14}"
    )
    print(f"{args.trace}: {len(requests)} requests; 1 of {args.servers} servers lost")
    print(head)
    for row in rows:
        print(
            f"{row['chunk_blocks']:>14} {row['chunk_blocks'] * args.block_tokens:>7} "
            f"{row['replicas']:>8} {row['hit_before']:>10.4f} {row['hit_after']:>9.4f} "
            f"{row['after_over_before']:>12.3f} {row['after_over_before_worst_ring']:>10.3f} "
            f"{row['stored_max_over_mean']:>15.3f} {row['read_max_over_mean']:>14.3f}"
        )
    if args.json:
        doc = {
            "script": "benchmarks/placement_hitrate.py",
            "argv": sys.argv[1:],
            "trace": args.trace,
            "block_tokens": args.block_tokens,
            "servers": args.servers,
            "rings": args.rings,
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
