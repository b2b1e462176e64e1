"""Simulation speed of the hit-rate lab: block lookups per second per policy run, and the
improvement over another checkout of kvferry measured at the same time.

One checkout:
    .venv/bin/python benchmarks/hitrate_speed.py --json benchmarks/results/hitrate_speed_runs.json

Against a base commit (single runs of the two alternate on one CPU; the ratio is the median of
adjacent pairs, because this VM's speed drifts by up to 2x within a minute):
    git worktree add /tmp/base <commit>
    .venv/bin/python benchmarks/hitrate_speed.py --base /tmp/base

Each case is the best of ``--repeat`` runs of ``kvferry.bench.hitrate.simulate`` on the bundled
Mooncake trace (121,877 blocks; ``--trace FILE`` for another), with the trace's keys built once.
``--engine`` as for ``kvferry bench hitrate`` (auto: LRU over one tier takes the one-pass
stack shortcut; store: always the TieredStore loop).

The bare reference (``--bare``): the same exact LRU written as a loop over three plain dicts (the
index, the tier and the order, what the store keeps per block), with none of the store around
them: no locks, statistics, validation or policy interface. It must count the same hits as the
store's LRU (checked), and its speed is what pure Python reaches on this machine; each policy's
run (``--policy``) is reported as a fraction of it at the same capacity, runs alternating, and
with ``--store-too`` beside the store loop's run as well:
    .venv/bin/python benchmarks/hitrate_speed.py --bare --store-too --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent


TRACE = "mooncake-synthetic"
BLOCK_TOKENS = 512


def _lab() -> Any:
    """The hit-rate lab of the checkout on the path, whichever layout it has: the package's
    public surface (``kvferry.bench.hitrate``), its one ``lab`` module (941204f), or the flat
    module before it; so ``--base`` can name any of them."""
    import kvferry.bench.hitrate as hitrate

    if hasattr(hitrate, "simulate"):
        return hitrate
    from kvferry.bench.hitrate import lab  # type: ignore[attr-defined]

    return lab


def _trace() -> tuple[Any, list[list[bytes]], int]:
    """The trace (``--trace``), its store keys (built once) and their number."""
    from kvferry.bench.traces import read_trace

    hitrate = _lab()

    trace = read_trace(TRACE, block_tokens=BLOCK_TOKENS, strict=True)
    keys = hitrate.trace_keys(trace)
    return trace, keys, sum(len(k) for k in keys)


def measure(
    policies: list[str], capacities: list[int], repeat: int, engine: str
) -> list[dict[str, object]]:
    hitrate = _lab()
    trace, keys, blocks = _trace()
    rows: list[dict[str, object]] = []
    for policy in policies:
        for cap in capacities:
            tiers = [hitrate.TierSpec("cpu", cap)]
            runs = [
                hitrate.simulate(trace, tiers, policy=policy, keys=keys, engine=engine)
                for _ in range(repeat)
            ]
            rows.append(
                {
                    "policy": policy,
                    "capacity_blocks": cap,
                    "engine": runs[0].engine,
                    "block_hit_rate": runs[0].block_hit_rate,
                    "lookups_per_s": max(blocks / r.seconds for r in runs),
                }
            )
    return rows


def bare_lru(keys: list[list[bytes]], cap: int) -> tuple[int, float]:
    """Hit blocks and seconds of the bare reference (module docstring): per request, the
    cached prefix is read (moved to the LRU end in order), cached blocks after it are touched,
    and the new ones are stored after evicting from the LRU front, in chunks of at most
    ``cap // 2`` as the store makes room."""
    from collections import deque
    from itertools import islice, repeat

    where: dict[bytes, int] = {}
    blocks: dict[bytes, bytes] = {}
    order: dict[bytes, None] = {}
    hits = 0
    step = max(1, cap // 2)
    start = time.perf_counter()
    for ks in keys:
        n = 0
        for k in ks:
            if k in where:
                n += 1
            else:
                break
        for k in ks[:n]:
            del order[k]
            order[k] = None
        hits += n
        new = []
        for k in dict.fromkeys(ks[n:]):
            if k in where:
                del order[k]
                order[k] = None
            else:
                new.append(k)
        for i in range(0, len(new), step):
            chunk = new[i : i + step]
            over = len(blocks) + len(chunk) - cap
            if over > 0:
                victims = list(islice(order, over))
                deque(map(blocks.pop, victims, repeat(None)), maxlen=0)
                deque(map(order.pop, victims, repeat(None)), maxlen=0)
                deque(map(where.pop, victims, repeat(None)), maxlen=0)
            where.update(dict.fromkeys(chunk, 1))
            blocks.update(dict.fromkeys(chunk, b""))
            order.update(dict.fromkeys(chunk))
    return hits, time.perf_counter() - start


def bare_reference(
    policies: list[str], caps: list[int], repeat: int, engine: str, store_too: bool
) -> list[dict[str, object]]:
    """Each policy's run (``engine``) next to :func:`bare_lru` at the same capacity, and with
    ``store_too`` the store loop as well, alternating single runs; LRU must hit the same."""
    hitrate = _lab()
    trace, keys, blocks = _trace()
    rows: list[dict[str, object]] = []
    for policy in policies:
        for cap in caps:
            ours, bare, loop, ratios, over_loop = [], [], [], [], []
            tiers = [hitrate.TierSpec("cpu", cap)]
            for _ in range(repeat):
                r = hitrate.simulate(trace, tiers, policy=policy, keys=keys, engine=engine)
                hits, seconds = bare_lru(keys, cap)
                if policy == "lru" and hits != r.tally.hit_blocks:
                    raise SystemExit(
                        f"lru {cap}: the bare loop hit {hits} blocks, kvferry {r.tally.hit_blocks}"
                    )
                ours.append(blocks / r.seconds)
                bare.append(blocks / seconds)
                ratios.append(ours[-1] / bare[-1])
                if store_too:
                    s = hitrate.simulate(trace, tiers, policy=policy, keys=keys, engine="store")
                    if s.tally.hit_blocks != r.tally.hit_blocks:
                        raise SystemExit(f"{policy} {cap}: the store loop counts differently")
                    loop.append(blocks / s.seconds)
                    over_loop.append(ours[-1] / loop[-1])
            row: dict[str, object] = {
                "policy": policy,
                "capacity_blocks": cap,
                "engine": r.engine,
                "hit_blocks": r.tally.hit_blocks,
                "lookups_per_s": statistics.median(ours),
                "bare_lookups_per_s": statistics.median(bare),
                "fraction_of_bare": statistics.median(ratios),
            }
            if store_too:
                row["store_lookups_per_s"] = statistics.median(loop)
                row["over_store"] = statistics.median(over_loop)
            rows.append(row)
    return rows


def _worker(root: Path, cpu: int) -> subprocess.Popen[str]:
    """A process of checkout ``root`` on ``cpu`` that answers "policy capacity" lines with one
    run's lookups/s and hit rate (the trace is loaded once)."""
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.Popen(
        ["taskset", "-c", str(cpu), sys.executable, __file__, "--serve"],
        cwd=root,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _serve() -> None:
    hitrate = _lab()
    trace, keys, blocks = _trace()
    for line in sys.stdin:
        policy, cap, engine = line.split()
        tiers = [hitrate.TierSpec("cpu", int(cap))]
        r = hitrate.simulate(trace, tiers, policy=policy, keys=keys, engine=engine)
        print(json.dumps([blocks / r.seconds, r.block_hit_rate]), flush=True)


def _ask(worker: subprocess.Popen[str], policy: str, cap: int, engine: str) -> tuple[float, float]:
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdin.write(f"{policy} {cap} {engine}\n")
    worker.stdin.flush()
    rate, hit = json.loads(worker.stdout.readline())
    return rate, hit


def compare(
    base: Path, policies: list[str], caps: list[int], repeat: int, engine: str = "auto"
) -> list[dict[str, object]]:
    """Alternate single runs of the base and this checkout on one CPU (never at once) and take
    the median of the adjacent pairs' ratios: the VM's speed drifts by up to 2x within a minute,
    but little between two runs a fraction of a second apart."""
    mine, other = _worker(HERE, 1), _worker(base.resolve(), 1)
    rows: list[dict[str, object]] = []
    try:
        for policy in policies:
            for cap in caps:
                ratios, mine_rates, base_rates = [], [], []
                for _ in range(repeat):
                    b_rate, b_hit = _ask(other, policy, cap, engine)
                    m_rate, m_hit = _ask(mine, policy, cap, engine)
                    if b_hit != m_hit:
                        raise SystemExit(f"{policy} {cap}: hit rates differ ({b_hit} vs {m_hit})")
                    ratios.append(m_rate / b_rate)
                    mine_rates.append(m_rate)
                    base_rates.append(b_rate)
                rows.append(
                    {
                        "policy": policy,
                        "capacity_blocks": cap,
                        "engine": engine,
                        "block_hit_rate": m_hit,
                        "base_lookups_per_s": statistics.median(base_rates),
                        "lookups_per_s": statistics.median(mine_rates),
                        "ratio_median": statistics.median(ratios),
                        "ratios": ratios,
                    }
                )
    finally:
        for w in (mine, other):
            w.kill()
            w.wait()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--policy", default="lru,fifo,lfu,length-aware")
    p.add_argument("--capacity", default="1953,9765,19531")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--base", type=Path, help="another kvferry checkout to compare with")
    p.add_argument(
        "--bare", action="store_true", help="each policy next to the bare-dict LRU reference"
    )
    p.add_argument(
        "--store-too", action="store_true", help="with --bare: the store loop alternates as well"
    )
    p.add_argument("--trace", default="mooncake-synthetic", help="trace file or bundled name")
    p.add_argument("--block-tokens", type=int, default=512, help="tokens per hash id of --trace")
    p.add_argument("--engine", default="auto", choices=["auto", "store", "stack", "direct"])
    p.add_argument("--json", default="")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    global TRACE, BLOCK_TOKENS
    TRACE, BLOCK_TOKENS = a.trace, a.block_tokens
    if a.serve:
        _serve()
        return
    policies = [x for x in a.policy.split(",") if x]
    caps = [int(x) for x in a.capacity.split(",") if x]
    if a.bare:
        rows = bare_reference(policies, caps, a.repeat, a.engine, a.store_too)
        print(
            f"{'policy':13} {'blocks':>7} {'kvferry':>8} {'bare':>8}  ratio (median)  engine"
            + ("   store loop  kvferry/loop" if a.store_too else "")
        )
        for r in rows:
            print(
                f"{r['policy']:13} {r['capacity_blocks']:>7} "
                f"{r['lookups_per_s'] / 1e6:>7.3f}M {r['bare_lookups_per_s'] / 1e6:>7.3f}M  "
                f"{r['fraction_of_bare']:.2f}  {r['engine']}"
                + (
                    f"  {r['store_lookups_per_s'] / 1e6:>7.3f}M  {r['over_store']:.2f}"
                    if a.store_too
                    else ""
                )
            )
        report: dict[str, object] = {
            "reference": "bare-dict LRU",
            "trace": TRACE,
            "rows": rows,
        }
    elif a.base is None:
        rows = measure(policies, caps, a.repeat, a.engine)
        for r in rows:
            print(
                f"{r['policy']:13} {r['capacity_blocks']:>7} "
                f"{r['lookups_per_s'] / 1e6:.3f}M  {r['engine']}"
            )
        report = {"trace": TRACE, "rows": rows}
    else:
        rows = compare(a.base, policies, caps, a.repeat, a.engine)
        print(f"{'policy':13} {'blocks':>7} {'base':>8} {'this':>8}  ratio (median of pairs)")
        for r in rows:
            print(
                f"{r['policy']:13} {r['capacity_blocks']:>7} "
                f"{r['base_lookups_per_s'] / 1e6:>7.3f}M {r['lookups_per_s'] / 1e6:>7.3f}M  "
                f"{r['ratio_median']:.2f}x"
            )
        report = {"base": str(a.base), "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
