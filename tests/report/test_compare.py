"""The A/B comparison (kvferry.report.compare) on real recorded results: a result against itself
and real same-command runs are within noise; copies scaled by known factors get the verdicts
those factors call for, in both directions and for lower-is-better metrics; bands come from
rounds where a side has them; one-sided cases and tools are reported, never dropped."""

from __future__ import annotations

import copy
import dataclasses
import statistics
from pathlib import Path
from typing import Any

import pytest

from kvferry.bench.result import BenchResult, load_result
from kvferry.errors import ConfigError
from kvferry.report.compare import (
    BETTER,
    DEFAULT_BAND,
    MIN_BAND,
    ONLY_BASE,
    ONLY_HEAD,
    WITHIN,
    WORSE,
    Comparison,
    Verdict,
    compare_results,
)

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

# one recorded result per bench kind, and the metrics its cases are compared on
ONE_PER_TOOL = {
    "transfer": ("tcp_b128.json", {"BW", "P99 Tx", "CPU s/GB"}),
    "store": ("store_cpu_4k.json", {"ops/s", "GB/s", "P99 latency"}),
    "hitrate": ("hitrate_fig9_auto.json", {"block hit rate"}),
    "serve": ("serve_vs_aiperf.json", {"TTFT p50", "ITL p50", "request throughput"}),
    "router": ("router_mock.json", {"TTFT p50", "hit rate"}),
}


def load(name: str) -> Any:
    return load_result(RESULTS / name)


def by(comparison: Comparison, case: str, metric: str) -> Verdict:
    found = [v for v in comparison.verdicts if v.case == case and v.metric == metric]
    assert len(found) == 1, (case, metric, [(v.case, v.metric) for v in comparison.verdicts])
    return found[0]


def scaled_transfer(result: Any, factors: dict[str, tuple[float, float, float]]) -> Any:
    """A copy of a transfer result with each contender's BW, P99 and CPU seconds multiplied by
    the factors given for it."""
    head = copy.deepcopy(result)
    for c in head.cases:
        bw, p99, cpu = factors.get(c.backend, (1.0, 1.0, 1.0))
        c.bw_gbps *= bw
        c.transfer_us = dataclasses.replace(c.transfer_us, p99=c.transfer_us.p99 * p99)
        c.initiator_cpu_s *= cpu
    return head


# --- A/A ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", sorted(ONE_PER_TOOL))
def test_a_result_against_itself_is_within_noise(tool: str) -> None:
    name, metrics = ONE_PER_TOOL[tool]
    result = load(name)
    assert result.tool == tool
    comparison = compare_results([result], [result])
    assert comparison.verdicts, f"{name}: no case compared"
    assert {v.metric for v in comparison.verdicts} == metrics
    assert {v.verdict for v in comparison.verdicts} == {WITHIN}
    assert all(v.ratio in (1.0, None) and v.base == v.head for v in comparison.verdicts)
    assert all(v.tool == tool for v in comparison.verdicts)
    assert comparison.regressions() == []


@pytest.mark.parametrize(
    "stem",
    ["tcp_b128_session12_rounds8", "tcp_1m16_session12_rounds8", "tcp_b1_session12_rounds12"],
)
def test_real_same_command_runs_with_rounds_are_within_noise(stem: str) -> None:
    """Runs of one command recorded minutes apart in earlier sessions (8 or 12 rounds each,
    kvferry beside Mooncake): the bands their rounds give hold their differences."""
    base, head = load(f"{stem}_run1.json"), load(f"{stem}_run2.json")
    comparison = compare_results([base], [head])
    assert len(comparison.verdicts) == 6  # 2 contenders x (BW, P99, CPU s/GB)
    assert {v.verdict for v in comparison.verdicts} == {WITHIN}
    assert all(v.ratio is not None and v.ratio != 1.0 for v in comparison.verdicts)  # not equal
    for v in comparison.verdicts:
        assert v.band_source == ("default" if v.metric == "CPU s/GB" else "rounds")


def test_two_hitrate_engines_count_the_same_hits() -> None:
    """The same simulation counted by the store loop and by LRU's one-pass shortcut: exact
    counts, so every ratio is exactly 1."""
    store, auto = load("hitrate_fig9_store.json"), load("hitrate_fig9_auto.json")
    assert {c.engine for c in store.cases} == {"store"} and "stack" in {
        c.engine for c in auto.cases
    }
    comparison = compare_results([store], [auto])
    assert len(comparison.verdicts) == 10
    assert {v.ratio for v in comparison.verdicts} == {1.0}
    assert {v.verdict for v in comparison.verdicts} == {WITHIN}


