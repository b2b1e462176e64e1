"""Bottlenecks and recommendations: a handful of rules that follow from the data in results.

Each rule reads one kind of result and returns :class:`~kvferry.report.model.Finding` objects,
each with the evidence it follows from (run, case, values) and what to try. A rule whose inputs
a result does not hold (no reference measured, no goodput SLOs, no distinct-block count) says
nothing: no finding is made up. The thresholds are named constants below, each with the reason
for its value. The advisor issue extends these rules; keep each one small and its evidence
exact.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence

from kvferry.bench.endpoint.harness import ServeBenchReport
from kvferry.bench.hitrate import HitRateReport
from kvferry.bench.router.harness import RouterBenchReport
from kvferry.bench.store.report import StoreBenchReport
from kvferry.bench.transfer.report import TransferBenchReport
from kvferry.report import doctor, fmt
from kvferry.report.hitrate import ceiling
from kvferry.report.inputs import LoadedResult
from kvferry.report.model import Finding, Section
from kvferry.report.router import TTFT_RATIO
from kvferry.report.serve import level_figures
from kvferry.report.transfer import best_case, tail_ratio

__all__ = [
    "CPU_COST_RATIO",
    "CPU_S_PER_GB_HIGH",
    "FAR_FROM_CEILING",
    "GOODPUT_FLOOR",
    "MIN_TAIL_SAMPLES",
    "NEAR_CEILING",
    "PREDICTION_GAP",
    "SOCKET_FLOOR",
    "TAIL_RATIO",
    "findings",
    "findings_section",
]

TAIL_RATIO = 4.0
"""Transfer P99 over mean per-batch time above which the tail is its own problem: in a steady
pipeline per-batch times cluster around the mean (P99 within about 2x); at 4x the slowest
batches wait on something other than moving bytes (a worker asleep, scheduling, a retry)."""

MIN_TAIL_SAMPLES = 200
"""Batches a case needs before its P99 is read: with fewer, the P99 is one or two samples, in
effect the maximum."""

SOCKET_FLOOR = 0.5
"""Best BW (of the cases whose batches are at least the stream's message size) below this
fraction of the same-run loopback socket stream: the engine moves less than half of what a
plain Python socket moves on the same machine, so its own overhead, not the wire, limits it."""

CPU_COST_RATIO = 1.5
"""A contender spending this many times another's CPU seconds per GB (median over the cases
both ran): beyond run-to-run noise of CPU accounting (about 10-20%) by a wide margin."""

CPU_S_PER_GB_HIGH = 1.0
"""Initiator CPU seconds per GB at the peak case above which one core caps the transfer at
1 / that GB/s: at 1 s/GB a core moves at most 1 GB/s, below the loopback wire of any recent
machine."""

NEAR_CEILING = 0.95
"""A hit rate at 95% of the trace's reuse ceiling: more capacity can add at most 5% of it."""

FAR_FROM_CEILING = 0.5
"""A largest capacity reaching under half the ceiling: the cache, not the workload's reuse,
limits the hit rate."""

GOODPUT_FLOOR = 0.9
"""Goodput under 90% of the request throughput: more than one request in ten misses an SLO."""

PREDICTION_GAP = 0.1
"""The router's predicted hit rate off the workers' real one by more than 10 points: its view
of the caches is stale or wrong (missed KV events, a different block size)."""


