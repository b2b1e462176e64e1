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

from kvferry.bench.doctor.report import DoctorReport
from kvferry.bench.endpoint.harness import ServeBenchReport
from kvferry.bench.hitrate import HitRateReport
from kvferry.bench.router.harness import RouterBenchReport
from kvferry.bench.store.report import StoreBenchReport
from kvferry.bench.transfer.cases import CaseResult
from kvferry.bench.transfer.report import TransferBenchReport
from kvferry.report import doctor, fmt, plan
from kvferry.report.hitrate import ceiling
from kvferry.report.inputs import LoadedResult
from kvferry.report.model import Candidate, Finding, Section
from kvferry.report.router import TTFT_RATIO
from kvferry.report.serve import level_figures
from kvferry.report.transfer import best_case, tail_ratio

__all__ = [
    "CPU_COST_RATIO",
    "CPU_S_PER_GB_HIGH",
    "DISK_FIO_FLOOR",
    "FAR_FROM_CEILING",
    "GOODPUT_FLOOR",
    "MIN_TAIL_SAMPLES",
    "NEAR_CEILING",
    "PREDICTION_GAP",
    "QUEUE_THROUGHPUT_GAIN",
    "QUEUE_TTFT_GROWTH",
    "SOCKET_FLOOR",
    "TAIL_GROWTH",
    "TAIL_RATIO",
    "findings",
    "findings_section",
    "transfer_candidate",
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

TAIL_GROWTH = 1.5
"""P99/mean at a block size's largest batch over that at its smallest batch above which the tail
grows with the batch: the deeper pipeline queues slices behind each other."""

QUEUE_TTFT_GROWTH = 3.0
"""TTFT p50 at the highest load over the lowest above which requests wait in a queue..."""

QUEUE_THROUGHPUT_GAIN = 1.25
"""...while the last step up in load raised throughput by less than this factor: the engine is
past its capacity, and more load only lengthens the queue."""

DISK_FIO_FLOOR = 0.5
"""The disk tier's timed GB/s under half of fio's on the same directory in the same run: the
tier's path costs more than the device does (a good tier reaches 0.8x and more)."""

PREDICTION_GAP = 0.1
"""The router's predicted hit rate off the workers' real one by more than 10 points: its view
of the caches is stale or wrong (missed KV events, a different block size)."""


def _ours(contender: str) -> bool:
    """A contender whose config kvferry sets (a peer engine's knobs are not kvferry's)."""
    return contender.split("+", 1)[0] == "kvferry"


def transfer_candidate(
    report: TransferBenchReport, case: CaseResult, objective: str, **overrides: str
) -> Candidate:
    """A transfer config change, measured on ``case`` against the config the run had: the
    bench's two contenders ``kvferry+KEY=VALUE`` and ``kvferry`` in alternating rounds."""
    o = report.options
    keys = tuple((f"transfer.{k}", v) for k, v in overrides.items())
    with_change = "kvferry+" + "+".join(f"{k}={v}" for k, v in keys)
    block = fmt.size(case.block_size).replace(" ", "")
    command = (
        f"kvferry bench transfer --transport {o.transport} --op {o.op} --start-block-size "
        f"{block} --max-block-size {block} --start-batch-size {case.batch_size} "
        f"--max-batch-size {case.batch_size} --max-threads {case.threads} --backend "
        f"{with_change},kvferry --rounds 3 --duration 1 --warmup 0.3"
    )
    return Candidate(
        overrides=keys,
        bench="transfer",
        objective=objective,
        params=(
            ("block_size", case.block_size),
            ("batch_size", case.batch_size),
            ("threads", case.threads),
            ("transport", o.transport),
            ("op", o.op),
            ("seg_type", o.seg_type),
        ),
        command=command,
    )


def _tries(
    report: TransferBenchReport, case: CaseResult, objective: str, *changes: dict[str, str]
) -> list[Candidate]:
    """Each change as a candidate measured on ``case``; none for a peer engine's case (its
    knobs are not kvferry's)."""
    if not _ours(case.backend):
        return []
    return [transfer_candidate(report, case, objective, **change) for change in changes]


def _tail_growth(item: LoadedResult, report: TransferBenchReport) -> Iterable[Finding]:
    """P99/mean rising with the batch at a fixed block size and thread count (kvferry only)."""
    groups: dict[tuple[str, int, int], list[CaseResult]] = {}
    for c in report.cases:
        if _ours(c.backend) and c.transfer_us.count >= MIN_TAIL_SAMPLES:
            groups.setdefault((c.backend, c.block_size, c.threads), []).append(c)
    grown = []
    for cases in groups.values():
        cases.sort(key=lambda c: c.batch_size)
        small, large = cases[0], cases[-1]
        if large.batch_size > small.batch_size and tail_ratio(large) > max(
            TAIL_GROWTH * tail_ratio(small), 2.0
        ):
            grown.append((tail_ratio(large) / tail_ratio(small), small, large))
    if not grown:
        return
    _, small, large = max(grown, key=lambda g: g[0])
    yield Finding(
        severity="warn",
        title=f"transfer tail grows with the batch ({large.backend})",
        detail=f"At {len(grown)} block size(s) the P99 per-batch time sits further above the "
        "mean as batches grow: slices of one batch queue behind each other in the pipeline.",
        evidence=f"{item.name}: {fmt.size(large.block_size)} x {large.threads} thread(s): P99/mean "
        f"{fmt.num(tail_ratio(small))} at batch {small.batch_size}, "
        f"{fmt.num(tail_ratio(large))} at batch {large.batch_size}",
        recommendation="Spread a batch over more connections (transfer.workers) or cap the "
        "slices in flight per connection (transfer.max_inflight) so one batch does not fill "
        "the pipe; measure both against the current config.",
        rule="transfer.tail_grows_with_batch",
        candidates=_tries(report, large, "p99", {"workers": "2"}, {"max_inflight": "32"}),
    )


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
                recommendation="Try another transfer.grace_period_ns (how long a worker spins "
                "for a reply before it sleeps: longer avoids a wake-up per reply, shorter "
                "leaves the core to the peer on a small machine), more transfer.workers, or a "
                "smaller transfer.slice_size so one large slice does not hold a batch; rerun "
                "with --rounds 3 to see whether the tail repeats.",
                rule="transfer.tail",
                candidates=_tries(
                    report,
                    worst,
                    "p99",
                    {"grace_period_ns": "200000"},
                    {"grace_period_ns": "10000"},
                ),
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
                rule="transfer.below_socket",
                candidates=_tries(report, top, "bw", {"slice_size": "256KiB"}, {"workers": "2"}),
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
                rule="transfer.cpu_bound",
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
                    rule="transfer.cpu_vs_peer",
                    candidates=_tries(
                        report,
                        mine[max(pairs, key=lambda p: p[0])[1].case],
                        "bw",
                        {"slice_size": "256KiB"},
                    ),
                )

    yield from _tail_growth(item, report)