# --- known ratios ---------------------------------------------------------------------------------


def test_known_ratios_give_the_right_verdicts_in_both_directions() -> None:
    base = load("tcp_b128.json")
    labels = [c.backend for c in base.cases]
    assert labels == ["kvferry", "mooncake"]
    # kvferry: 1.5x BW, half the P99, 0.8x CPU: all better (P99 and CPU are lower-is-better);
    # mooncake: half the BW, 2x P99, 1.25x CPU: all worse
    head = scaled_transfer(base, {"kvferry": (1.5, 0.5, 0.8), "mooncake": (0.5, 2.0, 1.25)})
    comparison = compare_results([base], [head], default_band=0.05)
    case = "kvferry read 4KiB x128 t1"
    other = "mooncake read 4KiB x128 t1"
    expected = {
        (case, "BW"): (1.5, BETTER),
        (case, "P99 Tx"): (0.5, BETTER),
        (case, "CPU s/GB"): (0.8, BETTER),
        (other, "BW"): (0.5, WORSE),
        (other, "P99 Tx"): (2.0, WORSE),
        (other, "CPU s/GB"): (1.25, WORSE),
    }
    for (label, metric), (ratio, verdict) in expected.items():
        v = by(comparison, label, metric)
        assert v.ratio == pytest.approx(ratio), (label, metric)
        assert v.verdict == verdict, (label, metric)
        assert (v.band, v.band_source) == (0.05, "default")
    assert by(comparison, case, "P99 Tx").higher_is_better is False
    assert {(v.case, v.metric) for v in comparison.regressions()} == {
        (other, "BW"),
        (other, "P99 Tx"),
        (other, "CPU s/GB"),
    }
    assert len(comparison.improvements()) == 3


def test_a_ratio_inside_the_band_is_within_noise_and_the_band_is_the_callers() -> None:
    base = load("tcp_b128.json")
    head = scaled_transfer(base, {"kvferry": (1.04, 1.04, 1.0), "mooncake": (0.96, 0.96, 1.0)})
    wide = compare_results([base], [head], default_band=0.05)
    assert {v.verdict for v in wide.verdicts} == {WITHIN}
    narrow = compare_results([base], [head], default_band=0.01)
    assert by(narrow, "kvferry read 4KiB x128 t1", "BW").verdict == BETTER
    assert by(narrow, "kvferry read 4KiB x128 t1", "P99 Tx").verdict == WORSE
    assert by(narrow, "mooncake read 4KiB x128 t1", "BW").verdict == WORSE
    assert by(narrow, "mooncake read 4KiB x128 t1", "P99 Tx").verdict == BETTER
    assert compare_results([base], [head]).default_band == DEFAULT_BAND


def test_hit_rate_is_higher_is_better_and_its_change_in_points_is_shown() -> None:
    base = load("hitrate_fig9_auto.json")
    head = copy.deepcopy(base)
    for h in head.cases:
        h.tally = dataclasses.replace(h.tally, hit_blocks=int(h.tally.hit_blocks * 0.8))
    comparison = compare_results([base], [head], default_band=0.05)
    moved = [v for v in comparison.verdicts if v.base]
    assert moved and all(v.verdict == WORSE for v in moved)
    hits = [c.tally.hit_blocks for c in base.cases if c.tally.hit_blocks]
    assert [v.ratio for v in moved] == pytest.approx([int(n * 0.8) / n for n in hits])
    table = comparison.section().tables[0]
    cell = table.rows[[r[0] for r in table.rows].index(moved[0].case)][4]
    points = 100 * (moved[0].head - moved[0].base)  # type: ignore[operator]
    assert cell == f"{moved[0].ratio:.3f} ({points:+.2f} pp)"


# --- noise from rounds ----------------------------------------------------------------------------


def with_rounds(result: Any, bw_rounds: list[float]) -> Any:
    out = copy.deepcopy(result)
    for c in out.cases:
        c.round_bw_gbps = [c.bw_gbps * r for r in bw_rounds]
    return out