def _transfer(item: LoadedResult) -> Iterable[Finding]:
    report = item.result
    assert isinstance(report, TransferBenchReport)
    contenders = list(dict.fromkeys(c.backend for c in report.cases))
    for contender in contenders:
        cases = [c for c in report.cases if c.backend == contender]
        tails = [
            (tail_ratio(c), c)
            for c in cases
            if c.transfer_us.count >= MIN_TAIL_SAMPLES and tail_ratio(c) > TAIL_RATIO
        ]
        # the mean above the P99: under 1% of the batches are slow enough to set the mean
        extreme = [
            c
            for c in cases
            if c.transfer_us.count >= MIN_TAIL_SAMPLES and c.transfer_us.avg > c.transfer_us.p99
        ]
        if tails or extreme:
            if tails:
                worst = max(tails, key=lambda t: t[0])[1]
            else:
                worst = max(extreme, key=lambda c: c.transfer_us.avg / max(c.transfer_us.p99, 1e-9))
            t = worst.transfer_us
            parts = []
            if tails:
                parts.append(
                    f"{len(tails)} of {len(cases)} cases have a P99 per-batch time above "
                    f"{fmt.num(TAIL_RATIO)}x their mean"
                )
            if extreme:
                parts.append(
                    f"in {len(extreme)} the mean is above the P99 itself: under 1% of "
                    "the batches take long enough to set the mean"
                )
            yield Finding(
                severity="warn",
                title=f"transfer tail latency ({contender})",
                detail="; ".join(parts) + ". The slowest batches wait on something other than "
                "moving bytes.",
                evidence=f"{item.name}, case {fmt.size(worst.block_size)} x {worst.batch_size} x "
                f"{worst.threads} ({contender}): mean {fmt.num(t.avg)} us, P50 {fmt.num(t.p50)} "
                f"us, P99 {fmt.num(t.p99)} us, P99.9 {fmt.num(t.p999)} us over {t.count:,} "
                "batches",
                recommendation="Try a shorter transfer.grace_period_ns (how long a worker spins "
                "for more work before it sleeps), more transfer.workers, or a smaller "
                "transfer.slice_size so one large slice does not hold a batch; rerun with "
                "--rounds 3 to see whether the tail repeats.",
            )
    socket = next((r for r in report.references if r.name.startswith("socket_stream")), None)
    message = int(socket.detail.get("message_size") or 0) if socket is not None else 0
    for contender in contenders:
        best = best_case(report, contender)
        if best is None:
            continue
        # like for like: batches at least as large as the stream's messages (a 4 KiB batch
        # against a 1 MiB stream says only that small transfers cost more per byte)
        big = [
            c
            for c in report.cases
            if c.backend == contender and c.block_size * c.batch_size >= message
        ]
        top = max(big, key=lambda c: c.bw_gbps) if big else None
        if (
            socket is not None
            and top is not None
            and message
            and top.bw_gbps < SOCKET_FLOOR * socket.value
        ):
            yield Finding(
                severity="warn",
                title=f"transfer bandwidth far below the same-run socket stream ({contender})",
                detail=f"With batches of at least the stream's {fmt.size(message)} messages, the "
                f"best case moves {fmt.pct(top.bw_gbps / socket.value)} of what a plain Python "
                "socket stream moved over loopback in the same run.",
                evidence=f"{item.name}: case {fmt.size(top.block_size)} x {top.batch_size} x "
                f"{top.threads} at {fmt.num(top.bw_gbps)} GB/s; {socket.name} "
                f"{fmt.num(socket.value)} GB/s",
                recommendation="Per-batch overhead dominates: try more threads or "
                "transfer.workers, a larger transfer.slice_size, and check the transport (shm "
                "on one host).",
            )
        if len(contenders) == 1 and best.cpu_s_per_gb > CPU_S_PER_GB_HIGH:
            yield Finding(
                severity="info",
                title=f"transfer CPU cost: one core caps the transfer ({contender})",
                detail=f"At {fmt.num(best.cpu_s_per_gb)} CPU seconds per GB, one initiator core "
                f"moves at most {fmt.num(1 / best.cpu_s_per_gb)} GB/s.",
                evidence=f"{item.name}: case {fmt.size(best.block_size)} x {best.batch_size} x "
                f"{best.threads}: {fmt.num(best.initiator_cpu_s)} CPU s for "
                f"{fmt.num(best.bytes / 1e9)} GB",
                recommendation="Larger blocks and batches spread the per-call cost; compare "
                "with Mooncake in the same run (--backend kvferry,mooncake) to see the "
                "engine's share.",
            )
    if len(contenders) >= 2:
        first, *others = contenders
        for other in others:
            mine = {c.case: c for c in report.cases if c.backend == first}
            pairs = [
                (mine[c.case].cpu_s_per_gb / c.cpu_s_per_gb, c)
                for c in report.cases
                if c.backend == other and c.case in mine and c.cpu_s_per_gb > 0
            ]
            if not pairs:
                continue
            median = statistics.median(p[0] for p in pairs)
            if median > CPU_COST_RATIO:
                yield Finding(
                    severity="warn",
                    title=f"transfer CPU cost: {first} spends {fmt.ratio(median)} {other}'s "
                    "CPU per GB",
                    detail="Initiator CPU seconds per GB moved, median over the cases both "
                    "contenders ran in the same run.",
                    evidence=f"{item.name}: {len(pairs)} cases; "
                    + "; ".join(
                        f"{c.case.label}: {fmt.num(mine[c.case].cpu_s_per_gb)} vs "
                        f"{fmt.num(c.cpu_s_per_gb)} s/GB"
                        for _, c in pairs[:3]
                    ),
                    recommendation="Profile the initiator (kvferry's slice and completion "
                    "path); fewer, larger slices (transfer.slice_size) cut per-slice work.",
                )