def _policy_candidate(report: HitRateReport, capacity: int, policy: str) -> Candidate:
    """Another eviction policy at ``capacity`` blocks, simulated on the same trace (exact: the
    simulation gives the same count every time, so one run each decides)."""
    o = report.options
    source = f"--trace {o.trace}" if o.trace else f"--workload {o.workload}"
    current = report.cases[0].policy if report.cases else "lru"
    return Candidate(
        overrides=(("store.eviction_policy", policy),),
        bench="hitrate",
        objective="hit_rate",
        params=(
            ("trace", o.trace),
            ("workload", o.workload),
            ("block_tokens", o.block_tokens),
            ("capacity", capacity),
            ("current", current),
        ),
        command=f"kvferry bench hitrate {source} --capacity {capacity} --policy {policy},{current}",
    )


def _load_vs_recompute(item: LoadedResult, report: HitRateReport) -> Iterable[Finding]:
    """A replay whose per-block load time is above the time the engine takes to prefill the
    block's tokens (``--prefill-tokens-per-s``): every hit from those tiers costs more than
    recomputing it."""
    tps = report.prefill_tokens_per_s
    if not tps:
        return
    recompute_us = report.block_tokens / tps * 1e6
    for case in report.cases:
        load = (case.replay or {}).get("get_latency_per_block_us") or {}
        p50 = load.get("p50")
        if not isinstance(p50, int | float) or p50 <= recompute_us:
            continue
        tiers = "+".join(t.name for t in case.tiers)
        yield Finding(
            severity="warn",
            title=f"loading a block is slower than recomputing it ({tiers}, {case.policy})",
            detail="Each hit block took longer to load from the tiers than the engine takes to "
            "prefill its tokens: hits from this pipeline slow requests down.",
            evidence=f"{item.name}: per-block load p50 {fmt.num(p50)} us; recompute "
            f"{report.block_tokens} tokens at {fmt.num(tps)} tokens/s = "
            f"{fmt.num(recompute_us)} us",
            recommendation="Load only from tiers faster than the engine's prefill (a cpu tier "
            "in front, a faster disk or network), or let the connector skip hits whose load "
            "would take longer than recomputing them.",
            rule="hitrate.load_slower_than_recompute",
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
                rule="hitrate.near_ceiling",
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
                rule="hitrate.capacity_bound",
                candidates=[
                    _policy_candidate(report, largest.capacity_blocks or 0, other)
                    for other in ("lfu", "length-aware")
                    if other != policy and report.options.tiers is None
                ],
            )
    yield from _load_vs_recompute(item, report)
    for a in report.advice:
        if not a.reachable:
            yield Finding(
                severity="warn",
                title=f"hit-rate target out of reach ({a.policy})",
                detail=f"No capacity reaches a block hit rate of {fmt.pct(a.target)}: an "
                f"infinite cache gets {fmt.pct(a.block_hit_rate)}.",
                evidence=f"{item.name}: advice for {a.policy}, target {fmt.pct(a.target)}",
                recommendation="Lower the target to what the trace's reuse allows.",
                rule="hitrate.target_unreachable",
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
            rule="serve.errors",
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
            rule="serve.goodput",
        )
    yield from _queueing(item, report)


