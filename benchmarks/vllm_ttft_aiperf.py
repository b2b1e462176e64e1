"""The vLLM prefix-repeat TTFT benchmark measured by aiperf: kvferry connector vs plain vLLM.

The same workload as ``vllm_ttft.py``, but the requests are sent and timed by aiperf (NVIDIA's
benchmark client, PyPI ``aiperf``), so the figures do not depend on kvferry's own client. Per
setup (``kvferry``: two vLLM servers A and B sharing a ``kvferry serve store``; ``plain``: two
vLLM servers without a connector), one aiperf run sends ``--groups`` + 1 prompts to A, then one
sends the repeat prompts to B: each B prompt shares its first ``--prefix`` tokens with one A
prompt and differs after. The first group warms the servers up and is left out of the medians.

Prompts are text of the tiny model's own corpus words, cut at word boundaries, so the server's
tokenizer gives A and B prompts exactly the same prefix tokens; aiperf replays them from a
``mooncake_trace`` file (``text_input``) on a fixed schedule, ``--pause`` seconds apart (an
engine that just served keeps a core busy for a while; on two cores that would be timed as the
next request's TTFT). aiperf runs offline: the tokenizer is placed in a Hugging Face cache layout
as ``local/tiny`` with ``HF_HUB_OFFLINE=1``.

    make aiperf   # once: aiperf in its own virtualenv, .venv-aiperf
    .venv/bin/python benchmarks/vllm_ttft_aiperf.py --json benchmarks/results/vllm_ttft_aiperf.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.progress import Progress

from kvferry.serving.tiny_model import build_tiny_model, place_in_hf_cache, synthetic_corpus
from kvferry.testing.engines import SERVED_NAME, StoreServerProcess, VllmServer, connector_config


def _text(tok: Any, words: list[str], rng: random.Random, n_tokens: int) -> str:
    """Words drawn from the corpus, joined by spaces, until the text is ``n_tokens`` long."""
    out: list[str] = []
    while True:
        out.append(rng.choice(words))
        if len(tok.encode(" ".join(out), add_special_tokens=False)) >= n_tokens:
            return " ".join(out)


def _prompts(model: Path, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    words = sorted(set(synthetic_corpus(20_000, seed=args.seed + 1)))
    rng = random.Random(args.seed)
    a, b = [], []
    for _ in range(args.groups + 1):
        prefix = _text(tok, words, rng, args.prefix)
        a.append(prefix + " " + _text(tok, words, rng, args.prompt - args.prefix))
        b.append(prefix + " " + _text(tok, words, rng, args.prompt - args.prefix))
        pa = tok.encode(a[-1], add_special_tokens=False)
        pb = tok.encode(b[-1], add_special_tokens=False)
        shared = next((i for i, (x, y) in enumerate(zip(pa, pb)) if x != y), len(pa))
        if shared < args.prefix:
            raise SystemExit(f"prompt pair shares {shared} tokens, fewer than {args.prefix}")
    return a, b


def _trace(prompts: list[str], path: Path, args: argparse.Namespace) -> None:
    with path.open("w") as f:
        for i, text in enumerate(prompts):
            row = {
                "timestamp": int(i * args.pause * 1000),
                "text_input": text,
                "output_length": args.max_tokens,
            }
            f.write(json.dumps(row) + "\n")


def _aiperf(server: VllmServer, trace: Path, out: Path, hf_cache: Path, aiperf: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hf_cache), TRANSFORMERS_OFFLINE="1")
    cmd = [
        aiperf, "profile",
        "--model", SERVED_NAME,
        "--tokenizer", "local/tiny",
        "--url", server.url,
        "--endpoint-type", "completions",
        "--streaming",
        "--use-server-token-count",
        "--input-file", str(trace),
        "--custom-dataset-type", "mooncake_trace",
        "--fixed-schedule",
        "--extra-inputs", "ignore_eos:true",
        "--extra-inputs", "temperature:0",
        "--export-outputs-json",
        "--artifact-dir", str(out),
        "--ui-type", "none",
    ]  # fmt: skip
    with (out.parent / f"{out.name}.log").open("wb") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        tail = (out.parent / f"{out.name}.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"aiperf failed (rc {rc}):\n{tail}")


def _records(out: Path) -> list[dict[str, Any]]:
    """aiperf's per-request records, in the order the requests were sent."""
    rows = [json.loads(line) for line in (out / "profile_export.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: r["metadata"]["request_start_ns"])
    return rows


def _ttfts_ms(rows: list[dict[str, Any]]) -> list[float]:
    return [float(r["metrics"]["time_to_first_token"]["value"]) for r in rows]


def _outputs(out: Path) -> Any:
    path = out / "outputs.json"
    return json.loads(path.read_text()) if path.exists() else None


def _run(
    setup: str, model: Path, work: Path, traces: dict[str, Path], hf: Path,
    args: argparse.Namespace, progress: Progress,
) -> dict[str, Any]:  # fmt: skip
    store = None
    ktc = None
    if setup == "kvferry":
        store = StoreServerProcess(["--tiers", "cpu", "--capacity", "2GiB", "--slot-size", "1MiB"])
        store.start()
        ktc = connector_config(
            {"store": {"tiers": ["server"]}, "server": {"addresses": [store.address]}}
        )
    servers = {n: VllmServer(str(model), work / f"{setup}-{n}", ktc).start() for n in "ab"}
    try:
        task = progress.add_task(f"{setup}: starting vLLM A and B", total=3)
        for s in servers.values():
            s.wait_ready()
        progress.advance(task)
        result: dict[str, Any] = {}
        for n, s in servers.items():
            progress.update(task, description=f"{setup}: aiperf against {n.upper()}")
            out = work / f"aiperf-{setup}-{n}"
            _aiperf(s, traces[n], out, hf, args.aiperf)
            rows = _records(out)
            ttft = _ttfts_ms(rows)[1:]  # group 0 warms up
            summary = json.loads((out / "profile_export_aiperf.json").read_text())
            result[n] = {
                "ttft_ms": [round(t, 2) for t in ttft],
                "ttft_median_ms": round(statistics.median(ttft), 2),
                "aiperf_ttft": summary.get("time_to_first_token"),
                "requests": len(rows),
                "outputs": _outputs(out),
            }
            progress.advance(task)
        result["b_kvferry_metrics"] = {
            k: v
            for k, v in servers["b"].metrics().items()
            if k.startswith("kvferry:") and not k.endswith("_created")
        }
        return result
    finally:
        for s in servers.values():
            s.stop()
        if store is not None:
            store.kill()


def _output_texts(outputs: Any) -> list[str] | None:
    """The generated texts of an outputs.json, in the trace's order."""
    if outputs is None:
        return None
    rows = sorted(outputs["data"], key=lambda r: r["session_num"])
    return [str(r.get("response_text")) for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=20, help="measured prefix groups")
    ap.add_argument("--prompt", type=int, default=2048, help="prompt tokens")
    ap.add_argument("--prefix", type=int, default=1536, help="shared prefix tokens")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pause", type=float, default=1.5, help="seconds between requests")
    ap.add_argument("--aiperf", default=".venv-aiperf/bin/aiperf", help="the aiperf executable")
    ap.add_argument("--keep", help="copy aiperf's artifacts into this directory")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not 0 < args.prefix < args.prompt <= 4000:
        ap.error("need 0 < --prefix < --prompt <= 4000 (the model's context is 4096)")
    if not Path(args.aiperf).exists() and shutil.which(args.aiperf) is None:
        ap.error(f"aiperf not found at {args.aiperf}: run `make aiperf` or pass --aiperf PATH")
    with tempfile.TemporaryDirectory(prefix="kvferry-aiperf-bench-") as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "tiny")
        hf = work / "hf-hub"
        place_in_hf_cache(model, hf)
        a, b = _prompts(model, args)
        traces = {"a": work / "a.jsonl", "b": work / "b.jsonl"}
        _trace(a, traces["a"], args)
        _trace(b, traces["b"], args)
        with Progress() as progress:
            results = {
                s: _run(s, model, work, traces, hf, args, progress) for s in ("kvferry", "plain")
            }
        if args.keep:
            for d in work.glob("aiperf-*"):
                if d.is_dir():
                    shutil.copytree(d, Path(args.keep) / d.name, dirs_exist_ok=True)
                else:
                    shutil.copy(d, Path(args.keep) / d.name)
    kv, plain = results["kvferry"], results["plain"]
    same = _output_texts(kv["b"]["outputs"]) == _output_texts(plain["b"]["outputs"])
    for r in results.values():  # the texts are compared above; keep the JSON short
        for n in "ab":
            r[n]["outputs"] = _output_texts(r[n]["outputs"])
    have_outputs = kv["b"]["outputs"] is not None
    ratio = plain["b"]["ttft_median_ms"] / kv["b"]["ttft_median_ms"]
    print(f"aiperf, prompt {args.prompt} tokens, shared prefix {args.prefix}, {args.groups} groups")
    print(f"{'setup':<10}{'A TTFT p50 ms':>16}{'B TTFT p50 ms':>16}")
    for name, r in results.items():
        print(f"{name:<10}{r['a']['ttft_median_ms']:>16}{r['b']['ttft_median_ms']:>16}")
    print(f"B median TTFT, plain / kvferry: {ratio:.2f}x; B outputs equal: "
          f"{same if have_outputs else 'not exported'}")  # fmt: skip
    hits = kv["b_kvferry_metrics"]
    print("kvferry B metrics: " + ", ".join(f"{k}={v:g}" for k, v in sorted(hits.items())))
    if args.json:
        out = {"args": vars(args), "results": results, "ratio": round(ratio, 3), "same": same}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if same or not have_outputs else 1


if __name__ == "__main__":
    sys.exit(main())
