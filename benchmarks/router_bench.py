"""KV-aware routing vs round-robin (Dynamo's router benchmark): a thin wrapper over
``kvferry bench router`` (:mod:`kvferry.bench.router.harness`) that adds the vLLM fleet.

``--engine mock`` (default) is exactly ``kvferry bench router`` with the same flags (a fresh
fleet of ``--workers`` ``kvferry serve mock`` engines per run), but comparing ``kv`` and
``round-robin`` only unless ``--policies`` says otherwise. ``--engine vllm`` first starts
``--workers`` vLLM servers (the CPU build, the tiny random model of ``kvferry model tiny``,
float32) publishing their KV events over ZeroMQ, once for every run, and hands them to
``kvferry bench router`` as ``--worker`` URLs with the model's tokenizer, their block size and
their ``--vllm-events``; each run then sends other prompt texts (seed + run number), so no run
finds another's prefixes cached, and the hit rate is vLLM's own prefix-cache counters (tokens).
Every other flag is ``kvferry bench router``'s (``--ratios``, ``--groups``, ``--isl``,
``--osl``, ``--requests``, ``--rate``, ``--seed``, ``--trace``, ``--trace-rows``,
``--trace-scale``, ``--speedup``, ``--num-blocks``, ``--speedup-ratio``, ``--json``,
``--plot`` ...).

    .venv/bin/python benchmarks/router_bench.py --json benchmarks/results/router_mock.json
    .venv/bin/python benchmarks/router_bench.py --engine vllm --workers 2 --isl 1024 --osl 16 \\
        --groups 8 --requests 120 --rate 4 --json benchmarks/results/router_vllm.json
    .venv/bin/python benchmarks/router_bench.py --trace mooncake-synthetic --trace-rows 1000 \\
        --speedup 4 --json benchmarks/results/router_trace.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from kvferry.cli.main import main as kvferry

POLICIES = "kv,round-robin"


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


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], add_help=False)
    ap.add_argument("--engine", choices=["mock", "vllm"], default="mock")
    ap.add_argument("--workers", type=int, default=4, help="engines behind the router")
    args, rest = ap.parse_known_args()
    if not any(a.startswith("--policies") for a in rest):
        rest += ["--policies", POLICIES]
    with ExitStack() as stack:
        fleet: list[str] = ["--workers", str(args.workers)]
        if args.engine == "vllm":
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvferry-router-")))
            vllm = VllmFleet(args.workers, work, stack)
            fleet = [f for s in vllm.servers for f in ("--worker", s.url)] + vllm.router_flags()
        return kvferry(["bench", "router", *fleet, *rest])


if __name__ == "__main__":
    sys.exit(main())