def _queueing(item: LoadedResult, report: ServeBenchReport) -> Iterable[Finding]:
    """TTFT growing with load while throughput has stopped growing: requests queue."""
    levels = [(c.level.label, level_figures(c)) for c in report.cases]
    known = [(lv, f) for lv, f in levels if f.ttft_p50 and f.tokens_per_s]
    if len(known) < 3:
        return
    (first, f0), (prev, f1), (last, f2) = known[0], known[-2], known[-1]
    assert f0.ttft_p50 and f2.ttft_p50 and f1.tokens_per_s and f2.tokens_per_s
    growth = f2.ttft_p50 / f0.ttft_p50
    gain = f2.tokens_per_s / f1.tokens_per_s
    if growth <= QUEUE_TTFT_GROWTH or gain >= QUEUE_THROUGHPUT_GAIN:
        return
    yield Finding(
        severity="warn",
        title="TTFT is queueing: the endpoint is past its capacity",
        detail=f"TTFT p50 grew {fmt.ratio(growth)} from the lightest load to the heaviest while "
        f"the last step up in load added only {fmt.pct(gain - 1)} throughput: new requests "
        "wait for a slot (KV blocks or batch seats) rather than for compute.",
        evidence=f"{item.name}: {first}: TTFT p50 {fmt.num(f0.ttft_p50)} ms; {prev}: "
        f"{fmt.num(f1.tokens_per_s)} tokens/s; {last}: TTFT p50 {fmt.num(f2.ttft_p50)} ms, "
        f"{fmt.num(f2.tokens_per_s)} tokens/s",
        recommendation=f"Cap the load near {prev} (admission control or the router's queue), "
        "or add replicas; a larger KV cache (--num-blocks, gpu-memory-utilization) helps only "
        "when the engine reports preemptions.",
        rule="serve.queueing",
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
            rule="router.kv_not_better",
        )
    elif kv:
        yield Finding(
            severity="good",
            title="kv routing beats round-robin on TTFT at every load",
            detail="kv routing's TTFT p50 is below round-robin's at each load measured.",
            evidence=f"{item.name}: "
            + "; ".join(f"load {r.case}: {fmt.ratio(r.value)}" for r in kv),
            rule="router.kv_better",
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
            rule="router.prediction_gap",
        )


