"""Where a disk-tier put or get of a 1 MiB block goes, beside bare ``pwritev``/``preadv`` loops.

One I/O thread (``io_threads=1``), O_DIRECT, 16 rotating page-aligned buffers (as
``disk_vs_fio.py`` uses), 256 blocks per round; rounds alternate the tier's call and bare loops
of the same ``pwritev(header, payload)`` / ``preadv(header, payload)`` calls: from or into the
same 16 buffers, the same with the xxh3 checksum done in line (what one thread that both does the
I/O and checksums pays), and one fixed buffer (what fio does). Prints microseconds per block, in
all and inside the syscall: the difference between the tier and the bare loop is the tier's own
work, the difference between the two bare loops the cost of pinning pages of rotating buffers for
O_DIRECT (and of the host-side copy of memory not in cache, on a virtual disk).

    cd <checkout> && PYTHONPATH=$PWD python benchmarks/disk_breakdown.py --dir . --op read
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import kvferry.backends.disk as disk
from kvferry.backends.base import TierContext
from kvferry.config.models import DiskTierConfig

BLOCK = 1 << 20
BLOCKS = 256
BATCH = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=".", help="a directory on the disk to measure")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--op", choices=("write", "read"), default="write")
    args = parser.parse_args()
    path = tempfile.mkdtemp(dir=args.dir, prefix=".disk-breakdown-")
    slots = (BLOCKS + 8) * (BLOCK + disk.HEADER_BLOCK)
    cfg = DiskTierConfig(path=path, capacity=slots, direct_io=True, io_threads=1)
    tier = disk.DiskTier(cfg, TierContext(slot_size=BLOCK))
    try:
        sources = []
        for _ in range(BATCH):
            # private memory, as fio's: shared anonymous pages come out scattered (disk_vs_fio.py)
            buf = mmap.mmap(-1, BLOCK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            buf.write(os.urandom(BLOCK))
            sources.append(memoryview(buf))
        keys = [i.to_bytes(8, "little") + b"breakdwn" for i in range(BLOCKS)]
        header = memoryview(mmap.mmap(-1, disk.HEADER_BLOCK))
        in_syscall = [0.0]
        name = "pwritev" if args.op == "write" else "preadv"
        real = getattr(os, name)

        def timed(*a: object) -> int:
            t0 = time.perf_counter()
            n = real(*a)  # type: ignore[arg-type]
            in_syscall[0] += time.perf_counter() - t0
            return n

        def tier_round() -> tuple[float, float]:
            if args.op == "write":
                tier.delete(keys)
            in_syscall[0] = 0.0
            setattr(disk.os, name, timed)
            t0 = time.perf_counter()
            try:
                for i in range(0, BLOCKS, BATCH):
                    if args.op == "write":
                        tier.put(keys[i : i + BATCH], sources)
                    elif tier.get(keys[i : i + BATCH], sources) != [BLOCK] * BATCH:
                        raise RuntimeError("the tier lost a block")
            finally:
                setattr(disk.os, name, real)
            return (time.perf_counter() - t0) / BLOCKS * 1e6, in_syscall[0] / BLOCKS * 1e6

        def bare_round(rotate: bool, check: bool = False) -> tuple[float, float]:
            in_syscall[0] = 0.0
            t0 = time.perf_counter()
            for s in range(BLOCKS):
                fd, offset = tier._where(s)
                payload = sources[s % BATCH] if rotate else sources[0]
                if check and args.op == "write":
                    disk.checksum(payload)
                timed(fd, [header, payload], offset)
                if check and args.op == "read":
                    disk.checksum(payload)
            return (time.perf_counter() - t0) / BLOCKS * 1e6, in_syscall[0] / BLOCKS * 1e6

        tier.put(keys, sources * (BLOCKS // BATCH))  # slots 0..BLOCKS-1, for reads
        kinds: dict[str, Callable[[], tuple[float, float]]] = {
            f"tier {'put' if args.op == 'write' else 'get'}": tier_round,
            "bare loop, same buffers": lambda: bare_round(True),
            "same + xxh3 in line": lambda: bare_round(True, check=True),
            "bare loop, one buffer": lambda: bare_round(False),
        }
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
        for r in range(args.rounds):
            order = list(kinds) if r % 2 == 0 else list(kinds)[::-1]
            for kind in order:
                results[kind].append(kinds[kind]())
        print(f"us per 1 MiB block, median of {args.rounds} alternating rounds:")
        for kind, rows in results.items():
            total = statistics.median(r[0] for r in rows)
            sys_ = statistics.median(r[1] for r in rows)
            print(f"  {kind:24s} {total:7.0f} in all, {sys_:7.0f} in {name}")
    finally:
        tier.close()
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
