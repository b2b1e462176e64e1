"""Disk tier vs fio: GB/s of kvferry's disk tier beside fio (libaio) on the same directory.

For each ``--threads`` value the tier (``io_threads`` = that value, O_DIRECT where the filesystem
takes it) puts ``--total`` bytes of ``--block-size`` blocks in batches of ``--batch`` from
page-aligned buffers into fresh slots ("fill"), deletes them all, puts them again into the reused
slots ("write", the steady state), then gets them all back ("read", checking a sample of the
bytes); fio runs sequential write and read with the same block size and ``iodepth`` = that value
(one job, libaio): one pass over a new file (the reference for "fill") and time-based loops.
GB is 1e9 bytes. The tier's buffers are slices of one huge-page region (:func:`region_buffers`
says why), and each row shows the device requests per block of both sides (/proc/diskstats):
a side above 1.0 had its I/Os split and is not doing the same I/O as the other. Run it on the
disk to measure (not a tmpfs)::

    .venv/bin/python benchmarks/disk_vs_fio.py --threads 1,4
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.disk import HEADER_BLOCK, DiskTier, align_up
from kvferry.bench.fio import FioRw, fio_command, run_fio
from kvferry.config.models import DiskTierConfig
from kvferry.config.units import parse_size


def _key(i: int) -> bytes:
    return i.to_bytes(8, "little") + b"diskbnch"


def region_buffers(count: int, block: int) -> list[memoryview]:
    """``count`` page-aligned buffers of ``block`` bytes cut from one private anonymous mapping
    with transparent huge pages asked for, as a KV cache's blocks are slices of one large
    allocation.

    Why: an O_DIRECT I/O over more physically scattered pages than the device takes segments
    (virtio-blk: 254) is split into two device requests, ~150-200 us more per 1 MiB read on the
    VMs this was measured on. Python's ``mmap.mmap(-1, n)`` is MAP_SHARED (shmem), whose pages
    came out scattered in every run (1.5-1.8 requests per block); small private mappings in
    about half the runs; huge pages never. fio's one malloc'd buffer mostly is not split: the
    req/block column printed below shows the runs where either side was.
    """
    stride = align_up(block)
    huge = 2 << 20
    area = mmap.mmap(-1, count * stride + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = memoryview(area)
    start = (-int(np.frombuffer(view, dtype=np.uint8).ctypes.data)) % huge
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            area.madvise(mmap.MADV_HUGEPAGE, start, count * stride)
        except OSError:
            pass  # no transparent huge pages here: plain private pages
    return [view[start + i * stride : start + i * stride + block] for i in range(count)]


def device_reads_writes(directory: str) -> tuple[int, int] | None:
    """Requests completed (reads, writes) so far by the block device under ``directory``, from
    /proc/diskstats; None where it cannot be told (another OS, a device mapper stack)."""
    dev = os.stat(directory).st_dev
    want = (os.major(dev), os.minor(dev))
    try:
        with open("/proc/diskstats", encoding="ascii") as f:
            for line in f:
                p = line.split()
                if (int(p[0]), int(p[1])) == want:
                    return int(p[3]), int(p[7])
    except (OSError, ValueError, IndexError):
        return None
    return None


def bench_tier(
    directory: str, *, block: int, total: int, threads: int, batch: int, direct: bool
) -> dict[str, float]:
    n = total // block
    path = tempfile.mkdtemp(dir=directory, prefix="tier-")
    config = DiskTierConfig(
        path=path,
        capacity=n * (HEADER_BLOCK + align_up(block)),
        direct_io=direct,
        io_threads=threads,
    )
    tier = DiskTier(config, TierContext(slot_size=block, label="bench"))
    try:
        srcs = region_buffers(batch, block)
        for b, src in enumerate(srcs):  # distinct bytes per buffer
            src[:] = bytes([b % 251 + 1]) * block
        outs = region_buffers(batch, block)
        keys = [_key(i) for i in range(n)]

        reqs: dict[str, float] = {}

        def count(op: str, before: tuple[int, int] | None) -> None:
            after = device_reads_writes(path)
            if before is not None and after is not None:
                side = 0 if op == "read" else 1
                reqs[f"{op}_requests_per_block"] = (after[side] - before[side]) / n

        def fill(op: str) -> float:
            before = device_reads_writes(path)
            start = time.perf_counter()
            for lo in range(0, n, batch):
                chunk = keys[lo : lo + batch]
                status = tier.put(chunk, srcs[: len(chunk)])
                if status != [PutStatus.STORED] * len(chunk):
                    raise RuntimeError(f"put answered {status}")
            took = time.perf_counter() - start
            count(op, before)
            return took

        # The first fill writes into freshly fallocated (unwritten) extents, which the
        # filesystem converts on each write; the refill after deleting everything reuses
        # written slots, as a tier does in steady state.
        first_s = fill("first_fill")
        tier.delete(keys)
        write_s = fill("write")
        before = device_reads_writes(path)
        start = time.perf_counter()
        for lo in range(0, n, batch):
            chunk = keys[lo : lo + batch]
            got = tier.get(chunk, outs[: len(chunk)])
            if got != [block] * len(chunk):
                raise RuntimeError(f"get answered {got}")
        read_s = time.perf_counter() - start
        count("read", before)
        # the last batch read must hold the bytes written from the same source buffers
        last = keys[(n - 1) // batch * batch :]
        for i in range(len(last)):
            if outs[i][:64] != srcs[i][:64] or outs[i][-64:] != srcs[i][-64:]:
                raise RuntimeError(f"block {i} of the last batch read back other bytes")
        direct_io = tier.stats().extra["direct_io"]
    finally:
        tier.close()
        shutil.rmtree(path, ignore_errors=True)
    moved = n * block
    return {
        "first_fill_gbps": moved / first_s / 1e9,
        "write_gbps": moved / write_s / 1e9,
        "read_gbps": moved / read_s / 1e9,
        "direct_io": direct_io,
        "blocks": n,
        **reqs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        default="",
        help="directory on the disk to measure (default: a temporary one in the current "
        "directory, removed afterwards; /tmp may be a tmpfs)",
    )
    parser.add_argument("--block-size", default="1MiB", help="bytes per block / fio --bs")
    parser.add_argument("--total", default="256MiB", help="bytes the tier writes and reads")
    parser.add_argument("--threads", default="1,4", help="io_threads values (fio iodepth)")
    parser.add_argument("--batch", type=int, default=16, help="blocks per put/get call")
    parser.add_argument("--fio-runtime", type=float, default=2.0, help="seconds per fio run")
    parser.add_argument("--buffered", action="store_true", help="tier and fio without O_DIRECT")
    parser.add_argument("--no-fio", action="store_true", help="measure the tier only")
    parser.add_argument("--json", default="", help="write the results here as JSON")
    args = parser.parse_args(argv)

    block = parse_size(args.block_size)
    total = parse_size(args.total)
    threads = [int(t) for t in args.threads.split(",") if t]
    direct = not args.buffered
    scratch = ""
    if not args.dir:
        args.dir = scratch = tempfile.mkdtemp(dir=".", prefix=".bench-disk-")
    try:
        return _run(args, block, total, threads, direct)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _run(args: argparse.Namespace, block: int, total: int, threads: list[int], direct: bool) -> int:
    os.makedirs(args.dir, exist_ok=True)
    rows: list[dict[str, object]] = []
    print(
        f"block {block} B, tier {total} B per direction in batches of {args.batch}, "
        f"{'O_DIRECT' if direct else 'buffered'}; fio libaio, 1 job, iodepth = threads, "
        f"{args.fio_runtime}s per run"
    )
    print(
        f"{'threads':>7} {'op':>5} {'tier GB/s':>10} {'fio GB/s':>9} {'ratio':>6} "
        f"{'fio p50 us':>10} {'fio p99 us':>10} {'req/block tier fio':>18}"
    )
    for t in threads:
        tier = bench_tier(
            args.dir, block=block, total=total, threads=t, batch=args.batch, direct=direct
        )
        fio: dict[str, dict[str, float]] = {}
        commands: dict[str, str] = {}
        # "fill" is fio's single pass over a file it has just created (fallocated, as the
        # tier's slots are), the fair reference for the tier's first fill; "write" and "read"
        # loop over the file for --fio-runtime seconds, so they measure rewrites.
        runs: tuple[tuple[str, FioRw, float | None], ...] = (
            ("fill", "write", None),
            ("write", "write", args.fio_runtime),
            ("read", "read", args.fio_runtime),
        )
        for op, rw, runtime in runs:
            if args.no_fio:
                break
            before = device_reads_writes(args.dir)
            fio[op] = run_fio(
                args.dir,
                rw=rw,
                block_size=block,
                size_bytes=total,
                iodepth=t,
                direct=direct,
                runtime_s=runtime,
            )
            after = device_reads_writes(args.dir)
            if before is not None and after is not None:
                side = 0 if rw == "read" else 1  # a read job's layout writes do not count
                ios = fio[op]["bytes"] / block
                fio[op]["requests_per_block"] = (after[side] - before[side]) / max(ios, 1)
            commands[op] = " ".join(
                fio_command(
                    args.dir,
                    rw=rw,
                    block_size=block,
                    size_bytes=total,
                    iodepth=t,
                    direct=direct,
                    runtime_s=runtime,
                )
            )
        rows.append({"threads": t, "tier": tier, "fio": fio, "fio_commands": commands})
        for op in ("fill", "write", "read"):
            name = "first_fill" if op == "fill" else op
            ours = tier[f"{name}_gbps"]
            line = f"{t:>7} {op:>5} {ours:>10.3f}"
            if op in fio:
                ref = fio[op]
                line += (
                    f" {ref['gbps']:>9.3f} {ours / ref['gbps']:>5.2f}x "
                    f"{ref['lat_p50_us']:>10.0f} {ref['lat_p99_us']:>10.0f}"
                )
                if f"{name}_requests_per_block" in tier and "requests_per_block" in ref:
                    line += (
                        f" {tier[f'{name}_requests_per_block']:>8.2f} "
                        f"{ref['requests_per_block']:>4.2f}"
                    )
            print(line)
        if tier["direct_io"] != (1.0 if direct else 0.0):
            print(f"  note: the tier ran with direct_io={tier['direct_io']:.0f}")
    print(
        "fill = first write into freshly fallocated slots (fio: one pass over a new file); "
        "write = refill after delete (fio: time-based rewrite); req/block = device requests "
        "per block (/proc/diskstats): above 1, I/Os were split (e.g. more scattered pages than "
        "the device takes segments), and the two sides did not do the same I/O"
    )
    if not args.no_fio:
        print("fio commands (threads = iodepth):", *commands.values(), sep="\n  ")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"argv": sys.argv, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