def _store_candidate(
    report: StoreBenchReport, overrides: dict[str, str], objective: str = "no_space"
) -> Candidate:
    """A store config change (dotted keys), measured by the same store bench against the run's
    config."""
    o = report.options
    keys = tuple(overrides.items())
    knobs = " ".join(f"--knob {k}={v}" for k, v in keys)
    return Candidate(
        overrides=keys,
        bench="store",
        objective=objective,
        params=(("backend", o.backend), ("op", o.op)),
        # the same alternating pairs, from the command line
        command=f"kvferry tune store --backend {o.backend} --op {o.op} --value-size "
        f"{o.value_size} --batch-size {o.batch} --num-keys {o.num_keys} {knobs}",
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
            rule="store.failed",
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
            "let an eviction round free more (store.evict_ratio) or start earlier "
            "(store.evict_start_threshold), so puts find room.",
            rule="store.no_space",
            candidates=[
                _store_candidate(report, {"store.evict_ratio": "0.2"}),
                _store_candidate(report, {"store.evict_start_threshold": "0.7"}),
            ],
        )
    yield from _disk_vs_fio(item, report)


def _disk_vs_fio(item: LoadedResult, report: StoreBenchReport) -> Iterable[Finding]:
    """The disk tier's timed phase far below fio on the same directory in the same run."""
    fio = next((r for r in report.references if r.name.startswith("fio_")), None)
    timed = [p for p in report.phases if p.phase not in ("fill", "verify")]
    if report.options.backend != "disk" or fio is None or not timed or fio.value <= 0:
        return
    share = timed[0].gbps / fio.value
    if share >= DISK_FIO_FLOOR:
        return
    yield Finding(
        severity="warn",
        title="the disk tier is far below fio on the same disk",
        detail=f"The timed phase moves {fmt.pct(share)} of what fio moved on the tier's "
        "directory in the same run (same block size, direction, jobs and direct I/O): the "
        "tier's own path, not the device, limits it.",
        evidence=f"{item.name}: {timed[0].phase} {fmt.num(timed[0].gbps)} GB/s; {fio.name} "
        f"{fmt.num(fio.value)} GB/s (iodepth {fio.detail.get('iodepth')}, jobs "
        f"{fio.detail.get('numjobs')})",
        recommendation="More disk I/O threads keep more requests in flight (disk.io_threads); "
        "more slot files spread the writers (disk.files); measure each here.",
        rule="store.disk_below_fio",
        candidates=[
            _store_candidate(report, {"disk.io_threads": "8"}, "ops"),
            _store_candidate(report, {"disk.io_threads": "16"}, "ops"),
            _store_candidate(report, {"disk.files": "4"}, "ops"),
        ],
    )


RULES: dict[str, Callable[[LoadedResult], Iterable[Finding]]] = {
    "doctor": doctor.findings,
    "transfer": _transfer,
    "store": _store,
    "hitrate": _hitrate,
    "serve": _serve,
    "router": _router,
    "plan": plan.findings,
}
"""The rules of each tool; a tool without rules gives no finding."""

_ORDER = {"bad": 0, "warn": 1, "info": 2, "good": 3}


SMALL_BLOCK = 16 << 10
"""Blocks up to this size at batch 1 are a lone request's round trip: a wake-up per reply is a
large share of it, so the grace period decides their rate."""


