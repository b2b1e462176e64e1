"""``kvferry bench serve`` and aiperf measuring the same server with the same inputs.

One ``kvferry serve mock`` (its timing model is deterministic, so the server behaves the same
for both clients) with the tiny model's tokenizer, so both clients and the server count the
same tokens. Both tools send the same fixed prompts (one file in aiperf's ``single_turn``
format, ``--input-file``, every prompt distinct from its first token on and exactly ``--isl``
tokens long, sent in file order) and ask for exactly ``--osl`` output tokens (``ignore_eos``),
streaming, closed loop at ``--concurrency``, with warm-up requests left out; aiperf runs offline
with the tokenizer in a Hugging Face cache layout.
The medians of TTFT and ITL and the request throughput are compared (goal: within 5%), over
``--repeat`` alternating runs of each tool, with each tool's own spread between runs beside them.
``--request-rate R`` runs both open loop at constant arrivals instead. ``issue_gap_ms`` is the
median time from a request's end to the next request's start: in a closed loop, how long the
client takes to send the next request, which decides how requests line up with engine steps.
The server runs alone on CPU 0 and both clients on CPU 1 (``--no-pin``: shared), so what a
client does between requests (aiperf post-processes each record in other processes) does not
slow the server down.

    make aiperf
    .venv/bin/python benchmarks/serve_vs_aiperf.py --json benchmarks/results/serve_vs_aiperf.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kvferry.bench.endpoint.export import write_artifacts
from kvferry.bench.endpoint.harness import ServeBenchOptions, run
from kvferry.bench.endpoint.inputs import SyntheticSource
from kvferry.serving.tiny_model import build_tiny_model, place_in_hf_cache
from kvferry.testing.mock_engine import MockServerProcess

COMPARED = (
    ("time_to_first_token", "p50"),
    ("inter_token_latency", "p50"),
    ("request_latency", "p50"),
    ("request_throughput", "avg"),
    ("output_token_throughput", "avg"),
)


def _aiperf(
    url: str, model: str, prompts: Path, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    hf = work / "hf-hub"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hf), TRANSFORMERS_OFFLINE="1")
    out = work / "aiperf"
    if args.request_rate:
        load = ["--request-rate", str(args.request_rate), "--arrival-pattern", "constant"]
    else:
        load = ["--concurrency", str(args.concurrency)]
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        args.aiperf, "profile",
        "--model", model,
        "--tokenizer", "local/tiny",
        "--url", url,
        "--endpoint-type", "completions",
        "--streaming",
        "--input-file", str(prompts),
        "--custom-dataset-type", "single_turn",
        "--dataset-sampling-strategy", "sequential",
        "--output-tokens-mean", str(args.osl),
        "--output-tokens-stddev", "0",
        "--extra-inputs", "ignore_eos:true",
        "--extra-inputs", f"min_tokens:{args.osl}",
        *load,
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
    return {
        "figures": {f"{t} {st}": data.get(t, {}).get(st) for t, st in COMPARED},
        "isl": data["input_sequence_length"]["avg"],
        "osl": data["output_sequence_length"]["avg"],
    }


def _kvferry(
    url: str, model: Path, prompts: Path, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    report = run(
        ServeBenchOptions(
            url=url,
            tokenizer=str(model),
            concurrency=() if args.request_rate else (args.concurrency,),
            request_rate=(args.request_rate,) if args.request_rate else (),
            arrival="constant",
            request_count=args.requests,
            warmup_requests=args.warmup,
            input_file=str(prompts),
            osl=args.osl,
            seed=args.seed,
        )
    )
    write_artifacts(report, work / "kvferry")
    m = report.cases[0].metrics
    return {
        "figures": {f"{t} {st}": m.value(t, st) for t, st in COMPARED},
        "isl": m.value("input_sequence_length", "avg"),
        "osl": m.value("output_sequence_length", "avg"),
    }


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` on ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def _issue_gap_ms(directory: Path) -> float:
    """Median time from a request's end to the next request's start: in a closed loop, how long
    the client takes to send the next request when one finishes."""
    spans = []
    for line in (directory / "profile_export.jsonl").read_text().splitlines():
        meta = json.loads(line)["metadata"]
        spans.append((meta["request_start_ns"], meta["request_end_ns"]))
    ends = sorted(e for _, e in spans)
    gaps = []
    for start, _ in spans:
        k = bisect.bisect_right(ends, start)
        if k:
            gaps.append((start - ends[k - 1]) / 1e6)
    return statistics.median(gaps) if gaps else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isl", type=int, default=512)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4, help="closed loop")
    ap.add_argument(
        "--request-rate", type=float, default=0.0, help="open loop, constant arrivals, instead"
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs of each tool, alternating")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aiperf", default=".venv-aiperf/bin/aiperf", help="the aiperf executable")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument(
        "--keep",
        metavar="DIR",
        help="keep both tools' per-request exports here (DIR/kvferry, DIR/aiperf)",
    )
    ap.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not give the server CPU 0 and the clients CPU 1",
    )
    args = ap.parse_args()
    args.pin = args.pin and len(os.sched_getaffinity(0)) >= 2
    if not Path(args.aiperf).exists() and shutil.which(args.aiperf) is None:
        ap.error(f"aiperf not found at {args.aiperf}: run `make aiperf` or pass --aiperf PATH")
    with tempfile.TemporaryDirectory(prefix="kvferry-serve-vs-aiperf-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = build_tiny_model(work / "tiny")
        place_in_hf_cache(model, work / "hf-hub")
        tok = str(model / "tokenizer.json")
        # Fixed inputs: enough distinct prompts that neither tool's run (warm-up included)
        # wraps around to one the server has cached.
        synthetic = SyntheticSource(
            isl=args.isl, osl=args.osl, seed=args.seed, tokenizer=str(model)
        )
        prompts = work / "prompts.jsonl"
        with prompts.open("w") as f:
            for i in range(args.requests + args.warmup):
                f.write(json.dumps({"text": synthetic.spec(1, i).prompt}) + "\n")
        runs: dict[str, list[dict[str, Any]]] = {"kvferry": [], "aiperf": []}
        if args.pin:
            os.sched_setaffinity(0, {1})  # both clients (and aiperf's processes) on CPU 1
        with MockServerProcess.start("--tokenizer", tok, "--max-model-len", "4096") as mock:
            if args.pin:
                _pin(mock.proc.pid, {0})  # the server alone on CPU 0
            for _ in range(args.repeat):
                for name in runs:
                    mock.post("/kv/clear", {})  # each run starts from an empty prefix cache
                    before = mock.kv_stats()
                    if name == "kvferry":
                        figures = _kvferry(mock.url, model, prompts, work, args)
                    else:
                        figures = _aiperf(mock.url, "kvferry-mock", prompts, work, args)
                    after = mock.kv_stats()
                    figures["figures"]["issue_gap_ms"] = _issue_gap_ms(work / name)
                    # Prefix-cache hits the mock saw (warm-up included): equal inputs should
                    # hit equally, since hits lower TTFT.
                    figures["mock_kv"] = {
                        k: after[k] - before[k] for k in ("lookup_blocks", "hit_blocks")
                    }
                    runs[name].append(figures)
    load = (
        f"request rate {args.request_rate:g}/s constant"
        if args.request_rate
        else f"concurrency {args.concurrency}"
    )
    print(f"mock server, isl {args.isl}, osl {args.osl}, {load}, {args.requests} requests "
          f"(+{args.warmup} warm-up), {args.repeat} run(s) each; "
          "medians over runs, [min..max]")  # fmt: skip
    for name, rs in runs.items():
        print(f"  {name}: ISL {[r['isl'] for r in rs]}, OSL {[r['osl'] for r in rs]}, "
              f"mock KV {[r['mock_kv'] for r in rs]}")  # fmt: skip
    print(f"{'metric':<32}{'kvferry':>24}{'aiperf':>24}{'diff %':>9}")
    rows = []
    for key in [f"{t} {st}" for t, st in COMPARED] + ["issue_gap_ms"]:
        cells = []
        spans = {}
        for name, rs in runs.items():
            values = sorted(r["figures"][key] for r in rs)
            spans[name] = values
            cells.append(statistics.median(values))
        a, b = cells
        diff = (a / b - 1) * 100 if b else None
        rows.append({"metric": key, "kvferry": spans["kvferry"], "aiperf": spans["aiperf"],
                     "diff_pct_of_medians": diff})  # fmt: skip
        text = [f"{statistics.median(v):9.3f} [{v[0]:.1f}..{v[-1]:.1f}]" for v in spans.values()]
        d = "n/a" if diff is None else f"{diff:+.2f}"
        print(f"{key:<32}{text[0]:>24}{text[1]:>24}{d:>9}")
    if args.json:
        out = {"args": vars(args), "rows": rows, "runs": runs}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
