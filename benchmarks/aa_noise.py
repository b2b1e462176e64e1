"""A/A noise: how far the same command's results move from one run to the next on this machine.

The default noise band of ``kvferry report --compare`` (``kvferry.report.compare.DEFAULT_BAND``)
comes from this: every pair of runs of one command is compared with ``compare_results``, and for
each bench metric the script prints the ratios' range and how far they stray from 1 (the
deviation ``max(r, 1/r) - 1`` at the median, 80th and 90th percentile), and what share of them a
band of 5, 10, 20 or 30% holds. A band that holds ~90% of A/A ratios calls a real difference
rarely wrong; pass yours with ``kvferry report --noise-band`` where your machine is quieter.

Usage::

    # run the A/A (the same commands twice in a row, into DIR), then analyse
    python benchmarks/aa_noise.py --run DIR
    # analyse runs already recorded: each GROUP is files of one command, comma-separated
    python benchmarks/aa_noise.py A_run1.json,A_run2.json B_run1.json,B_run2.json,B_run3.json
    # every *_runN.json group in benchmarks/results/ (the project's recorded repeat runs)
    python benchmarks/aa_noise.py --recorded

The commands of ``--run`` (a few minutes on 2 cores)::

    kvferry bench transfer --local --transport tcp --start-block-size 4KiB --max-block-size 1MiB \\
        --start-batch-size 16 --max-batch-size 16 --max-threads 1 --duration 1 --warmup 0.3 \\
        --rounds 3 --json DIR/aa_transfer_tcp_runN.json
    kvferry bench store --backend cpu --duration 3 --warmup 1 --json DIR/aa_store_cpu_runN.json
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from kvferry.bench.result import ResultError, load_result
from kvferry.report.compare import compare_results

RESULTS = Path(__file__).resolve().parent / "results"
BANDS = (0.05, 0.10, 0.20, 0.30)

TRANSFER = [
    "bench", "transfer", "--local", "--transport", "tcp", "--start-block-size", "4KiB",
    "--max-block-size", "1MiB", "--start-batch-size", "16", "--max-batch-size", "16",
    "--max-threads", "1", "--duration", "1", "--warmup", "0.3", "--rounds", "3", "--quiet",
]  # fmt: skip
STORE = ["bench", "store", "--backend", "cpu", "--duration", "3", "--warmup", "1", "--quiet"]


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def run_aa(directory: Path, runs: int) -> list[list[Path]]:
    directory.mkdir(parents=True, exist_ok=True)
    groups = []
    for name, args in (("aa_transfer_tcp", TRANSFER), ("aa_store_cpu", STORE)):
        group = []
        for i in range(1, runs + 1):
            path = directory / f"{name}_run{i}.json"
            print(f"{name} run {i}: load average {loadavg()}", flush=True)
            cmd = [sys.executable, "-m", "kvferry", *args, "--json", str(path)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            group.append(path)
        groups.append(group)
    print(f"after: load average {loadavg()}")
    return groups


def recorded() -> list[list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in sorted(RESULTS.glob("*_run[0-9].json")):
        groups.setdefault(re.sub(r"_run\d$", "", path.stem), []).append(path)
    return [g for g in groups.values() if len(g) > 1]


def analyse(groups: list[list[Path]]) -> None:
    ratios: dict[tuple[str, str, str], list[float]] = {}
    for group in groups:
        try:
            results = [load_result(p) for p in group]
        except ResultError as e:
            print(f"skipped {group[0].name}...: {e}")
            continue
        for a, b in itertools.combinations(results, 2):
            for v in compare_results([a], [b]).verdicts:
                if v.ratio is not None:
                    ratios.setdefault((v.tool, v.metric, v.band_source), []).append(v.ratio)
                    ratios.setdefault((v.tool, v.metric, "any"), []).append(v.ratio)
    head = ["tool", "metric", "band from", "pairs", "min", "max", "dev p50", "p80", "p90"]
    head += [f"in +-{b:.0%}" for b in BANDS]
    print(" | ".join(head))
    for (tool, metric, source), rs in sorted(ratios.items()):
        dev = np.array([max(r, 1 / r) - 1 for r in rs])
        p50, p80, p90 = np.percentile(dev, [50, 80, 90])
        inside = [f"{np.mean(dev <= b):.0%}" for b in BANDS]
        cells = [tool, metric, source, str(len(rs)), f"{min(rs):.3f}", f"{max(rs):.3f}"]
        cells += [f"{p50:.3f}", f"{p80:.3f}", f"{p90:.3f}", *inside]
        print(" | ".join(cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", nargs="*", help="FILE,FILE[,...]: runs of one command")
    parser.add_argument("--run", type=Path, metavar="DIR", help="run the A/A into DIR first")
    parser.add_argument("--runs", type=int, default=2, help="runs per command with --run")
    parser.add_argument("--recorded", action="store_true", help="benchmarks/results/*_runN")
    args = parser.parse_args()
    groups = [[Path(p) for p in g.split(",")] for g in args.groups]
    if args.run:
        groups += run_aa(args.run, args.runs)
    if args.recorded:
        groups += recorded()
    if not groups:
        parser.error("nothing to analyse: give groups of files, --run DIR or --recorded")
    analyse(groups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