def _grace_vs_wakeup(items: Sequence[LoadedResult]) -> Iterable[Finding]:
    """A doctor's measured wake-up suggests another grace period than a transfer run used:
    measure that grace period on the run's small-block, batch-1 case."""
    doctors = [i.result for i in items if isinstance(i.result, DoctorReport)]
    suggested = next((d.measurements.get("suggested_grace_period_ns") for d in doctors), None)
    if not suggested:
        return
    wakeup = doctors[0].measurements.get("wakeup_p50_us", 0.0)
    grace = int(suggested)
    for item in items:
        report = item.result
        if not isinstance(report, TransferBenchReport) or report.config is None:
            continue
        used = report.config.values.get("transfer.grace_period_ns")
        small = [
            c
            for c in report.cases
            if _ours(c.backend) and c.block_size <= SMALL_BLOCK and c.batch_size == 1
        ]
        if not small or not isinstance(used, int) or not (used / 2 > grace or used * 2 < grace):
            continue
        case = min(small, key=lambda c: c.block_size)
        yield Finding(
            severity="info",
            title="the grace period is far from this machine's wake-up cost",
            detail=f"The transfer run busy-polled {used:,} ns for a reply before sleeping; the "
            f"doctor measured a wake-up that suggests {grace:,} ns. A lone small request waits "
            "on that choice every round trip.",
            evidence=f"{item.name}: {fmt.size(case.block_size)} x 1 x {case.threads}: "
            f"{fmt.num(case.bw_gbps)} GB/s, P99 {fmt.num(case.transfer_us.p99)} us; doctor "
            f"wake-up p50 {fmt.num(wakeup)} us",
            recommendation="Measure the suggested grace period on the small-block case before "
            "setting it: on a busy machine a shorter spin can also leave the core to the peer.",
            rule="transfer.grace_vs_wakeup",
            source=str(item.path),
            candidates=[transfer_candidate(report, case, "bw", grace_period_ns=str(grace))],
        )


def findings(items: Sequence[LoadedResult]) -> list[Finding]:
    """Every rule's findings over ``items`` (rules over one result, then rules across results),
    the worst first (stable within a severity)."""
    out = []
    for item in items:
        for f in RULES[item.result.tool](item) if item.result.tool in RULES else ():
            f.source = f.source or str(item.path)
            out.append(f)
    out += list(_grace_vs_wakeup(items))
    return sorted(out, key=lambda f: _ORDER[f.severity])


def findings_section(found: Sequence[Finding]) -> Section:
    intro = (
        "Rules over the results above, each with the row it follows from. Thresholds: P99/mean "
        f"> {fmt.num(TAIL_RATIO)} or mean > P99 (cases of {MIN_TAIL_SAMPLES}+ batches), or growing "
        f"{fmt.num(TAIL_GROWTH)}x from the smallest batch to the largest; peak BW < "
        f"{fmt.pct(SOCKET_FLOOR, 0)} of the same-run socket stream (batches of at least its "
        "message size); CPU per GB > "
        f"{fmt.num(CPU_COST_RATIO)}x another contender's, or > {fmt.num(CPU_S_PER_GB_HIGH)} s/GB "
        f"alone; hit rate >= {fmt.pct(NEAR_CEILING, 0)} or < {fmt.pct(FAR_FROM_CEILING, 0)} of "
        f"the reuse ceiling; a replay's per-block load slower than prefilling the block; disk "
        f"tier < {fmt.pct(DISK_FIO_FLOOR, 0)} of fio on its directory; refused puts; goodput < "
        f"{fmt.pct(GOODPUT_FLOOR, 0)} of throughput; TTFT p50 up "
        f"{fmt.num(QUEUE_TTFT_GROWTH)}x across the loads while the last step adds < "
        f"{fmt.pct(QUEUE_THROUGHPUT_GAIN - 1, 0)} throughput; kv routing's TTFT not below "
        "round-robin's; an SLA no simulated fleet (or no profiled candidate) met; every doctor "
        "check that warned or failed. A config change a rule "
        "suggests is listed with the command that measures it; kvferry advise --verify "
        "measures it and keeps only what helped."
    )
    if not found:
        intro += " No rule fired on these results."
    return Section(
        title="Bottlenecks and recommendations",
        anchor="findings",
        intro=intro,
        findings=list(found),
    )
