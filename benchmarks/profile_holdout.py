"""Held-out check of a ``kvferry profile``: interpolated TTFT and ITL against measured ones at
points the profile did not measure (so not used for its fit or surface).

    kvferry profile --url URL --out DIR
    .venv/bin/python benchmarks/profile_holdout.py --url URL --profile DIR \
        [--isl 5000,15000,25000] [--decode 3000x4,9000x8,20000x2]

Each held-out point is measured as the profiler measures its points (the endpoint bench, one
worker, the profile's OSLs, 3 requests at concurrency 1 for prefill, max(2, C) at concurrency C
for decode, a fresh prompt seed), and compared with the profile's linear TTFT(ISL) and its
decode surface at (KV usage, ISL + OSL/2); a point in the profile's own grid is refused.
"""

from __future__ import annotations

import argparse

import numpy as np

from kvferry.bench.endpoint import harness as endpoint
from kvferry.bench.profile.fit import interp_1d, interp_at
from kvferry.bench.profile.npz import read_profile


def measure(url: str, isl: int, osl: int, concurrency: int, requests: int, seed: int):  # type: ignore[no-untyped-def]
    options = endpoint.ServeBenchOptions(
        url=url, concurrency=(concurrency,), request_count=requests, warmup_requests=1,
        isl=isl, osl=osl, seed=seed, workers=1,
    )  # fmt: skip
    return endpoint.run(options).cases[0].metrics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--isl", default="5000,15000,25000")
    ap.add_argument("--decode", default="3000x4,9000x8,20000x2")
    args = ap.parse_args()
    r = read_profile(args.profile)
    seed = 10**6
    print("stage    point            measured ms  interpolated ms  error")
    for isl in (int(v) for v in args.isl.split(",") if v):
        if isl in {p.isl for p in r.prefill}:
            raise SystemExit(f"ISL {isl} is in the profile: not held out")
        seed += 1
        m = measure(args.url, isl, r.options.prefill_osl, 1, 3, seed)
        got = m.value("time_to_first_token", "avg") or float("nan")
        est = interp_1d([p.isl for p in r.prefill], [p.ttft_avg_ms for p in r.prefill], isl)
        print(f"prefill  isl {isl:<11} {got:11.2f}  {est:15.2f}  {100 * (est - got) / got:+.1f}%")
    osl = r.options.decode_osl
    xs = [p.kv_usage for p in r.decode]
    ys = [p.context_length for p in r.decode]
    zs = [p.itl_avg_ms for p in r.decode]
    for spec in (s for s in args.decode.split(",") if s):
        isl, conc = (int(v) for v in spec.split("x"))
        if (isl, conc) in {(p.isl, p.concurrency) for p in r.decode}:
            raise SystemExit(f"{spec} is in the profile: not held out")
        seed += 1
        m = measure(args.url, isl, osl, conc, max(2, conc), seed)
        got = m.value("inter_token_latency", "avg") or float("nan")
        x = (isl + osl / 2) * conc / r.max_kv_tokens
        est = float(interp_at(xs, ys, zs, np.array([x]), np.array([isl + osl / 2]))[0, 0])
        print(f"decode   {spec:<15} {got:11.3f}  {est:15.3f}  {100 * (est - got) / got:+.1f}%")


if __name__ == "__main__":
    main()