def test_the_band_is_the_sum_of_each_sides_half_relative_range() -> None:
    base = load("tcp_b128.json")
    kv = "kvferry read 4KiB x128 t1"
    # each side's rounds spread +-10% around their median: the band is 0.1 + 0.1
    base_r = with_rounds(base, [0.9, 1.0, 1.1])
    inside = with_rounds(scaled_transfer(base, {"kvferry": (1.15, 1.0, 1.0)}), [0.9, 1.0, 1.1])
    v = by(compare_results([base_r], [inside]), kv, "BW")
    assert (v.band, v.band_source) == (pytest.approx(0.2), "rounds")
    assert v.verdict == WITHIN  # the default band (5%) would call 1.15 better
    beyond = with_rounds(scaled_transfer(base, {"kvferry": (1.3, 1.0, 1.0)}), [0.9, 1.0, 1.1])
    assert by(compare_results([base_r], [beyond]), kv, "BW").verdict == BETTER
    # a side without rounds is taken to be as noisy as the other
    one_sided = by(compare_results([base_r], [scaled_transfer(base, {})]), kv, "BW")
    assert (one_sided.band, one_sided.band_source) == (pytest.approx(0.2), "rounds")
    # rounds that agree exactly: the floor, not a band of 0
    flat = by(compare_results([with_rounds(base, [1, 1, 1])], [base]), kv, "BW")
    assert (flat.band, flat.band_source) == (MIN_BAND, "rounds")
    # P99 has no rounds here: the default band
    assert by(compare_results([base_r], [inside]), kv, "P99 Tx").band_source == "default"


def test_a_fresh_run_keeps_each_rounds_bw_and_the_band_reads_them(tmp_path: Path) -> None:
    """A real short transfer run with 3 rounds: each case carries its rounds, written to JSON
    and read back, and the comparison's band is their half range (doubled, one side)."""
    from kvferry.bench.transfer import TransferBenchOptions, run

    options = TransferBenchOptions(
        transport="tcp",
        start_block_size=65536,
        max_block_size=65536,
        start_batch_size=4,
        max_batch_size=4,
        max_threads=1,
        duration=0.2,
        warmup=0.05,
        rounds=3,
        total_buffer_size=1 << 24,
    )
    path = tmp_path / "transfer.json"
    run(options).write(path)
    result = load_result(path)
    (case,) = result.cases  # type: ignore[attr-defined]
    assert len(case.round_bw_gbps) == 3 and len(case.round_p99_tx_us) == 3
    rounds = case.round_bw_gbps
    v = by(compare_results([result], [load("tcp_b128.json")]), "kvferry read 64KiB x4 t1", "BW")
    assert v.verdict == ONLY_BASE  # another case: nothing to set it against
    itself = by(compare_results([result], [result]), "kvferry read 64KiB x4 t1", "BW")
    half = (max(rounds) - min(rounds)) / 2 / statistics.median(rounds)
    assert itself.band_source == "rounds"
    assert itself.band == pytest.approx(max(MIN_BAND, 2 * half))


def test_older_files_band_from_the_contenders_per_round_ratios() -> None:
    base = load("tcp_b128_session12_rounds8_run1.json")
    comparison = compare_results([base], [base])
    ratio = next(r for r in base.ratios if r.metric == "bw_gbps")
    half = (max(ratio.rounds) - min(ratio.rounds)) / 2 / statistics.median(ratio.rounds)
    for label in ("kvferry", "mooncake"):  # both took part in every round
        v = by(comparison, f"{label} read 4KiB x128 t1", "BW")
        assert (v.band, v.band_source) == (pytest.approx(2 * half), "rounds")


def test_several_runs_of_one_case_are_its_rounds() -> None:
    runs = [load(f"tcp_b128_session10_run{i}.json") for i in (1, 2, 3)]
    comparison = compare_results(runs, runs)
    v = by(comparison, "kvferry read 4KiB x128 t1", "BW")
    values = sorted(next(c.bw_gbps for c in r.cases if c.backend == "kvferry") for r in runs)
    assert v.base == v.head == values[1]  # the median run
    assert v.band_source == "rounds"
    assert v.band == pytest.approx(2 * (values[2] - values[0]) / 2 / values[1])
    assert v.verdict == WITHIN


def test_serve_rounds_of_one_level_give_its_band() -> None:
    """serve_vs_aiperf.py's output: one case per round of one level."""
    result = load("serve_vs_aiperf.json")
    comparison = compare_results([result], [result])
    assert {v.case for v in comparison.verdicts} == {"concurrency 4"}
    assert {v.band_source for v in comparison.verdicts} == {"rounds"}


# --- what does not match --------------------------------------------------------------------------


