"""KV-aware routing vs round-robin on a fleet of simulated engines (Dynamo's router benchmark).

For each prefix ratio and router mode, a fresh fleet of ``--workers`` ``kvferry serve mock``
engines (each with ``--num-blocks`` KV blocks of 16 tokens, timing model sped up by
``--speedup-ratio``) runs behind a fresh ``kvferry serve router``, and ``kvferry bench serve``
replays the same ``prefix-ratio`` workload (``--groups`` prefix groups, ``--isl`` tokens of
which ``ratio`` are the group's prefix, Poisson arrivals at ``--rate``) through the router.
Reported per run: TTFT p50/p99, request throughput, the block-weighted hit rate the workers
really had (their ``/kv/stats``, summed) and the one the router predicted.

    .venv/bin/python benchmarks/router_bench.py --json benchmarks/results/router_mock.json
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvferry.bench.endpoint import ServeBenchOptions, run_serve_bench
from kvferry.testing.mock_engine import MockServerProcess
from kvferry.testing.router_process import RouterProcess

MODES = ("kv", "round-robin")


def _run(ratio: float, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    mock_flags = ["--num-blocks", str(args.num_blocks), "--speedup-ratio", str(args.speedup_ratio)]
    with ExitStack() as stack:
        workers = [
            stack.enter_context(MockServerProcess.start(*mock_flags)) for _ in range(args.workers)
        ]
        router = stack.enter_context(RouterProcess.over(workers, "--router-mode", mode))
        spec = (
            f"prefix-ratio:requests={args.requests},isl={args.isl},osl={args.osl},"
            f"num_groups={args.groups},prefix_ratio={ratio},request_rate={args.rate},"
            f"seed={args.seed}"
        )
        report = run_serve_bench(
            ServeBenchOptions(url=router.url, workload=spec, trace_block_size=16, workers=1)
        )
        m = report.levels[0].metrics
        hit = sum(w.kv_stats()["hit_blocks"] for w in workers)
        looked = sum(w.kv_stats()["lookup_blocks"] for w in workers)
        predicted = router.stats()
        per_worker = [int(w["requests"]) for w in predicted["workers"]]
    return {
        "ratio": ratio,
        "mode": mode,
        "requests": int(m.value("request_count", "avg") or 0),
        "errors": m.error_count,
        "ttft_p50_ms": m.value("time_to_first_token", "p50"),
        "ttft_p99_ms": m.value("time_to_first_token", "p99"),
        "itl_p50_ms": m.value("inter_token_latency", "p50"),
        "request_throughput": m.value("request_throughput"),
        "hit_rate": hit / looked if looked else 0.0,
        "predicted_hit_rate": predicted["hit_rate"],
        "requests_per_worker": per_worker,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", default="0.1,0.3,0.5,0.7,0.9", help="prefix ratios to sweep")
    ap.add_argument("--workers", type=int, default=4, help="mock engines behind the router")
    ap.add_argument("--num-blocks", type=int, default=1024, help="KV blocks per engine")
    ap.add_argument("--speedup-ratio", type=float, default=10.0, help="mock speed-up")
    ap.add_argument("--groups", type=int, default=16, help="prefix groups")
    ap.add_argument("--isl", type=int, default=2048)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rate", type=float, default=40.0, help="requests/s (Poisson)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = []
    with Progress() as progress:
        task = progress.add_task("router bench", total=len(ratios) * len(MODES))
        for ratio in ratios:
            for mode in MODES:
                progress.update(task, description=f"prefix ratio {ratio}, {mode}")
                rows.append(_run(ratio, mode, args))
                progress.advance(task)
    table = Table(title="KV-aware router vs round-robin (mock fleet)")
    for col in ("ratio", "mode", "TTFT p50 ms", "TTFT p99 ms", "req/s", "hit rate", "predicted"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['ratio']:.1f}", r["mode"], f"{r['ttft_p50_ms']:.2f}", f"{r['ttft_p99_ms']:.2f}",
            f"{r['request_throughput']:.2f}", f"{r['hit_rate']:.3f}",
            f"{r['predicted_hit_rate']:.3f}",
        )  # fmt: skip
    Console().print(table)
    for ratio in ratios:
        kv, rr = (next(r for r in rows if r["ratio"] == ratio and r["mode"] == m) for m in MODES)
        speedup = rr["ttft_p50_ms"] / kv["ttft_p50_ms"]
        print(
            f"ratio {ratio}: TTFT p50 round-robin / kv = {speedup:.2f}x,"
            f" hit rate kv {kv['hit_rate']:.3f} vs round-robin {rr['hit_rate']:.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
