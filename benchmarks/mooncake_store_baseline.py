"""Mooncake Store baselines: local and remote ``get_batch``, beside kvferry's mooncake tier.

Two cases, each measured three ways (Mooncake's ``get_batch``, its zero-copy ``batch_get_into``
a registered buffer, and ``kvferry.backends.mooncake.MooncakeTier.get``, which reads into its
registered staging buffer and copies into the caller's buffers):

- local: one client whose own segment holds the objects (client and master on this machine);
  default 4 KiB objects in batches of 128, reported in objects/s. The tier row uses a fresh
  client (a tier) alone, which puts the objects into its own segment first.
- remote: the objects live in the segment of ANOTHER client process (this script started with
  ``--role holder``); the measuring client mounts no segment of its own, so every byte comes
  from the other process over Mooncake's transfer engine (TCP). Default 128 x 64 KiB per batch,
  reported in GB/s (1e9 bytes/s).

A ``mooncake_master`` is started on free loopback ports (``kvferry.backends.mooncake_master``)
unless ``--master host:port`` names one. Each row runs ``--duration`` seconds after a short
warm-up, and the first batch of every row is checked byte for byte before timing.

    .venv/bin/python benchmarks/mooncake_store_baseline.py
    .venv/bin/python benchmarks/mooncake_store_baseline.py --duration 2 --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

# Mooncake logs every setup step through glog on stderr; keep warnings and errors only. glog
# reads this when the library loads, so it must be set before the first mooncake import.
os.environ.setdefault("GLOG_minloglevel", "1")

SEGMENT_MIN = 16 << 20
PROTOCOL = "tcp"
METADATA = "P2PHANDSHAKE"


def _key(i: int, salt: int) -> bytes:
    return i.to_bytes(8, "little") + salt.to_bytes(8, "little")


def _value(i: int, size: int) -> bytes:
    seed = (i * 2654435761 % (1 << 32)).to_bytes(4, "little") * 16
    return (seed * (size // len(seed) + 1))[:size]


def _name(key: bytes) -> str:
    from kvferry.backends.mooncake import object_name

    return object_name(key)


def _client(master: str, segment: int, local_buffer: int) -> Any:
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", METADATA, segment, local_buffer, PROTOCOL, "", master)
    if rc != 0:
        raise SystemExit(f"mooncake setup against {master} failed with code {rc}")
    return store


def _registered(store: Any, size: int) -> tuple[bytearray, int]:
    buf = bytearray(size)
    addr = ctypes.addressof((ctypes.c_char * size).from_buffer(buf))
    rc = store.register_buffer(addr, size)
    if rc != 0:
        raise SystemExit(f"mooncake register_buffer failed with code {rc}")
    return buf, addr


def _put_all(store: Any, names: list[str], size: int, salt_values: list[bytes]) -> None:
    step = 64
    for start in range(0, len(names), step):
        rc = store.put_batch(names[start : start + step], salt_values[start : start + step])
        if rc != 0:
            raise SystemExit(f"mooncake put_batch failed with code {rc}")


@dataclass
class Row:
    case: str
    api: str
    object_bytes: int
    batch: int
    batches: int
    seconds: float

    @property
    def objects_per_s(self) -> float:
        return self.batches * self.batch / self.seconds

    @property
    def gb_per_s(self) -> float:
        return self.batches * self.batch * self.object_bytes / self.seconds / 1e9

    @property
    def batch_ms(self) -> float:
        return self.seconds / self.batches * 1e3


def _time(run: Callable[[int], None], rounds: int, duration: float) -> tuple[int, float]:
    """Call ``run(r)`` for r = 0, 1, ... for ``duration`` seconds; (calls, seconds)."""
    for r in range(min(rounds, 3)):
        run(r)  # warm-up: first-touch of buffers, connections
    calls = 0
    start = time.perf_counter()
    deadline = start + duration
    while True:
        run(calls % rounds)
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            return calls, now - start


def _measure_raw(
    case: str,
    store: Any,
    names: list[str],
    expected: Callable[[int], bytes],
    size: int,
    batch: int,
    duration: float,
) -> list[Row]:
    """Mooncake's own API: get_batch, then batch_get_into a registered buffer."""
    rounds = len(names) // batch
    groups = [names[r * batch : (r + 1) * batch] for r in range(rounds)]
    rows = []

    got = store.get_batch(groups[0])
    if [bytes(g) for g in got] != [expected(i) for i in range(batch)]:
        raise SystemExit(f"{case}: get_batch returned other bytes than were put")

    def get_batch(r: int) -> None:
        store.get_batch(groups[r])

    calls, secs = _time(get_batch, rounds, duration)
    rows.append(Row(case, "get_batch", size, batch, calls, secs))

    buf, addr = _registered(store, batch * size)
    ptrs = [addr + j * size for j in range(batch)]
    sizes = [size] * batch
    codes = store.batch_get_into(groups[0], ptrs, sizes)
    if codes != sizes or bytes(buf[:size]) != expected(0):
        raise SystemExit(f"{case}: batch_get_into answered {codes[:4]}... or other bytes")

    def get_into(r: int) -> None:
        store.batch_get_into(groups[r], ptrs, sizes)

    calls, secs = _time(get_into, rounds, duration)
    rows.append(Row(case, "batch_get_into (registered)", size, batch, calls, secs))
    store.unregister_buffer(addr)
    return rows


