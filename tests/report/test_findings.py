"""The findings' rules (kvferry/report/findings.py) at their thresholds, on results built from
known per-batch samples, and the formatting every table cell goes through (report/fmt.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvferry.bench.result import Environment, Reference
from kvferry.bench.stats import Samples
from kvferry.bench.transfer import Case, CaseResult, TransferBenchOptions, TransferBenchReport
from kvferry.report import fmt
from kvferry.report.findings import MIN_TAIL_SAMPLES, SOCKET_FLOOR, TAIL_RATIO, findings
from kvferry.report.inputs import LoadedResult
from kvferry.report.serve import pareto


def case(block: int, batch: int, samples: list[float], gbps: float) -> CaseResult:
    buf = Samples()
    buf.extend(samples)
    moved = int(gbps * 1e9)
    return CaseResult.measured(
        "kvferry",
        Case(block, batch, 1),
        "read",
        batches=len(samples),
        moved=moved,
        seconds=1.0,
        samples=buf,
        initiator_cpu_s=0.1,
        target_cpu_s=None,
        consistency_bytes=None,
    )


def item(*cases: CaseResult, socket_gbps: float | None = None) -> LoadedResult:
    refs = []
    if socket_gbps is not None:
        refs = [Reference("socket_stream_1MiB", socket_gbps, "GB/s", {"message_size": 1 << 20})]
    report = TransferBenchReport(
        environment=Environment(),
        options=TransferBenchOptions(),
        cases=list(cases),
        references=refs,
    )
    return LoadedResult(Path("t.json"), "t.json", report)


def tail(n: int, ratio: float) -> list[float]:
    """``n`` batch times whose P99 over their mean is about ``ratio``: 98% at 10 us, 2% slow."""
    slow = max(2, n // 50)
    fast = [10.0] * (n - slow)
    # mean = (fast*10 + slow*x) / n and p99 ~ x: solve x / mean = ratio
    x = ratio * 10.0 * len(fast) / (n - ratio * slow)
    return fast + [x] * slow


def test_the_tail_rule_fires_above_its_ratio_with_enough_batches() -> None:
    over = case(4096, 1, tail(MIN_TAIL_SAMPLES, TAIL_RATIO * 1.2), 1.0)
    assert over.transfer_us.p99 / over.transfer_us.avg > TAIL_RATIO
    (found,) = [f for f in findings([item(over)]) if "tail" in f.title]
    assert f"P99 {fmt.num(over.transfer_us.p99)} us" in found.evidence
    assert f"over {MIN_TAIL_SAMPLES:,} batches" in found.evidence
    under = case(4096, 1, tail(MIN_TAIL_SAMPLES, TAIL_RATIO * 0.8), 1.0)
    assert not [f for f in findings([item(under)]) if "tail" in f.title]
    # too few batches: a P99 of a handful of samples is their maximum, not a tail
    few = case(4096, 1, tail(MIN_TAIL_SAMPLES - 50, TAIL_RATIO * 1.2), 1.0)
    assert not [f for f in findings([item(few)]) if "tail" in f.title]


def test_the_socket_rule_compares_like_for_like_batches() -> None:
    steady = [10.0] * MIN_TAIL_SAMPLES
    small = case(4096, 1, steady, 0.1)  # far below the socket, but a 4 KiB batch
    assert not [f for f in findings([item(small, socket_gbps=3.0)]) if "socket" in f.title]
    big = case(1 << 20, 1, steady, 3.0 * SOCKET_FLOOR * 0.9)
    (found,) = [f for f in findings([item(small, big, socket_gbps=3.0)]) if "socket" in f.title]
    assert f"at {fmt.num(big.bw_gbps)} GB/s" in found.evidence and "1 MiB x 1 x 1" in found.evidence
    fine = case(1 << 20, 1, steady, 3.0 * SOCKET_FLOOR * 1.1)
    assert not [f for f in findings([item(fine, socket_gbps=3.0)]) if "socket" in f.title]
    # no reference measured in the run: the rule has no input and says nothing
    assert not [f for f in findings([item(big)]) if "socket" in f.title]


def test_pareto_keeps_the_levels_nothing_beats_on_both() -> None:
    points = [(10.0, 100.0), (20.0, 90.0), (15.0, 150.0), (30.0, 200.0), (30.0, 180.0)]
    assert pareto(points) == [(10.0, 100.0), (15.0, 150.0), (30.0, 200.0)]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (12345.678, "12,346"),
        (4.5678, "4.57"),
        (0.012345, "0.0123"),
        (0.0, "0"),
        (7, "7"),
        (None, fmt.DASH),
        (float("nan"), fmt.DASH),
    ],
)
def test_numbers_read_to_three_significant_digits(value: float | None, text: str) -> None:
    assert fmt.num(value) == text


def test_sizes_percentages_ratios_and_times() -> None:
    assert [fmt.size(n) for n in (512, 4096, 1536, 1 << 20, 3 << 30)] == [
        "512 B",
        "4 KiB",
        "1.5 KiB",
        "1 MiB",
        "3 GiB",
    ]
    assert fmt.pct(0.4567) == "45.7%" and fmt.ratio(1.066) == "1.07x"
    assert fmt.utc(0) == fmt.DASH and fmt.utc(86400) == "1970-01-02 00:00:00 UTC"
