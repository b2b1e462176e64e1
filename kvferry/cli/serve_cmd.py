"""``kvferry serve store``: run a store server in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import signal
import threading

from rich.console import Console

from kvferry.cli.common import add_config_options, load_from_args

READY = "kvferry-store-ready"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser("serve", help="run a kvferry server")
    kinds = serve.add_subparsers(dest="serve_kind", required=True, metavar="KIND")
    store = kinds.add_parser(
        "store",
        help="a store server: cpu (+ disk) tiers served over the transfer engine's protocol",
        description="Serve a TieredStore (store.tiers: cpu, disk) on listen.bind_address:"
        "listen.port. Prints 'kvferry-store-ready HOST:PORT' once it accepts connections.",
    )
    add_config_options(store)
    store.add_argument("--port", type=int, help="listen.port (0 picks a free port)")
    store.add_argument("--bind", help="listen.bind_address (default 127.0.0.1)")
    store.add_argument("--capacity", help="cpu.capacity, e.g. 4GiB")
    store.add_argument("--slot-size", help="store.slot_size: bytes of the largest block")
    store.add_argument("--tiers", help="store.tiers, e.g. cpu or cpu,disk")
    store.add_argument("--disk-path", help="disk.path")
    store.add_argument("--register", metavar="REDIS_URL", help="server.membership_url")
    store.add_argument("--metrics-port", type=int, help="store.metrics_port (Prometheus)")
    store.add_argument("--quiet", action="store_true", help="print only the ready line")
    store.set_defaults(func=run_store)


def run_store(args: argparse.Namespace) -> int:
    from kvferry.backends.server.service import StoreServer

    flags = {
        "listen.port": args.port,
        "listen.bind_address": args.bind,
        "cpu.capacity": args.capacity,
        "store.slot_size": args.slot_size,
        "store.tiers": args.tiers,
        "disk.path": args.disk_path,
        "server.membership_url": args.register,
        "store.metrics_port": args.metrics_port,
    }
    names = {
        "listen.port": "--port",
        "listen.bind_address": "--bind",
        "cpu.capacity": "--capacity",
        "store.slot_size": "--slot-size",
        "store.tiers": "--tiers",
        "disk.path": "--disk-path",
        "server.membership_url": "--register",
        "store.metrics_port": "--metrics-port",
    }
    loaded = load_from_args(args, flags, flag_names=names)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = StoreServer(loaded.config)
    try:
        host, port = server.start()
        print(f"{READY} {host}:{port}", flush=True)
        if not args.quiet:
            cfg = loaded.config
            Console(stderr=True).print(
                f"store server on {host}:{port}: tiers {cfg.store.tiers}, "
                f"{server.store.first.capacity_blocks} slots of {cfg.store.slot_size} bytes"
            )
        stop.wait()
    finally:
        server.close()
    return 0