def _measure_tier(
    case: str,
    tier: Any,
    keys: list[bytes],
    expected: Callable[[int], bytes],
    size: int,
    batch: int,
    duration: float,
) -> Row:
    """kvferry's tier: get into caller buffers (through its registered staging buffer)."""
    rounds = len(keys) // batch
    groups = [keys[r * batch : (r + 1) * batch] for r in range(rounds)]
    outs = [memoryview(bytearray(size)) for _ in range(batch)]
    if tier.get(groups[0], outs) != [size] * batch or bytes(outs[1]) != expected(1):
        raise SystemExit(f"{case}: MooncakeTier.get returned other bytes")

    def tier_get(r: int) -> None:
        tier.get(groups[r], outs)

    calls, secs = _time(tier_get, rounds, duration)
    return Row(case, "kvferry MooncakeTier.get", size, batch, calls, secs)


def _tier(master: str, slot: int, segment: int, batch: int) -> Any:
    from kvferry.backends.base import TierContext
    from kvferry.backends.mooncake import MooncakeTier
    from kvferry.config.models import MooncakeTierConfig

    config = MooncakeTierConfig(
        master_address=master,
        global_segment_size=segment,
        local_buffer_size=max(batch * slot, 1 << 20),
    )
    return MooncakeTier(config, TierContext(slot_size=slot, label="bench"))


def run_local(args: argparse.Namespace, master: str) -> list[Row]:
    size, batch, count = args.local_size, args.batch, args.local_objects
    segment = max(SEGMENT_MIN, 4 * count * size)
    keys = [_key(i, 1) for i in range(count)]
    names = [_name(k) for k in keys]
    values = [_value(i, size) for i in range(count)]
    store = _client(master, segment, max(SEGMENT_MIN, 2 * batch * size))
    try:
        _put_all(store, names, size, values)
        rows = _measure_raw("local", store, names, lambda i: values[i], size, batch, args.duration)
    finally:
        store.close()  # its segment, and the objects in it, go away
    # The tier alone: the objects it puts can only land in its own segment.
    tier = _tier(master, size, segment, batch)
    try:
        for start in range(0, count, batch):
            tier.put(keys[start : start + batch], values[start : start + batch])
        rows.append(
            _measure_tier("local", tier, keys, lambda i: values[i], size, batch, args.duration)
        )
    finally:
        tier.close()
    return rows


