"""kvferry advise (issue 24, part 3): rules with known answers on recorded results changed by
known amounts, the verdict rule on known ratios, and real measurements of suggested changes:
a transfer change in alternating rounds, a store change that cannot help (dropped, never kept),
an eviction policy by exact simulation checked against an independent simulation; the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from kvferry.bench.doctor.report import DoctorReport
from kvferry.bench.endpoint.aggregate import MetricResult
from kvferry.bench.hitrate import HitRateOptions
from kvferry.bench.hitrate import run as run_hitrate
from kvferry.bench.result import BenchResult, load_result
from kvferry.bench.store import StoreBenchOptions
from kvferry.bench.store import run as run_store
from kvferry.bench.transfer import TransferBenchOptions
from kvferry.bench.transfer import run as run_transfer
from kvferry.cli.main import main
from kvferry.config.loader import load_config
from kvferry.report.advise import DROPPED, KEPT, advise, decide, verify
from kvferry.report.findings import findings, transfer_candidate
from kvferry.report.inputs import LoadedResult
from kvferry.report.model import Candidate, Finding
from kvferry.report.serve import TOK_TPUT, TTFT

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def item(result: BenchResult, name: str = "r.json") -> LoadedResult:
    return LoadedResult(path=Path(name), name=name, result=result)


def rules(result: BenchResult) -> dict[str, Finding]:
    return {f.rule: f for f in findings([item(result)])}


CANDIDATE = Candidate(overrides=(("transfer.workers", "2"),), bench="transfer", objective="bw")


@pytest.mark.parametrize(
    ("ratios", "higher", "verdict"),
    [
        ([1.10, 1.08, 1.12], True, KEPT),  # every round better, median +10%
        ([1.10, 0.98, 1.12], True, DROPPED),  # one round worse: not a winner
        ([1.02, 1.03, 1.01], True, DROPPED),  # every round better but within 5%
        ([0.80, 0.85, 0.90], True, DROPPED),  # worse
        ([0.80, 0.85, 0.90], False, KEPT),  # lower is better: every round lower
        ([0.80, 1.01, 0.90], False, DROPPED),
    ],
)
def test_a_change_is_kept_only_when_every_round_helped(
    ratios: list[float], higher: bool, verdict: str
) -> None:
    measured = decide(CANDIDATE, ratios, higher)
    assert measured.verdict == verdict, measured.reason
    assert measured.rounds == ratios and measured.reason


def transfer_with_batches() -> Any:
    result = load_result(RESULTS / "issue22_make_run" / "transfer.json")
    assert {c.batch_size for c in result.cases} == {1, 2, 4}
    return result


def set_tail(case: Any, ratio: float) -> None:
    t = case.transfer_us
    case.transfer_us = dataclasses.replace(t, p99=t.avg * ratio, count=max(t.count, 1000))


def test_a_tail_that_grows_with_the_batch_suggests_workers_and_inflight() -> None:
    result = copy.deepcopy(transfer_with_batches())
    for c in result.cases:
        set_tail(c, 1.5)
    assert "transfer.tail_grows_with_batch" not in rules(result)
    big = next(
        c
        for c in result.cases
        if c.backend == "kvferry" and c.block_size == 256 << 10 and c.batch_size == 4
    )
    set_tail(big, 3.5)  # 1.5 at batch 1, 3.5 at batch 4: past both thresholds
    found = rules(result)["transfer.tail_grows_with_batch"]
    assert "256 KiB" in found.evidence and "batch 4" in found.evidence
    labels = [c.label for c in found.candidates]
    assert labels == ["transfer.workers=2", "transfer.max_inflight=32"]
    for c in found.candidates:
        assert dict(c.params)["block_size"] == 256 << 10 and dict(c.params)["batch_size"] == 4
        assert "--backend kvferry+transfer." in c.command and ",kvferry " in c.command


def test_a_peer_engines_findings_suggest_no_kvferry_knob() -> None:
    result = copy.deepcopy(transfer_with_batches())
    for c in result.cases:
        set_tail(c, 1.5 if c.backend == "kvferry" else 9.0)
    tails = [f for f in findings([item(result)]) if f.rule == "transfer.tail"]
    assert [f.title for f in tails] == ["transfer tail latency (mooncake)"]
    assert tails[0].candidates == []


def scale_level(case: Any, ttft: float, tokens: float) -> None:
    m = case.metrics.metrics
    t = m[TTFT]
    scaled = tuple(None if p is None else p * ttft for p in t.percentiles)
    m[TTFT] = dataclasses.replace(t, percentiles=scaled)
    tok = m[TOK_TPUT]
    m[TOK_TPUT] = MetricResult(tok.tag, tok.header, tok.unit, (tok.avg or 0) * tokens)


def test_ttft_growing_while_throughput_stalls_is_queueing() -> None:
    result = copy.deepcopy(load_result(RESULTS / "serve_vs_aiperf.json"))
    assert len(result.cases) == 3
    assert "serve.queueing" not in rules(result)  # three equal levels
    scale_level(result.cases[1], 2.0, 2.0)
    scale_level(result.cases[2], 4.0, 2.2)  # TTFT x4, last step +10% throughput
    found = rules(result)["serve.queueing"]
    assert "4.00x" in found.detail and "10.0%" in found.detail
    scale_level(result.cases[2], 1.0, 1.5)  # the last step now adds 50%: not queueing
    assert "serve.queueing" not in rules(result)


@pytest.mark.slow
def test_a_transfer_change_is_measured_in_alternating_rounds(tmp_path: Path) -> None:
    options = TransferBenchOptions(
        transport="tcp",
        start_block_size=64 << 10,
        max_block_size=64 << 10,
        start_batch_size=4,
        max_batch_size=4,
        total_buffer_size=16 << 20,
        duration=0.2,
        warmup=0.05,
    )
    result = run_transfer(options)
    case = result.cases[0]
    candidate = transfer_candidate(result, case, "bw", slice_size="16KiB")
    measured = verify(candidate, result, rounds=2, duration=0.2)
    assert measured.verdict in (KEPT, DROPPED), measured.reason
    assert len(measured.rounds) == 2 and measured.ratio is not None
    if measured.verdict == KEPT:  # never a change that lost a round
        assert min(measured.rounds) > 1.0


@pytest.mark.slow
def test_a_store_change_that_cannot_help_is_dropped() -> None:
    result = copy.deepcopy(load_result(RESULTS / "store_cpu_4k.json"))
    result.store["no_space"] = 100  # as if puts had been refused
    found = rules(result)["store.no_space"]
    labels = [c.label for c in found.candidates]
    assert labels == ["store.evict_ratio=0.2", "store.evict_start_threshold=0.7"]
    # the real bench refuses no put on either side, so the change shows no gain: dropped
    measured = verify(found.candidates[0], result, rounds=1, duration=0.2)
    assert measured.verdict == DROPPED, measured.reason
    assert "did not fall" in measured.reason


@pytest.mark.slow
def test_an_eviction_policy_is_kept_exactly_when_the_simulation_says_it_helps() -> None:
    options = HitRateOptions(trace="mooncake-synthetic", policies=["lru"], capacities=[195, 1953])
    result = run_hitrate(options)
    found = rules(result)["hitrate.capacity_bound"]
    assert [c.label for c in found.candidates] == [
        "store.eviction_policy=lfu",
        "store.eviction_policy=length-aware",
    ]
    independent = run_hitrate(
        HitRateOptions(
            trace="mooncake-synthetic", policies=["lru", "lfu", "length-aware"], capacities=[1953]
        )
    )
    rate = {c.policy: c.block_hit_rate for c in independent.cases}
    for candidate in found.candidates:
        policy = dict(candidate.overrides)["store.eviction_policy"]
        measured = verify(candidate, result)
        assert measured.verdict == (KEPT if rate[policy] > rate["lru"] else DROPPED)
        assert measured.ratio == pytest.approx(rate[policy] / rate["lru"])


def test_the_cli_prints_advice_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "advice.json"
    source = RESULTS / "aa_transfer_tcp_run1.json"
    assert main(["advise", str(source), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "WARN transfer.tail: transfer tail latency (kvferry)" in printed
    assert "measure transfer.grace_period_ns=200000: kvferry bench transfer" in printed
    data = json.loads(out.read_text())
    (tail,) = [a for a in data["advice"] if a["rule"] == "transfer.tail"]
    assert [c["overrides"] for c in tail["candidates"]] == [
        {"transfer.grace_period_ns": "200000"},
        {"transfer.grace_period_ns": "10000"},
    ]
    assert tail["measured"] == []  # nothing measured without --verify
    assert [a.finding.rule for a in advise([item(load_result(source))])] == ["transfer.tail"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["advise", "missing.json"], "cannot read missing.json"),
        (["advise", str(RESULTS / "aa_transfer_tcp_run1.json"), "--rounds", "0"], "--rounds 0"),
        (["advise", str(RESULTS / "aa_transfer_tcp_run1.json"), "--duration", "0"], "--duration"),
    ],
)
def test_bad_input_is_one_error_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.slow
def test_a_disk_tier_far_below_fio_suggests_io_knobs_measured_by_the_store_bench(
    tmp_path: Path,
) -> None:
    options = StoreBenchOptions(
        backend="disk", value_size=256 << 10, batch_size=4, num_keys=64, duration=0.3,
        warmup=0.05, reference=True,
    )  # fmt: skip
    loaded = load_config(flags={"disk.capacity": 64 << 20, "disk.path": str(tmp_path)}, environ={})
    result = run_store(options, config=loaded.config, sources=loaded.sources)
    (fio,) = result.references
    assert fio.name == "fio_read" and fio.unit == "GB/s" and fio.value > 0
    assert fio.detail["block_size"] == 256 << 10 and fio.detail["direct"] is True
    assert list(tmp_path.iterdir()) == []  # fio's file and the bench's directory are gone
    timed = next(p for p in result.phases if p.phase == "read_perf")
    fio.value = timed.gbps / 0.6  # the tier at 60% of fio: above the 0.5 floor
    assert "store.disk_below_fio" not in rules(result)
    fio.value = timed.gbps / 0.3  # at 30%: the rule fires
    found = rules(result)["store.disk_below_fio"]
    assert [c.label for c in found.candidates] == [
        "disk.io_threads=8",
        "disk.io_threads=16",
        "disk.files=4",
    ]
    assert found.candidates[0].command.startswith("kvferry tune store --backend disk")
    measured = verify(found.candidates[0], result, rounds=1, duration=0.3)
    assert measured.verdict in (KEPT, DROPPED) and len(measured.rounds) == 1, measured.reason
    if measured.verdict == KEPT:
        assert measured.rounds[0] > 1.0


def test_a_replay_whose_loads_are_slower_than_prefill_is_flagged() -> None:
    result = copy.deepcopy(load_result(RESULTS / "hitrate_replay.json"))
    load_p50 = result.cases[0].replay["get_latency_per_block_us"]["p50"]  # 1.73 us per block
    # a block's tokens prefill in block_tokens / tps seconds: just faster, just slower
    result.prefill_tokens_per_s = result.block_tokens / (load_p50 * 2 / 1e6)
    assert "hitrate.load_slower_than_recompute" not in rules(result)
    result.prefill_tokens_per_s = result.block_tokens / (load_p50 / 2 / 1e6)
    found = rules(result)["hitrate.load_slower_than_recompute"]
    assert "per-block load p50" in found.evidence


def test_a_doctor_wakeup_far_from_the_grace_period_suggests_measuring_it() -> None:
    transfer = transfer_with_batches()
    assert transfer.config.values["transfer.grace_period_ns"] == 50_000
    doctor = DoctorReport(measurements={"wakeup_p50_us": 15.0})
    items = [item(doctor, "doctor.json"), item(transfer, "transfer.json")]
    for suggested, fires in ((40_000.0, False), (20_000.0, True), (200_000.0, True)):
        doctor.measurements["suggested_grace_period_ns"] = suggested
        found = [f for f in findings(items) if f.rule == "transfer.grace_vs_wakeup"]
        assert bool(found) == fires, suggested
    (f,) = found
    (c,) = f.candidates
    assert c.label == "transfer.grace_period_ns=200000"
    assert dict(c.params)["block_size"] == 4096 and dict(c.params)["batch_size"] == 1