def test_cases_on_one_side_only_are_reported() -> None:
    base = load("store_cpu_4k.json")
    head = copy.deepcopy(base)
    dropped = head.phases.pop()  # verify: base only
    added = copy.deepcopy(dropped)
    added.phase = "second_pass"  # head only
    head.phases.append(added)
    comparison = compare_results([base], [head])
    kinds = {(v.case, v.verdict) for v in comparison.verdicts}
    assert ("cpu batch-get 4KiB, verify (get)", ONLY_BASE) in kinds
    assert ("cpu batch-get 4KiB, second_pass (get)", ONLY_HEAD) in kinds
    one_sided = [v for v in comparison.verdicts if v.verdict in (ONLY_BASE, ONLY_HEAD)]
    assert len(one_sided) == 6 and all(v.ratio is None for v in one_sided)
    assert next(v for v in one_sided if v.verdict == ONLY_BASE).head is None
    assert len(comparison.verdicts) == 4 * 3  # 2 matched + 2 one-sided cases, 3 metrics each
    assert comparison.regressions() == []


def test_results_of_different_tools_match_nothing_and_say_so() -> None:
    comparison = compare_results([load("tcp_b128.json")], [load("store_cpu_4k.json")])
    assert comparison.verdicts == []
    text = " ".join(comparison.notes)
    assert "transfer: 1 result(s) with 2 case(s) on base only, none on head" in text
    assert "store: 1 result(s) with 3 case(s) on head only, none on base" in text
    section = comparison.section()
    assert section.tables == []
    assert [f.title for f in section.findings] == ["Nothing to compare"]


def test_options_that_differ_between_the_sides_are_noted() -> None:
    base = load("store_cpu_4k.json")
    head = copy.deepcopy(base)
    head.options = dataclasses.replace(head.options, duration=8.0, threads=2)
    notes = compare_results([base], [head]).notes
    assert any("store options differ" in n and "duration 4.0 -> 8.0" in n for n in notes)
    assert any("threads 1 -> 2" in n for n in notes)


def test_a_band_that_is_not_a_fraction_is_refused() -> None:
    with pytest.raises(ConfigError, match="noise band 5: expected a fraction"):
        compare_results([], [], default_band=5)
    with pytest.raises(ConfigError, match=r"noise band -0\.1"):
        compare_results([], [], default_band=-0.1)


# --- the section ----------------------------------------------------------------------------------


def test_the_section_has_a_table_per_tool_and_findings() -> None:
    transfer = load("tcp_b128.json")
    store = load("store_cpu_4k.json")
    head_transfer = scaled_transfer(
        transfer, {"kvferry": (1.5, 1.0, 1.0), "mooncake": (0.5, 1.0, 1.0)}
    )
    base: list[BenchResult] = [transfer, store]
    comparison = compare_results(
        base, [head_transfer, store], base_sources=["a.json", "b.json"], head_sources=["c.json"]
    )
    section = comparison.section()
    assert section.anchor == "compare"
    assert [t.title for t in section.tables] == [
        "transfer: head against base",
        "store: head against base",
    ]
    table = section.tables[0]
    assert table.columns == ["Case", "Metric", "Base", "Head", "Ratio", "Band", "Verdict"]
    assert len(table.numeric) == len(table.columns)
    assert len(table.rows) == 6 and all(len(r) == 7 for r in table.rows)
    bw = next(r for r in table.rows if r[0] == "kvferry read 4KiB x128 t1" and r[1] == "BW ↑")
    v = by(comparison, "kvferry read 4KiB x128 t1", "BW")
    assert bw[2] == f"{v.base:.4g} GB/s" and bw[3] == f"{v.head:.4g} GB/s"
    assert bw[4:] == ["1.500", "±30.0% (default)", "better"]
    p99 = next(r for r in table.rows if r[0] == "mooncake read 4KiB x128 t1" and r[1] == "P99 Tx ↓")
    assert p99[6] == "within noise"
    assert {r[6] for r in section.tables[1].rows} == {"within noise"}
    bad = [f for f in section.findings if f.severity == "bad"]
    assert [f.title for f in bad] == ["transfer mooncake read 4KiB x128 t1: BW worse"]
    assert "x0.500" in bad[0].evidence and "band +-30.0% from default" in bad[0].evidence
    good = [f for f in section.findings if f.severity == "good"]
    assert [f.title for f in good] == ["transfer: 1 metric(s) better beyond noise"]
    assert "a.json, b.json" in section.intro and "c.json" in section.intro
    assert "1 better, 1 worse, 13 within noise" in section.intro
