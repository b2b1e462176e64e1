"""``kvferry bench serve`` and aiperf measuring the same server with the same inputs.

One ``kvferry serve mock`` (its timing model is deterministic, so the server behaves the same
for both clients) with the tiny model's tokenizer, so both clients and the server count the
same tokens. Both tools send synthetic prompts of exactly ``--isl`` tokens and ask for exactly
``--osl`` output tokens (``ignore_eos``), streaming, closed loop at ``--concurrency``, with
warm-up requests left out; aiperf runs offline with the tokenizer in a Hugging Face cache layout.
The medians of TTFT and ITL and the request throughput are compared (goal: within 5%).

    make aiperf
    .venv/bin/python benchmarks/serve_vs_aiperf.py --json benchmarks/results/serve_vs_aiperf.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kvferry.bench.endpoint import ServeBenchOptions, run_serve_bench
from kvferry.serving.tiny_model import build_tiny_model, place_in_hf_cache
from kvferry.testing.mock_engine import MockServerProcess

COMPARED = (
    ("time_to_first_token", "p50"),
    ("inter_token_latency", "p50"),
    ("request_latency", "p50"),
    ("request_throughput", "avg"),
    ("output_token_throughput", "avg"),
)


def _aiperf(url: str, model: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    hf = work / "hf-hub"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hf), TRANSFORMERS_OFFLINE="1")
    out = work / "aiperf"
    cmd = [
        args.aiperf, "profile",
        "--model", model,
        "--tokenizer", "local/tiny",
        "--url", url,
        "--endpoint-type", "completions",
        "--streaming",
        "--synthetic-input-tokens-mean", str(args.isl),
        "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(args.osl),
        "--output-tokens-stddev", "0",
        "--extra-inputs", "ignore_eos:true",
        "--extra-inputs", f"min_tokens:{args.osl}",
        "--concurrency", str(args.concurrency),
        "--request-count", str(args.requests),
        "--warmup-request-count", str(args.warmup),
        "--random-seed", str(args.seed),
        "--artifact-dir", str(out),
        "--ui-type", "none",
    ]  # fmt: skip
    log = work / "aiperf.log"
    with log.open("wb") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        raise SystemExit(f"aiperf failed (rc {rc}):\n{log.read_text(errors='replace')[-3000:]}")
    data: dict[str, Any] = json.loads((out / "profile_export_aiperf.json").read_text())
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isl", type=int, default=512)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aiperf", default=".venv-aiperf/bin/aiperf", help="the aiperf executable")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not Path(args.aiperf).exists() and shutil.which(args.aiperf) is None:
        ap.error(f"aiperf not found at {args.aiperf}: run `make aiperf` or pass --aiperf PATH")
    with tempfile.TemporaryDirectory(prefix="kvferry-serve-vs-aiperf-") as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "tiny")
        place_in_hf_cache(model, work / "hf-hub")
        tok = str(model / "tokenizer.json")
        with MockServerProcess.start("--tokenizer", tok, "--max-model-len", "4096") as mock:
            hits = [mock.kv_stats()]
            ours = run_serve_bench(
                ServeBenchOptions(
                    url=mock.url,
                    tokenizer=str(model),
                    concurrency=(args.concurrency,),
                    request_count=args.requests,
                    warmup_requests=args.warmup,
                    isl=args.isl,
                    osl=args.osl,
                    seed=args.seed,
                )
            )
            hits.append(mock.kv_stats())
            theirs = _aiperf(mock.url, ours.model, work, args)
            hits.append(mock.kv_stats())
    # Prefix-cache hits the mock saw during each tool's run (warm-up included): equal inputs
    # should hit equally, since hits lower TTFT.
    hit = {
        name: {k: hits[i + 1][k] - hits[i][k] for k in ("lookup_blocks", "hit_blocks")}
        for i, name in enumerate(("kvferry", "aiperf"))
    }
    m = ours.levels[0].metrics
    rows = []
    for tag, stat in COMPARED:
        a = m.value(tag, stat)
        b = theirs.get(tag, {}).get(stat)
        diff = (a / b - 1) * 100 if a is not None and b else None
        rows.append({"metric": tag, "stat": stat, "kvferry": a, "aiperf": b, "diff_pct": diff})
    isl = (m.value("input_sequence_length", "avg"), theirs["input_sequence_length"]["avg"])
    osl = (m.value("output_sequence_length", "avg"), theirs["output_sequence_length"]["avg"])
    print(f"mock server, isl {args.isl}, osl {args.osl}, concurrency {args.concurrency}, "
          f"{args.requests} requests (+{args.warmup} warm-up); ISL {isl}, OSL {osl}; "
          f"mock KV hits {hit}")  # fmt: skip
    print(f"{'metric':<32}{'kvferry':>12}{'aiperf':>12}{'diff %':>9}")
    for r in rows:
        d = "n/a" if r["diff_pct"] is None else f"{r['diff_pct']:+.2f}"
        print(f"{r['metric'] + ' ' + r['stat']:<32}{r['kvferry']:>12.3f}{r['aiperf']:>12.3f}{d:>9}")
    if args.json:
        out = {"args": vars(args), "rows": rows, "isl": isl, "osl": osl, "mock_kv": hit}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