def run_remote(args: argparse.Namespace, master: str) -> list[Row]:
    size, batch = args.remote_size, args.remote_batch
    count = batch * args.remote_batches
    holder = subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--role=holder",
            f"--master={master}",
            f"--remote-size={size}",
            f"--remote-batch={batch}",
            f"--remote-batches={args.remote_batches}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        line = holder.stdout.readline().decode().strip() if holder.stdout else ""
        if not line.startswith("READY"):
            raise SystemExit(f"holder process did not get ready (said {line!r})")
        keys = [_key(i, 2) for i in range(count)]
        names = [_name(k) for k in keys]
        # No segment of our own: every object is in the holder's segment.
        expected = lambda i: _value(i, size)  # noqa: E731
        store = _client(master, 0, max(SEGMENT_MIN, 2 * batch * size))
        try:
            rows = _measure_raw("remote", store, names, expected, size, batch, args.duration)
        finally:
            store.close()
        tier = _tier(master, size, 0, batch)  # no segment of its own either
        try:
            rows.append(_measure_tier("remote", tier, keys, expected, size, batch, args.duration))
        finally:
            tier.close()
        return rows
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        try:
            holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


def holder_main(args: argparse.Namespace) -> None:
    """Mount a segment, put the remote case's objects into it, serve until stdin closes."""
    size, batch = args.remote_size, args.remote_batch
    count = batch * args.remote_batches
    names = [_name(_key(i, 2)) for i in range(count)]
    values = [_value(i, size) for i in range(count)]
    segment = max(SEGMENT_MIN, 2 * count * size)
    store = _client(args.master, segment, max(SEGMENT_MIN, 64 * size + (1 << 20)))
    try:
        _put_all(store, names, size, values)
        print("READY", flush=True)
        sys.stdin.buffer.read()
    finally:
        store.close()


def _version() -> str:
    for dist in ("mooncake-transfer-engine-non-cuda", "mooncake-transfer-engine"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "mooncake (version unknown)"


def _print(rows: list[Row]) -> None:
    header = (
        f"{'case':<7} {'api':<28} {'object':>7} {'batch':>5} {'objects/s':>11} {'GB/s':>7} "
        f"{'ms/batch':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        obj = f"{r.object_bytes // 1024}KiB" if r.object_bytes >= 1024 else f"{r.object_bytes}B"
        print(
            f"{r.case:<7} {r.api:<28} {obj:>7} {r.batch:>5} {r.objects_per_s:>11,.0f} "
            f"{r.gb_per_s:>7.3f} {r.batch_ms:>9.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--master", help="host:port of a running mooncake_master (else start one)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per row")
    parser.add_argument("--cases", default="local,remote", help="local, remote or both")
    parser.add_argument("--local-size", type=int, default=4096, help="bytes per local object")
    parser.add_argument("--local-objects", type=int, default=4096, help="local objects put")
    parser.add_argument("--batch", type=int, default=128, help="keys per local get")
    parser.add_argument("--remote-size", type=int, default=65536, help="bytes per remote object")
    parser.add_argument("--remote-batch", type=int, default=128, help="keys per remote get")
    parser.add_argument(
        "--remote-batches", type=int, default=4, help="distinct remote batches cycled through"
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--role", choices=["measure", "holder"], default="measure")
    args = parser.parse_args(argv)

    if args.role == "holder":
        holder_main(args)
        return

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - {"local", "remote"}
    if unknown or not cases:
        parser.error(f"--cases: unknown {sorted(unknown)}; valid: local, remote")
    if args.local_objects < args.batch:
        parser.error("--local-objects must be at least --batch")

    from kvferry.backends.mooncake_master import MooncakeMaster

    master = None if args.master else MooncakeMaster.start()
    address = args.master or (master.address if master else "")
    rows: list[Row] = []
    try:
        if "local" in cases:
            rows += run_local(args, address)
        if "remote" in cases:
            rows += run_remote(args, address)
    finally:
        if master is not None:
            master.close()
    print(f"# {_version()}, protocol {PROTOCOL}, master {address}, {os.cpu_count()} CPUs")
    _print(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [
                    asdict(r) | {"objects_per_s": r.objects_per_s, "gb_per_s": r.gb_per_s}
                    for r in rows
                ],
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
