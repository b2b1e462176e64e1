"""The SLA plan checked on real engines (issue 23, part 4): profile vLLM (the CPU build, the tiny
model of ``kvferry model tiny``), calibrate the mock from the profile, plan on simulated fleets,
and run 1 and 2 real instances behind the router at the same load to set predicted beside
measured.

    .venv/bin/python benchmarks/verify_plan.py --pin --json benchmarks/results/verify_plan.json

Steps (each prints what it runs; the kvferry commands are the CLI's, called in-process):

1. build the tiny model; start vLLM A (float32, ``--max-model-len``, KV events for the router);
2. ``kvferry profile --candidate tiny=URL_A --tokenizer MODEL --out WORK/profile`` (both modes);
3. held-out check of the calibration: the same points the profile did not measure (ISLs half
   way between its ISLs; decode contexts half way between its contexts, at concurrency 2 and
   3), measured on vLLM A and on ``kvferry serve mock --profile WORK/profile/tiny`` (speed-up
   1): TTFT and ITL p50 side by side;
4. ``kvferry plan --profile WORK/profile/tiny --simulate --all-fleets --max-instances 2`` at the
   load (``--rate``, ``--isl``, ``--osl``, ``--ttft``, ``--itl``): predicted TTFT / ITL p50 and
   p99 per (routing mode, instances);
5. start vLLM B; per routing mode and 1 then 2 instances, a fresh ``kvferry serve router`` in
   front of A (and B) and ``kvferry bench serve`` at the load (the same request count, Poisson
   arrivals, each run its own prompts): measured TTFT / ITL p50 and p99;
6. the table of predicted against measured, and ``--json``.

On a 2-core machine the two vLLM instances share the cores (and the client and router share them
too): the 2-instance measurement is what this machine gives, not two machines' worth. Numbers
are recorded in BENCHMARKS.md only from a quiet machine.

``--engine mock`` runs the same steps with ``kvferry serve mock --mock-args ...`` processes as
the "real" engines: a few minutes' check of the script itself, not a verification.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from kvferry.bench.endpoint import harness as endpoint
from kvferry.bench.profile.fit import interp_1d, interp_at
from kvferry.bench.profile.npz import read_profile
from kvferry.bench.profile.report import ProfileReport
from kvferry.bench.profile.simulate import SimulationReport
from kvferry.bench.result import load_result
from kvferry.bench.router.fleet import ServeProcess, router_stats
from kvferry.cli.main import main as kvferry


def say(text: str) -> None:
    print(f"[verify_plan {time.strftime('%H:%M:%S')}] {text}", flush=True)


class Engines:
    """The real engines (vLLM, or mock stand-ins), started on demand and stopped with ``stack``."""

    def __init__(self, args: argparse.Namespace, work: Path, stack: ExitStack) -> None:
        self.args = args
        self.work = work
        self.stack = stack
        self.urls: list[str] = []
        self.sources: list[str] = []
        self.block_size = 16
        self.tokenizer = ""
        self.model = ""
        if args.engine == "vllm":
            from kvferry.serving.tiny_model import build_tiny_model

            self.model = str(build_tiny_model(work / "tiny"))
            self.tokenizer = self.model

    def start(self) -> str:
        i = len(self.urls)
        if self.args.engine == "mock":
            from kvferry.testing.mock_engine import MockServerProcess

            mock = self.stack.enter_context(
                MockServerProcess.start(*shlex.split(self.args.mock_args))
            )
            self.urls.append(mock.url)
            return mock.url
        from kvferry.testing.engines import VllmServer

        pub, replay = f"ipc://{self.work}/w{i}-events", f"ipc://{self.work}/w{i}-replay"
        events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": pub,
            "replay_endpoint": replay,
        }
        server = VllmServer(
            self.model,
            self.work / f"vllm{i}",
            extra_args=["--kv-events-config", json.dumps(events)],
            max_model_len=self.args.max_model_len,
        )
        if self.args.pin:
            # One core per instance, as on separate machines: unpinned, each vLLM CPU worker runs
            # an OpenMP team over every core and two instances' teams spin against each other.
            cores = sorted(os.sched_getaffinity(0))
            core = cores[i % len(cores)]
            server.env.update(VLLM_CPU_OMP_THREADS_BIND=str(core), OMP_NUM_THREADS="1")
        server.start()
        self.stack.callback(server.stop)
        server.wait_ready()
        self.block_size = server.cache_block_size()
        self.urls.append(server.url)
        self.sources.append(f"{server.url}={pub},{replay}")
        return server.url

    def router_flags(self, n: int) -> list[str]:
        flags = ["--block-size", str(self.block_size)]
        if self.tokenizer:
            flags += ["--tokenizer", self.tokenizer]
        for url in self.urls[:n]:
            flags += ["--worker", url]
        for source in self.sources[:n]:
            flags += ["--vllm-events", source]
        return flags


def measure(
    url: str,
    tokenizer: str,
    isl: int,
    osl: int,
    *,
    concurrency: int = 0,
    rate: float = 0.0,
    requests: int,
    seed: int,
    warmup: int = 1,
) -> dict[str, Any]:
    """One ``kvferry bench serve`` level: TTFT and ITL p50 / p99 in ms."""
    options = endpoint.ServeBenchOptions(
        url=url,
        tokenizer=tokenizer,
        isl=isl,
        osl=osl,
        seed=seed,
        workers=1,
        concurrency=(concurrency,) if concurrency else (),
        request_rate=(rate,) if rate else (),
        request_count=requests,
        warmup_requests=warmup,
    )
    m = endpoint.run(options).cases[0].metrics
    return {
        "requests": m.request_count,
        "errors": m.error_count,
        **{
            f"{name}_{stat}_ms": m.value(tag, stat)
            for name, tag in (("ttft", "time_to_first_token"), ("itl", "inter_token_latency"))
            for stat in ("p50", "p99")
        },
    }


def held_out(profile_dir: Path) -> list[tuple[str, int, int, int]]:
    """``(stage, isl, osl, concurrency)`` half way between the profile's measured points: three
    ISLs spread over its prefill range, and two decode contexts at concurrency 2 and 3."""
    r = read_profile(profile_dir)
    mids = [(a + b) // 2 for a, b in itertools.pairwise(sorted({p.isl for p in r.prefill}))]
    spread = sorted({mids[round(k * (len(mids) - 1) / 2)] for k in range(3)}) if mids else []
    out = [("prefill", isl, r.options.prefill_osl, 1) for isl in spread]
    contexts = sorted({p.isl for p in r.decode})
    for (a, b), c in zip(itertools.pairwise(contexts), (2, 3), strict=False):
        out.append(("decode", (a + b) // 2, r.options.decode_osl, c))
    return out


def interpolated(r: ProfileReport, stage: str, isl: int, osl: int, concurrency: int) -> float:
    """What the profile's interpolation says at a held-out point: TTFT p50 (ms) linear between
    the measured ISLs; ITL p50 (ms) on the decode surface at that point's KV usage and context
    (``fit.interp_at``, what the planner reads)."""
    if stage == "prefill":
        return interp_1d([p.isl for p in r.prefill], [p.ttft_p50_ms for p in r.prefill], isl)
    usage = (isl + osl / 2) * concurrency / r.max_kv_tokens
    x = [p.kv_usage for p in r.decode]
    y = [float(p.isl) for p in r.decode]
    z = [p.itl_p50_ms for p in r.decode]
    return float(interp_at(x, y, z, np.array([usage]), np.array([float(isl)]))[0, 0])


def _pct(model: float | None, real: float | None) -> str:
    if model is None or not real:
        return "-"
    return f"{100 * (model - real) / real:+.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--engine", choices=["vllm", "mock"], default="vllm")
    ap.add_argument(
        "--mock-args",
        default="--speedup-ratio 2 --max-model-len 2048 --num-blocks 1024",
        help="--engine mock: the stand-in engines' kvferry serve mock flags",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="vLLM: one core per instance (the profile and both fleets), as on separate machines",
    )
    ap.add_argument("--max-model-len", type=int, default=2048, help="vLLM's (2048)")
    ap.add_argument("--granularity", type=int, default=8, help="profile prefill points (8)")
    ap.add_argument(
        "--prefill-requests", type=int, default=8, help="profile: requests per prefill point (8)"
    )
    ap.add_argument(
        "--held-out-requests",
        type=int,
        default=8,
        help="held-out points: requests per prefill point, and at least this many per decode one",
    )
    ap.add_argument("--rate", type=float, default=2.0, help="load: requests/s (2)")
    ap.add_argument("--isl", type=int, default=512, help="load: prompt tokens (512)")
    ap.add_argument("--osl", type=int, default=32, help="load: output tokens (32)")
    ap.add_argument("--ttft", type=float, default=500.0, help="SLA: TTFT p50 ms (500)")
    ap.add_argument("--itl", type=float, default=50.0, help="SLA: ITL p50 ms (50)")
    ap.add_argument("--requests", type=int, default=60, help="requests per fleet run (60)")
    ap.add_argument("--modes", default="kv,round-robin")
    ap.add_argument(
        "--speedup-ratio", type=float, default=None, help="of the simulation (default: auto)"
    )
    ap.add_argument("--workdir", default="", help="keep the profile etc. here (default: temp)")
    ap.add_argument("--json", default="", metavar="FILE")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    result: dict[str, Any] = {"args": vars(args)}
    with ExitStack() as stack:
        if args.workdir:
            work = Path(args.workdir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="verify-plan-")))
        engines = Engines(args, work, stack)
        say(f"starting engine A ({args.engine})")
        a = engines.start()

        profile_root = work / "profile"
        cmd = [
            "profile",
            "--candidate",
            f"tiny={a}",
            "--granularity",
            str(args.granularity),
            "--prefill-requests",
            str(args.prefill_requests),
            "--out",
            str(profile_root),
            "--quiet",
        ]
        if engines.tokenizer:
            cmd += ["--tokenizer", engines.tokenizer]
        say("kvferry " + shlex.join(cmd))
        if kvferry(cmd) != 0:
            return 1
        profile = profile_root / "tiny"
        result["profile"] = str(profile)

        say("held-out points: engine A against the mock calibrated from the profile")
        points = held_out(profile)
        n_held = args.held_out_requests
        real = [
            measure(
                a,
                engines.tokenizer,
                isl,
                osl,
                concurrency=c,
                requests=max(n_held, c),
                seed=10**6 + i,
            )
            for i, (_, isl, osl, c) in enumerate(points)
        ]
        calibrated = ["--profile", str(profile), "--block-size", str(engines.block_size)]
        with ServeProcess("mock", calibrated) as mock:
            sim = [
                measure(
                    mock.url,
                    "",
                    isl,
                    osl,
                    concurrency=c,
                    requests=max(n_held, c),
                    seed=2 * 10**6 + i,
                )
                for i, (_, isl, osl, c) in enumerate(points)
            ]
        result["held_out"] = []
        report = read_profile(profile)
        print(
            f"{'stage':8} {'ISL':>6} {'conc':>4} {'metric':9} {'engine':>9} {'interp':>9} "
            f"{'error':>7} {'mock':>9} {'error':>7}"
        )
        for (stage, isl, osl, c), r, s in zip(points, real, sim, strict=True):
            key = "ttft_p50_ms" if stage == "prefill" else "itl_p50_ms"
            guess = interpolated(report, stage, isl, osl, c)
            result["held_out"].append(
                {
                    "stage": stage,
                    "isl": isl,
                    "osl": osl,
                    "concurrency": c,
                    "engine": r,
                    "interpolated_ms": guess,
                    "mock": s,
                }
            )
            print(
                f"{stage:8} {isl:6} {c:4} {key[:8]:9} {r[key]:9.2f} {guess:9.2f} "
                f"{_pct(guess, r[key]):>7} {s[key]:9.2f} {_pct(s[key], r[key]):>7}"
            )

        sim_json = work / "simulation.json"
        cmd = [
            "plan",
            "--profile",
            str(profile),
            "--simulate",
            "--all-fleets",
            "--max-instances",
            "2",
            "--router-modes",
            ",".join(modes),
            "--request-rate",
            f"{args.rate:g}",
            "--isl",
            str(args.isl),
            "--osl",
            str(args.osl),
            "--ttft",
            f"{args.ttft:g}",
            "--itl",
            f"{args.itl:g}",
            "--sim-requests",
            str(args.requests),
            *(["--speedup-ratio", f"{args.speedup_ratio:g}"] if args.speedup_ratio else []),
            "--json",
            str(sim_json),
            "--quiet",
        ]
        say("kvferry " + shlex.join(cmd))
        if kvferry(cmd) != 0:
            return 1
        predicted = load_result(json.loads(sim_json.read_text()))
        assert isinstance(predicted, SimulationReport)
        result["simulation"] = json.loads(sim_json.read_text())

        say(f"starting engine B ({args.engine})")
        engines.start()
        result["fleets"] = []
        print(
            f"{'routing':12} {'n':>2} {'':10} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'ITL p50':>8} {'ITL p99':>8} failed"
        )
        for mode in modes:
            for n in (1, 2):
                say(f"measuring {mode} x {n} at {args.rate:g} requests/s")
                with ServeProcess(
                    "router", ["--router-mode", mode, *engines.router_flags(n)], timeout_s=120
                ) as router:
                    got = measure(
                        router.url,
                        engines.tokenizer,
                        args.isl,
                        args.osl,
                        rate=args.rate,
                        requests=args.requests,
                        seed=3 * 10**6 + 100 * n + len(result["fleets"]),
                        warmup=0,
                    )
                    got["requests_per_instance"] = [
                        int(w["requests"]) for w in router_stats(router.url)["workers"]
                    ]
                pred = next(
                    (r for r in predicted.runs if r.mode == mode and r.instances == n), None
                )
                row = {
                    "mode": mode,
                    "instances": n,
                    "measured": got,
                    "predicted": None
                    if pred is None
                    else {
                        "ttft_p50_ms": pred.ttft_p50_ms,
                        "ttft_p99_ms": pred.ttft_p99_ms,
                        "itl_p50_ms": pred.itl_p50_ms,
                        "itl_p99_ms": pred.itl_p99_ms,
                    },
                }
                result["fleets"].append(row)
                for label, v in (("predicted", row["predicted"] or {}), ("measured", got)):
                    print(
                        f"{mode:12} {n:2} {label:10} "
                        + " ".join(
                            f"{v.get(k) or float('nan'):9.1f}"
                            for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
                        )
                        + (f" {got['errors']}" if label == "measured" else "")
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        say(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