def _hitrate(item: LoadedResult) -> Iterable[Finding]:
    report = item.result
    assert isinstance(report, HitRateReport)
    top = ceiling(report)
    policies = list(dict.fromkeys(r.policy for r in report.cases))
    for policy in policies:
        distinct = report.distinct_blocks or 0
        # below the trace's distinct blocks: at or above it nothing is evicted, the ceiling
        sized = [
            r
            for r in report.cases
            if r.policy == policy and r.capacity_blocks is not None and r.capacity_blocks < distinct
        ]
        if top is None or not sized or top.value <= 0:
            continue
        largest = max(sized, key=lambda r: r.capacity_blocks or 0)
        share = largest.block_hit_rate / top.value
        evidence = (
            f"{item.name}, {policy} at {largest.capacity_blocks:,} blocks: block hit rate "
            f"{fmt.pct(largest.block_hit_rate)} (per-request mean "
            f"{fmt.pct(largest.request_mean_hit_rate)}); reuse ceiling {top.text}"
        )
        if share >= NEAR_CEILING:
            yield Finding(
                severity="info",
                title=f"hit rate near the trace's ceiling ({policy})",
                detail=f"The largest capacity reaches {fmt.pct(share)} of the best hit rate this "
                "trace allows; more capacity buys little.",
                evidence=evidence,
                recommendation="Size the cache at the smallest capacity near the ceiling "
                "(--target-hit-rate finds it); a higher hit rate needs more reuse in the "
                "workload (longer shared prefixes, a router that keeps prefixes together).",
            )
        elif share < FAR_FROM_CEILING:
            yield Finding(
                severity="warn",
                title=f"hit rate limited by capacity ({policy})",
                detail=f"The largest capacity measured reaches {fmt.pct(share)} of the trace's "
                "ceiling: the cache, not the workload's reuse, limits the hit rate.",
                evidence=evidence,
                recommendation="Add capacity (a disk tier behind the CPU tier: --tiers "
                "cpu:N,disk) or try a policy that keeps shared prefixes (length-aware, lfu).",
            )
    for a in report.advice:
        if not a.reachable:
            yield Finding(
                severity="warn",
                title=f"hit-rate target out of reach ({a.policy})",
                detail=f"No capacity reaches a block hit rate of {fmt.pct(a.target)}: an "
                f"infinite cache gets {fmt.pct(a.block_hit_rate)}.",
                evidence=f"{item.name}: advice for {a.policy}, target {fmt.pct(a.target)}",
                recommendation="Lower the target to what the trace's reuse allows.",
            )


def _serve(item: LoadedResult) -> Iterable[Finding]:
    report = item.result
    assert isinstance(report, ServeBenchReport)
    errors = [(c.level.label, c.metrics.error_count) for c in report.cases if c.metrics.error_count]
    if errors:
        yield Finding(
            severity="bad",
            title="requests failed",
            detail=f"{sum(n for _, n in errors):,} requests ended in an error; their latencies "
            "are not in the percentiles.",
            evidence=f"{item.name}: " + "; ".join(f"{lv}: {n:,} errors" for lv, n in errors),
            recommendation="Read the error summary in the run's profile_export_aiperf.json; "
            "timeouts under load mean the server is past its capacity.",
        )
    short = []
    for c in report.cases:
        f = level_figures(c)
        if (
            f.goodput is not None
            and f.requests_per_s
            and f.goodput < GOODPUT_FLOOR * f.requests_per_s
        ):
            short.append((c.level.label, f.goodput, f.requests_per_s))
    if short:
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in report.options.goodput.items())
        yield Finding(
            severity="warn",
            title="goodput below throughput: requests miss the SLOs",
            detail=f"At {len(short)} of {len(report.cases)} levels fewer than "
            f"{fmt.pct(GOODPUT_FLOOR, 0)} of the requests "
            f"served meet every SLO ({slos}).",
            evidence=f"{item.name}: "
            + "; ".join(
                f"{lv}: goodput {fmt.num(g)} of {fmt.num(t)} requests/s" for lv, g, t in short
            ),
            recommendation="Run at the highest level where goodput still equals throughput, "
            "or add capacity (workers, a router) before raising the load.",
        )


