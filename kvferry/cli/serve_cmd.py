"""``kvferry serve store``, ``kvferry serve mock`` and ``kvferry serve router``: run a server in
the foreground until SIGINT/SIGTERM.

Each prints one ready line on stdout once it accepts connections (``kvferry-store-ready
HOST:PORT``, ``kvferry-mock-ready HOST:PORT``, ``kvferry-router-ready HOST:PORT``), so scripts
and tests can start it on port 0 and read the address; anything else goes to stderr.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import TYPE_CHECKING

from kvferry.cli.common import Stopped, add_config_options, load_from_args
from kvferry.config.units import format_size, format_size_approx

if TYPE_CHECKING:
    from kvferry.store.server import StoreServer

READY = "kvferry-store-ready"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser("serve", help="run a kvferry server")
    kinds = serve.add_subparsers(dest="serve_kind", required=True, metavar="KIND")
    store = kinds.add_parser(
        "store",
        help="a store server: a cpu tier (+ a disk tier if asked) served over the transfer "
        "engine's protocol",
        description="Serve a TieredStore (store.tiers: cpu, or cpu,disk) on "
        "listen.bind_address:listen.port. Prints 'kvferry-store-ready HOST:PORT' once it accepts "
        "connections, then one line on stderr: each tier's size and where the disk tier is.",
    )
    add_config_options(store)
    store.add_argument("--port", type=int, help="listen.port (0 picks a free port)")
    store.add_argument("--bind", help="listen.bind_address (default 127.0.0.1)")
    store.add_argument(
        "--advertise",
        metavar="HOST",
        help="listen.advertise_address: the host clients dial, as registered with --register "
        "(default: the bind address; the hostname when bound to 0.0.0.0)",
    )
    store.add_argument("--capacity", help="cpu.capacity, e.g. 4GiB")
    store.add_argument("--slot-size", help="store.slot_size: bytes of the largest block")
    store.add_argument("--tiers", help="store.tiers: cpu (default) or cpu,disk")
    store.add_argument(
        "--disk-path",
        help="disk.path (default: ~/.cache/kvferry/disk/store-PORT; on port 0, files of this "
        "process, freed when it exits)",
    )
    store.add_argument("--disk-capacity", help="disk.capacity, e.g. 4GiB (preallocated)")
    store.add_argument(
        "--wipe-disk",
        action="store_true",
        help="empty a disk directory that holds slot files of another layout (slot size, "
        "capacity) instead of refusing it (disk.wipe_other_layout); its blocks are lost",
    )
    store.add_argument(
        "--register",
        metavar="REDIS_URL",
        help="server.membership_url: keep a lease there (server.membership_ttl) that clients "
        "with the same URL find this server by",
    )
    store.add_argument("--metrics-port", type=int, help="store.metrics_port (Prometheus)")
    store.add_argument(
        "--force-capacity",
        action="store_true",
        help="allocate the cpu pool above cpu.max_memory_fraction of the available memory, and "
        "the disk tier above its filesystem's free space (cpu/disk.force_capacity)",
    )
    store.add_argument("--quiet", action="store_true", help="print only the ready line")
    store.set_defaults(func=run_store)

    mock = kinds.add_parser(
        "mock",
        help="a simulated OpenAI-compatible LLM engine (KV blocks, batching, timing; no model)",
        description="Serve a simulated vLLM-like engine on mock.bind_address:mock.port: "
        "/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /kv/stats, "
        "/kv/events. Continuous batching over a paged KV cache with prefix caching; step "
        "times from a timing model (mock.* keys, or fitted to --profile). Prints "
        "'kvferry-mock-ready HOST:PORT' once it accepts connections.",
    )
    add_config_options(mock)
    for option, key, text in _MOCK_FLAGS:
        # Values stay text: the config models validate them and name the flag on error.
        mock.add_argument(option, dest=key.replace(".", "_"), metavar="VALUE", help=text)
    mock.add_argument("--quiet", action="store_true", help="print only the ready line")
    mock.set_defaults(func=run_mock)

    router = kinds.add_parser(
        "router",
        help="a KV-aware router: an OpenAI-compatible front over vLLM or mock workers",
        description="Route /v1/completions and /v1/chat/completions to the worker that already "
        "holds most of the prompt's KV blocks, weighed against its load (router.mode kv), or "
        "round-robin / random. Cached blocks come from each worker's /kv/events, or from the "
        "router's own decisions (--no-kv-events, or workers without events). Also serves "
        "/v1/models, /health, /metrics and /router/stats. Prints 'kvferry-router-ready "
        "HOST:PORT' once it accepts connections.",
    )
    add_config_options(router)
    router.add_argument(
        "--worker",
        dest="router_workers",
        metavar="URL",
        action="append",
        default=None,
        help="a worker's base URL, e.g. http://127.0.0.1:8000 (repeatable; router.workers)",
    )
    router.add_argument(
        "--vllm-events",
        dest="router_vllm_events",
        metavar="URL=ENDPOINT[,REPLAY]",
        action="append",
        default=None,
        help="a vLLM worker's ZeroMQ KV event publisher, e.g. "
        "http://127.0.0.1:8000=tcp://127.0.0.1:5557,tcp://127.0.0.1:5558 (its --kv-events-config "
        "endpoint and replay_endpoint; repeatable; router.vllm_events). Without it the router "
        "finds each vLLM worker's publisher through its /kv_event_sources",
    )
    router.add_argument(
        "--pd",
        dest="router_pd",
        action="store_const",
        const=True,
        default=None,
        help="disaggregated prefill/decode: prefill each request on a --prefill instance, "
        "decode it on a --decode instance with the KV hand-off (router.pd)",
    )
    router.add_argument(
        "--prefill",
        dest="router_prefill_workers",
        metavar="URL",
        action="append",
        default=None,
        help="with --pd: a prefill instance's base URL (repeatable; router.prefill_workers)",
    )
    router.add_argument(
        "--decode",
        dest="router_decode_workers",
        metavar="URL",
        action="append",
        default=None,
        help="with --pd: a decode instance's base URL (repeatable; router.decode_workers)",
    )
    for option, key, text in _ROUTER_FLAGS:
        router.add_argument(option, dest=key.replace(".", "_"), metavar="VALUE", help=text)
    router.add_argument(
        "--no-kv-events",
        dest="router_kv_events",
        action="store_const",
        const=False,
        default=None,
        help="approximate mode: remember routing decisions for --approx-ttl instead of "
        "reading the workers' /kv/events (router.kv_events false)",
    )
    router.add_argument("--quiet", action="store_true", help="print only the ready line")
    router.set_defaults(func=run_router)


# (option, config key, help) of `serve mock`; each sets one mock.* key.
_MOCK_FLAGS: list[tuple[str, str, str]] = [
    ("--port", "mock.port", "HTTP port (default 8000; 0 picks a free port)"),
    ("--bind", "mock.bind_address", "address to bind (default 127.0.0.1)"),
    ("--model", "mock.model", "served model name, also the block hash salt"),
    ("--block-size", "mock.block_size", "tokens per KV block (default 16)"),
    ("--num-blocks", "mock.num_blocks", "KV blocks in the simulated cache"),
    ("--max-num-seqs", "mock.max_num_seqs", "requests running at once"),
    ("--max-num-batched-tokens", "mock.max_num_batched_tokens", "tokens per step"),
    ("--max-model-len", "mock.max_model_len", "most tokens of prompt + output (0: KV capacity)"),
    ("--speedup-ratio", "mock.speedup_ratio", "divide every modelled time by this"),
    (
        "--profile",
        "mock.profile",
        "calibrate from a kvferry profile --out DIR (its TTFT and ITL; its KV capacity and max "
        "context unless --num-blocks / --max-model-len say otherwise), or a JSON file of step "
        "samples",
    ),
    ("--tokenizer", "mock.tokenizer", "local HF tokenizer.json or its directory"),
    (
        "--auth-token",
        "mock.auth_token",
        "Bearer token required on all but /health (KVFERRY_MOCK_AUTH_TOKEN keeps it out of ps)",
    ),
]


# (option, config key, help) of `serve router`; each sets one router.* key.
_ROUTER_FLAGS: list[tuple[str, str, str]] = [
    ("--port", "router.port", "HTTP port (default 8080; 0 picks a free port)"),
    ("--bind", "router.bind_address", "address to bind (default 127.0.0.1)"),
    ("--router-mode", "router.mode", "kv (default), round-robin or random"),
    (
        "--router-temperature",
        "router.temperature",
        "kv mode: 0 = lowest cost; > 0 = softmax draw over -cost/T",
    ),
    (
        "--prefill-weight",
        "router.prefill_weight",
        "kv mode: weight of uncached prompt blocks against decode blocks (default 1)",
    ),
    ("--block-size", "router.block_size", "tokens per KV block; must equal the workers'"),
    ("--model", "router.model", "model name salting block hashes (default: the workers')"),
    ("--tokenizer", "router.tokenizer", "local HF tokenizer.json, as the mock workers'"),
    ("--approx-ttl", "router.approx_ttl", "seconds a routed prompt counts as cached, no events"),
    (
        "--auth-token",
        "router.auth_token",
        "Bearer token required on all but /health (KVFERRY_ROUTER_AUTH_TOKEN keeps it out of ps)",
    ),
    (
        "--worker-auth-token",
        "router.worker_auth_token",
        "Bearer token sent to the workers (KVFERRY_ROUTER_WORKER_AUTH_TOKEN)",
    ),
]


def run_store(args: argparse.Namespace) -> int:
    from kvferry.store.server import StoreServer
    from kvferry.telemetry.prometheus import export_store

    flags = {
        "listen.port": args.port,
        "listen.bind_address": args.bind,
        "listen.advertise_address": args.advertise,
        "cpu.capacity": args.capacity,
        "store.slot_size": args.slot_size,
        "store.tiers": args.tiers,
        "disk.path": args.disk_path,
        "disk.capacity": args.disk_capacity,
        "disk.wipe_other_layout": True if args.wipe_disk else None,
        "server.membership_url": args.register,
        "store.metrics_port": args.metrics_port,
        "cpu.force_capacity": True if args.force_capacity else None,
        "disk.force_capacity": True if args.force_capacity else None,
    }
    names = {
        "listen.port": "--port",
        "listen.bind_address": "--bind",
        "listen.advertise_address": "--advertise",
        "cpu.capacity": "--capacity",
        "store.slot_size": "--slot-size",
        "store.tiers": "--tiers",
        "disk.path": "--disk-path",
        "disk.capacity": "--disk-capacity",
        "disk.wipe_other_layout": "--wipe-disk",
        "server.membership_url": "--register",
        "store.metrics_port": "--metrics-port",
        "cpu.force_capacity": "--force-capacity",
        "disk.force_capacity": "--force-capacity",
    }
    loaded = load_from_args(args, flags, flag_names=names)
    signals = _StopSignals()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signals)
    server = StoreServer(loaded.config)
    try:
        export_store(server.store, transfer=server.engine.metrics)  # store.metrics_port
        host, port = server.start()
        signals.serving = True
        print(f"{READY} {host}:{port}", flush=True)
        if not args.quiet:
            # One unwrapped line: a log line, often read by scripts, not a terminal view.
            print(f"store server on {host}:{port}: {describe_store(server)}", file=sys.stderr)
        signals.stop.wait()
    finally:
        server.close()
    return 0


def describe_store(server: StoreServer) -> str:
    """What a store server holds, for its start-up line: each tier's size, and where the disk
    tier's files are (or that there is none), with the flags that change them."""
    from kvferry.backends.base import SlotTier
    from kvferry.backends.disk import DiskTier

    parts = []
    for tier in server.store.tiers:
        if isinstance(tier, DiskTier):
            size = format_size_approx(tier.num_slots * tier.slot_bytes)
            parts.append(f"disk {size} in {tier.where()} (--disk-path, --disk-capacity)")
        elif isinstance(tier, SlotTier) and tier.capacity_blocks is not None:
            slot = server.store.slot_size
            size = format_size_approx(tier.capacity_blocks * slot)
            parts.append(
                f"{tier.label} {size} ({tier.capacity_blocks} slots of {format_size(slot)})"
            )
        else:
            parts.append(tier.label)
    if not any(isinstance(t, DiskTier) for t in server.store.tiers):
        parts.append("no disk tier (--tiers cpu,disk adds one)")
    reg = server.registration
    if reg is not None:
        from kvferry.backends.redis import redact_url

        parts.append(
            f"registered as {reg.member} in {redact_url(reg.url)} under {reg.prefix} "
            f"(lease {reg.ttl:g}s, server.membership_ttl)"
        )
    return ", ".join(parts)


