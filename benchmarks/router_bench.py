"""KV-aware routing vs round-robin (Dynamo's router benchmark), on simulated engines or on real
vLLM servers, with a prefix-ratio sweep or the bundled Mooncake trace.

Workers (``--engine``):

- ``mock``: for each run a fresh fleet of ``--workers`` ``kvferry serve mock`` engines (each
  with ``--num-blocks`` KV blocks of 16 tokens, timing model sped up by ``--speedup-ratio``);
  the router reads their ``/kv/events``. Hit rate: the workers' own ``/kv/stats`` (block-
  weighted).
- ``vllm``: ``--workers`` vLLM servers (the CPU build, the tiny random model of
  ``kvferry model tiny``, float32) started once, publishing their KV events over ZeroMQ; the
  router reads them (``--vllm-events``) and tokenizes with the model's tokenizer. Runs use
  different seeds, so no run finds another's prefixes cached. Hit rate: vLLM's own prefix-cache
  counters (``vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total``, tokens).

Load (``kvferry bench serve`` through a fresh ``kvferry serve router`` per run):

- default: the ``prefix-ratio`` workload (``--groups`` prefix groups, ``--isl`` tokens of which
  ``ratio`` are the group's prefix, Poisson arrivals at ``--rate``) for each of ``--ratios``;
- ``--trace NAME|FILE``: the first ``--trace-rows`` requests of a Mooncake-format trace (the
  bundled ``mooncake-synthetic`` by default name) at its timestamps / ``--speedup``, scaled
  down ``--trace-scale`` times (each 512-token hash block becomes 512/scale tokens, so a 15k-token
  request becomes ~480) to fit this machine; the prefix sharing is the trace's.

Reported per run: TTFT p50/p99, ITL p50, request throughput, the hit rate the workers really
had and the one the router predicted (block-weighted), requests per worker.

    .venv/bin/python benchmarks/router_bench.py --json benchmarks/results/router_mock.json
    .venv/bin/python benchmarks/router_bench.py --engine vllm --workers 2 --isl 1024 --osl 16 \\
        --groups 8 --requests 120 --rate 4 --json benchmarks/results/router_vllm.json
    .venv/bin/python benchmarks/router_bench.py --trace mooncake-synthetic --trace-rows 1000 \\
        --speedup 4 --json benchmarks/results/router_trace.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvferry.bench.endpoint.harness import ServeBenchOptions, run_serve_bench
from kvferry.bench.traces import read_trace
from kvferry.testing.mock_engine import MockServerProcess
from kvferry.testing.router_process import RouterProcess

MODES = ("kv", "round-robin")


class VllmFleet:
    """``n`` vLLM servers publishing KV events, started once for every run."""

    def __init__(self, n: int, work: Path, stack: ExitStack) -> None:
        from kvferry.serving.tiny_model import build_tiny_model
        from kvferry.testing.engines import VllmServer

        self.model = build_tiny_model(work / "tiny")
        self.servers = []
        self.sources = []
        for i in range(n):
            pub, replay = f"ipc://{work}/w{i}-events", f"ipc://{work}/w{i}-replay"
            config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": pub,
                      "replay_endpoint": replay}  # fmt: skip
            server = VllmServer(
                str(self.model),
                work / f"w{i}",
                extra_args=["--kv-events-config", json.dumps(config)],
            ).start()
            stack.callback(server.stop)
            self.servers.append(server)
            self.sources.append(f"{server.url}={pub},{replay}")
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda s: s.wait_ready(), self.servers))
        self.block_size = self.servers[0].cache_block_size()

    def router_flags(self) -> list[str]:
        flags = ["--block-size", str(self.block_size), "--tokenizer", str(self.model)]
        for source in self.sources:
            flags += ["--vllm-events", source]
        return flags

    def preemptions(self) -> float:
        return sum(s.metrics().get("vllm:num_preemptions_total", 0.0) for s in self.servers)

    def counters(self) -> tuple[float, float]:
        """(prefix-cache hit tokens, queried tokens), summed over the servers."""
        hits = queries = 0.0
        for s in self.servers:
            m = s.metrics()
            hits += m.get("vllm:prefix_cache_hits_total", 0.0)
            queries += m.get("vllm:prefix_cache_queries_total", 0.0)
        return hits, queries


def _scaled_trace(args: argparse.Namespace, work: Path) -> Path:
    """The first ``--trace-rows`` rows of the trace with each 512-token block cut to
    512 / ``--trace-scale`` tokens (hash_ids unchanged, so the prefix sharing is the same)."""
    trace = read_trace(args.trace, block_tokens=512)
    out = work / "scaled_trace.jsonl"
    with out.open("w") as f:
        for r in trace.requests[: args.trace_rows]:
            row = {"timestamp": r.timestamp_ms,
                   "input_length": max(1, math.ceil(r.input_length / args.trace_scale)),
                   "output_length": r.output_length, "hash_ids": list(r.hash_ids)}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return out


def _run(
    label: float | str,
    mode: str,
    options: ServeBenchOptions,
    args: argparse.Namespace,
    vllm: VllmFleet | None,
) -> dict[str, Any]:
    with ExitStack() as stack:
        if vllm is None:
            blocks = str(args.num_blocks)
            flags = ["--num-blocks", blocks, "--max-model-len", str(args.num_blocks * 16),
                     "--speedup-ratio", str(args.speedup_ratio)]  # fmt: skip
            workers: list[Any] = [
                stack.enter_context(MockServerProcess.start(*flags)) for _ in range(args.workers)
            ]
            extra: list[str] = []
        else:
            workers = [s.url for s in vllm.servers]
            extra = vllm.router_flags()
            before = vllm.counters()
            preempted_before = vllm.preemptions()
        router = stack.enter_context(RouterProcess.over(workers, "--router-mode", mode, *extra))
        report = run_serve_bench(replace(options, url=router.url))
        m = report.levels[0].metrics
        if vllm is None:
            hit = sum(w.kv_stats()["hit_blocks"] for w in workers)
            looked = sum(w.kv_stats()["lookup_blocks"] for w in workers)
            # A preempted request is looked up again when it resumes, and hits its own blocks:
            # hits the router never predicts (it routed the request once).
            preempted = sum(w.metrics().get("kvferry_mock_preemptions_total", 0) for w in workers)
        else:
            after = vllm.counters()
            hit, looked = after[0] - before[0], after[1] - before[1]
            preempted = vllm.preemptions() - preempted_before
        predicted = router.stats()
        per_worker = [int(w["requests"]) for w in predicted["workers"]]
    return {
        "ratio": label,
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
        "preemptions": preempted,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=["mock", "vllm"], default="mock")
    ap.add_argument("--ratios", default="0.1,0.3,0.5,0.7,0.9", help="prefix ratios to sweep")
    ap.add_argument("--workers", type=int, default=4, help="engines behind the router")
    ap.add_argument("--num-blocks", type=int, default=1024, help="mock: KV blocks per engine")
    ap.add_argument("--speedup-ratio", type=float, default=10.0, help="mock speed-up")
    ap.add_argument("--groups", type=int, default=16, help="prefix groups")
    ap.add_argument("--isl", type=int, default=2048)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rate", type=float, default=40.0, help="requests/s (Poisson)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trace", default="", help="a Mooncake-format trace instead of the sweep")
    ap.add_argument("--trace-rows", type=int, default=1000, help="its first rows replayed")
    ap.add_argument("--trace-scale", type=int, default=32, help="tokens per block divided by")
    ap.add_argument("--speedup", type=float, default=1.0, help="trace timestamps divided by")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    rows = []
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvferry-router-")))
        vllm = VllmFleet(args.workers, work, stack) if args.engine == "vllm" else None
        tokenizer = str(vllm.model) if vllm else ""
        block = vllm.block_size if vllm else 16
        runs: list[tuple[float | str, Callable[[str, int], ServeBenchOptions]]] = []
        if args.trace:
            scaled = _scaled_trace(args, work)

            def replay(url: str, seed: int) -> ServeBenchOptions:
                return ServeBenchOptions(
                    url=url, trace=str(scaled), trace_block_size=512 // args.trace_scale,
                    speedup=args.speedup, seed=seed, tokenizer=tokenizer,
                )  # fmt: skip

            runs.append((f"trace {args.trace_rows} rows", replay))
        else:
            for ratio in (float(r) for r in args.ratios.split(",")):

                def sweep(url: str, seed: int, ratio: float = ratio) -> ServeBenchOptions:
                    spec = (
                        f"prefix-ratio:requests={args.requests},isl={args.isl},osl={args.osl},"
                        f"num_groups={args.groups},prefix_ratio={ratio},request_rate={args.rate},"
                        f"seed={args.seed}"
                    )
                    return ServeBenchOptions(url=url, workload=spec, trace_block_size=block,
                                             seed=seed, tokenizer=tokenizer)  # fmt: skip

                runs.append((ratio, sweep))
        with Progress() as progress:
            task = progress.add_task("router bench", total=len(runs) * len(MODES))
            for n, (label, options) in enumerate(runs):
                for m, mode in enumerate(MODES):
                    progress.update(task, description=f"{label}, {mode}")
                    # vLLM servers live through every run: another seed (other prompt texts)
                    # per run, so no run finds another's prefixes cached. Mocks start fresh.
                    seed = args.seed + (1 + n * len(MODES) + m if vllm else 0)
                    rows.append(_run(label, mode, options("", seed), args, vllm))
                    progress.advance(task)
    table = Table(title=f"KV-aware router vs round-robin ({args.engine}, {args.workers} workers)")
    cols = ("ratio", "mode", "TTFT p50 ms", "TTFT p99 ms", "req/s", "hit rate", "predicted",
            "preempted")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        label = f"{r['ratio']:.1f}" if isinstance(r["ratio"], float) else r["ratio"]
        table.add_row(
            label, r["mode"], f"{r['ttft_p50_ms']:.2f}", f"{r['ttft_p99_ms']:.2f}",
            f"{r['request_throughput']:.2f}", f"{r['hit_rate']:.3f}",
            f"{r['predicted_hit_rate']:.3f}", f"{r['preemptions']:g}",
        )  # fmt: skip
    Console().print(table)
    for label in dict.fromkeys(r["ratio"] for r in rows):
        kv, rr = (next(r for r in rows if r["ratio"] == label and r["mode"] == m) for m in MODES)
        speedup = rr["ttft_p50_ms"] / kv["ttft_p50_ms"]
        print(
            f"{label}: TTFT p50 round-robin / kv = {speedup:.2f}x,"
            f" hit rate kv {kv['hit_rate']:.3f} vs round-robin {rr['hit_rate']:.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