def _router(item: LoadedResult) -> Iterable[Finding]:
    report = item.result
    assert isinstance(report, RouterBenchReport)
    kv = [r for r in report.ratios if r.subject == "kv" and r.metric == TTFT_RATIO]
    worse = [r for r in kv if r.value >= 1.0]
    if worse:
        yield Finding(
            severity="warn",
            title="kv routing does not beat round-robin on TTFT",
            detail=f"At {len(worse)} of {len(kv)} loads kv routing's TTFT p50 is not below "
            "round-robin's.",
            evidence=f"{item.name}: "
            + "; ".join(
                f"load {r.case}: kv / round-robin TTFT p50 {fmt.ratio(r.value)}" for r in worse
            ),
            recommendation="Compare the hit rates per load: a load with little prefix reuse, "
            "or one light enough that queues stay empty, gives kv routing nothing to win; "
            "otherwise raise router.prefill_weight or lower router.temperature so the router "
            "weighs cached prefixes more against load.",
        )
    elif kv:
        yield Finding(
            severity="good",
            title="kv routing beats round-robin on TTFT at every load",
            detail="kv routing's TTFT p50 is below round-robin's at each load measured.",
            evidence=f"{item.name}: "
            + "; ".join(f"load {r.case}: {fmt.ratio(r.value)}" for r in kv),
        )
    gaps = [
        c
        for c in report.cases
        if c.policy == "kv" and abs(c.predicted_hit_rate - c.hit_rate) > PREDICTION_GAP
    ]
    if gaps:
        yield Finding(
            severity="info",
            title="the router's predicted hit rate is off the workers' real one",
            detail=f"By more than {fmt.pct(PREDICTION_GAP, 0)} points at {len(gaps)} load(s).",
            evidence=f"{item.name}: "
            + "; ".join(
                f"load {c.label}: predicted {fmt.pct(c.predicted_hit_rate)}, workers "
                f"{fmt.pct(c.hit_rate)}"
                for c in gaps
            ),
            recommendation="Check that the router sees every worker's KV events and uses the "
            "workers' block size; preemptions also cause hits it never predicts.",
        )


def _store(item: LoadedResult) -> Iterable[Finding]:
    report = item.result
    assert isinstance(report, StoreBenchReport)
    for failure in report.failures:
        yield Finding(
            severity="bad",
            title="store bench failed its checks",
            detail=failure,
            evidence=f"{item.name}: backend {report.options.backend}",
            recommendation="A mismatched byte is a correctness bug: rerun with --verify and "
            "the same --seed to reproduce it.",
        )
    refused = report.store.get("no_space", 0)
    if refused:
        yield Finding(
            severity="warn",
            title="the store refused puts (NO_SPACE)",
            detail=f"{refused:,} puts were refused: those keys were never stored and read as "
            "misses.",
            evidence=f"{item.name}: store counter no_space = {refused:,}",
            recommendation="Give the store more capacity than --num-keys x --value-size, or "
            "lower the eviction start threshold so it makes room before it is full.",
        )


RULES: dict[str, Callable[[LoadedResult], Iterable[Finding]]] = {
    "doctor": doctor.findings,
    "transfer": _transfer,
    "store": _store,
    "hitrate": _hitrate,
    "serve": _serve,
    "router": _router,
}
"""The rules of each tool; a tool without rules gives no finding."""

_ORDER = {"bad": 0, "warn": 1, "info": 2, "good": 3}


def findings(items: Sequence[LoadedResult]) -> list[Finding]:
    """Every rule's findings over ``items``, the worst first (stable within a severity)."""
    out = [f for item in items if item.result.tool in RULES for f in RULES[item.result.tool](item)]
    return sorted(out, key=lambda f: _ORDER[f.severity])


def findings_section(found: Sequence[Finding]) -> Section:
    intro = (
        "Rules over the results above, each with the row it follows from. Thresholds: P99/mean "
        f"> {fmt.num(TAIL_RATIO)} or mean > P99 (cases of {MIN_TAIL_SAMPLES}+ batches); peak BW < "
        f"{fmt.pct(SOCKET_FLOOR, 0)} of the same-run socket stream (batches of at least its "
        "message size); CPU per GB > "
        f"{fmt.num(CPU_COST_RATIO)}x another contender's, or > {fmt.num(CPU_S_PER_GB_HIGH)} s/GB "
        f"alone; hit rate >= {fmt.pct(NEAR_CEILING, 0)} or < {fmt.pct(FAR_FROM_CEILING, 0)} of "
        f"the reuse ceiling; goodput < {fmt.pct(GOODPUT_FLOOR, 0)} of throughput; kv routing's "
        "TTFT not below round-robin's; every doctor check that warned or failed."
    )
    if not found:
        intro += " No rule fired on these results."
    return Section(
        title="Bottlenecks and recommendations",
        anchor="findings",
        intro=intro,
        findings=list(found),
    )