class _StopSignals:
    """The SIGINT/SIGTERM handler of ``serve store``. While the server starts (the cpu pool is
    being touched: seconds per GiB) a signal ends the start-up at once by raising
    :class:`Stopped`; once it serves, the first signal asks for a graceful stop (``stop``:
    blocks flushed to disk, ``store.shutdown_flush_seconds``) and a second one ends that too."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.serving = False

    def __call__(self, signum: int, frame: object) -> None:
        if not self.serving:
            raise Stopped(signum, "while the store server was starting; it served nothing")
        if self.stop.is_set():
            raise Stopped(signum, "during the graceful shutdown; it was cut short")
        self.stop.set()


def run_mock(args: argparse.Namespace) -> int:
    import asyncio

    from kvferry.serving.mock.calibrate import is_sla_profile, profile_limits, read_sla_profile
    from kvferry.serving.mock.server import READY, MockServer, describe, serve

    flags = {key: getattr(args, key.replace(".", "_")) for _, key, _ in _MOCK_FLAGS}
    names = {key: option for option, key, _ in _MOCK_FLAGS}
    loaded = load_from_args(args, flags, flag_names=names)
    config = loaded.config.mock
    if config.profile and is_sla_profile(config.profile):
        # the profiled engine's limits, unless set (flag, env, file or preset)
        keep = {
            k for k in ("num_blocks", "max_model_len") if loaded.sources[f"mock.{k}"] != "default"
        }
        config = profile_limits(config, read_sla_profile(config.profile), keep)

    def ready(server: MockServer, address: tuple[str, int]) -> None:
        host, port = address
        print(f"{READY} {host}:{port}", flush=True)
        if not args.quiet:
            # One unwrapped line: it is a log line, often read by scripts, not a terminal view.
            print(f"mock engine on http://{host}:{port}: {describe(server)}", file=sys.stderr)

    asyncio.run(serve(config, on_ready=ready))
    return 0


def run_router(args: argparse.Namespace) -> int:
    import asyncio

    from kvferry.serving.router.server import READY, RouterServer, describe, serve

    flags: dict[str, object] = {
        key: getattr(args, key.replace(".", "_")) for _, key, _ in _ROUTER_FLAGS
    }
    flags["router.workers"] = args.router_workers
    flags["router.kv_events"] = args.router_kv_events
    flags["router.vllm_events"] = args.router_vllm_events
    flags["router.pd"] = args.router_pd
    flags["router.prefill_workers"] = args.router_prefill_workers
    flags["router.decode_workers"] = args.router_decode_workers
    names = {key: option for option, key, _ in _ROUTER_FLAGS}
    names.update(
        {
            "router.pd": "--pd",
            "router.prefill_workers": "--prefill",
            "router.decode_workers": "--decode",
        }
    )
    names["router.workers"] = "--worker"
    names["router.vllm_events"] = "--vllm-events"
    names["router.kv_events"] = "--no-kv-events"
    loaded = load_from_args(args, flags, flag_names=names)

    def ready(server: RouterServer, address: tuple[str, int]) -> None:
        host, port = address
        print(f"{READY} {host}:{port}", flush=True)
        if not args.quiet:
            print(f"router on http://{host}:{port}: {describe(server)}", file=sys.stderr)

    asyncio.run(serve(loaded.config.router, on_ready=ready))
    return 0
