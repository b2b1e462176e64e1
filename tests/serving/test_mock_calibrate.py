"""The mock calibrated from a ``kvferry profile`` (``kvferry serve mock --profile DIR``): the dry
run's step sums by hand, the fit's round trip, the profile's limits, its errors, and a real
profile of a mock with other timing reproduced by a fresh default mock at held-out points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvferry.bench.endpoint import harness as endpoint
from kvferry.bench.profile.harness import run as run_profile
from kvferry.bench.profile.npz import write_profile
from kvferry.bench.profile.options import ProfileOptions
from kvferry.config.models import MockConfig
from kvferry.errors import ConfigError
from kvferry.serving.mock.calibrate import (
    SlaProfile,
    fit_sla_profile,
    is_sla_profile,
    profile_limits,
    read_sla_profile,
    request_features,
)
from kvferry.serving.mock.timing import TimingModel
from kvferry.testing.mock_engine import MockServerProcess

TRUE = TimingModel(
    prefill_base_ms=20.0,
    prefill_per_token_ms=0.25,
    prefill_quadratic_ms=4e-6,
    decode_base_ms=25.0,
    decode_per_seq_ms=0.8,
    decode_per_context_token_ms=4e-4,
)
COEF = [getattr(TRUE, f) for f in (
    "prefill_base_ms", "prefill_per_token_ms", "prefill_quadratic_ms",
    "decode_base_ms", "decode_per_seq_ms", "decode_per_context_token_ms",
)]  # fmt: skip


def _ms(row: list[float]) -> float:
    return sum(a * b for a, b in zip(row, COEF, strict=True))


def test_a_long_prompt_alone_is_prefilled_in_chunks_of_the_step_budget() -> None:
    config = MockConfig(max_num_batched_tokens=8192, num_blocks=1024, max_model_len=16384)
    ttft, _ = request_features(config, 10000, 1, 1)
    # two steps: 8192 new tokens after 0, then 1808 after 8192; no decode before the 1st token
    assert ttft == pytest.approx([2, 10000, 8192 * 8192 + 1808 * 10000, 0, 0, 0])


def test_decode_features_of_requests_sent_together() -> None:
    config = MockConfig(num_blocks=1024, max_model_len=4096)
    _, itl = request_features(config, 100, 5, 1)
    # alone: 4 decode steps after the first token, contexts 101..104 tokens
    assert itl == pytest.approx([0, 0, 0, 1, 1, (101 + 102 + 103 + 104) / 4])
    _, itl = request_features(config, 1000, 3, 2)
    # request 0 prefills alone (step 1); step 2 prefills request 1 while 0 decodes at 1001
    # tokens; step 3 decodes both (1002 and 1001): 0 spans steps 2-3 and ends, 1 spans 3-4
    # (step 4: 1 decodes alone at 1002 tokens)
    r0 = [1, 1000, 1000 * 1000, 2, 1 + 2, 1001 + 2003]
    r1 = [0, 0, 0, 2, 2 + 1, 2003 + 1002]
    assert itl == pytest.approx([(a + b) / 2 / 2 for a, b in zip(r0, r1, strict=True)])


def _synthetic(config: MockConfig) -> SlaProfile:
    prefill = tuple((isl, _ms(request_features(config, isl, 1, 1)[0])) for isl in (100, 900, 2000))
    decode = tuple(
        (isl, 20, c, _ms(request_features(config, isl, 20, c)[1]))
        for isl in (100, 1500)
        for c in (1, 4)
    )
    return SlaProfile("synthetic", 4096, 16384, prefill, decode)


def test_the_fit_recovers_the_coefficients_of_a_profile_the_mock_would_measure() -> None:
    config = MockConfig(num_blocks=1024, max_model_len=4096)
    fitted = fit_sla_profile(_synthetic(config), config)
    assert fitted.prefill_base_ms == pytest.approx(TRUE.prefill_base_ms, rel=1e-6)
    assert fitted.prefill_quadratic_ms == pytest.approx(TRUE.prefill_quadratic_ms, rel=1e-6)
    assert fitted.decode_per_seq_ms == pytest.approx(TRUE.decode_per_seq_ms, rel=1e-6)
    assert fitted.decode_per_context_token_ms == pytest.approx(
        TRUE.decode_per_context_token_ms, rel=1e-6
    )
    # a prefill-only profile keeps the base's decode coefficients and speedup
    only = SlaProfile("p", 4096, 0, _synthetic(config).prefill, ())
    base = TimingModel(decode_base_ms=3.0, speedup_ratio=7.0)
    kept = fit_sla_profile(only, config, base)
    assert (kept.decode_base_ms, kept.speedup_ratio) == (3.0, 7.0)
    assert kept.prefill_per_token_ms == pytest.approx(TRUE.prefill_per_token_ms, rel=1e-6)


def test_profile_errors_and_limits(tmp_path: Path) -> None:
    assert not is_sla_profile(tmp_path / "samples.json")
    with pytest.raises(ConfigError, match="not found; give a directory written by kvferry"):
        read_sla_profile(tmp_path)
    (tmp_path / "profile.json").write_text(json.dumps({"tool": "endpoint"}))
    with pytest.raises(ConfigError, match="not a kvferry profile result"):
        read_sla_profile(tmp_path)
    (tmp_path / "profile.json").write_text(json.dumps({"tool": "profile", "prefill": []}))
    with pytest.raises(ConfigError, match="no prefill or decode point"):
        read_sla_profile(tmp_path / "profile.json")
    profile = SlaProfile("p", 2048, 10000, ((100, 5.0), (3000, 50.0)), ())
    with pytest.raises(ConfigError, match="exceeds the mock's max_model_len 2048"):
        fit_sla_profile(profile, MockConfig(num_blocks=128, max_model_len=2048))
    limited = profile_limits(MockConfig(), profile, keep=set())
    assert (limited.num_blocks, limited.max_model_len) == (625, 2048)  # ceil(10000 / 16)
    assert profile_limits(MockConfig(num_blocks=4096), profile, {"num_blocks"}).num_blocks == 4096


def test_prefill_points_are_fitted_by_their_median_and_decode_points_by_their_mean(
    tmp_path: Path,
) -> None:
    # One slow request lifts a prefill point's mean, not its median: the model gives every
    # request of the point the same time, so the median is what it should reproduce.
    points = {
        "tool": "profile",
        "prefill": [
            {"isl": 100, "ttft_avg_ms": 30.0, "ttft_p50_ms": 10.0, "requests": 8},
            {"isl": 200, "ttft_avg_ms": 20.0, "requests": 8},  # an older profile: no median
        ],
        "decode": [{"isl": 100, "osl": 10, "concurrency": 2, "itl_avg_ms": 4.0, "itl_p50_ms": 3.0}],
    }
    (tmp_path / "profile.json").write_text(json.dumps(points))
    read = read_sla_profile(tmp_path)
    assert read.prefill == ((100, 10.0), (200, 20.0))
    assert read.decode == ((100, 10, 2, 4.0),)


# --- a real profile, calibrated -------------------------------------------------------------

SOURCE_SPEEDUP = 4
"""The source mock runs 4x faster than TRUE: its profile (what calibration fits) takes a few
seconds, and its TTFTs (12-250 ms) and ITLs (~7 ms) stay far above the ~1 ms a request spends in
HTTP, which the calibrated mock adds again (a profile's times include the client's view)."""


def _measure(url: str, isl: int, osl: int, concurrency: int, seed: int) -> tuple[float, float]:
    options = endpoint.ServeBenchOptions(
        url=url, concurrency=(concurrency,), request_count=max(3, concurrency),
        warmup_requests=1, isl=isl, osl=osl, seed=seed, workers=1,
    )  # fmt: skip
    m = endpoint.run(options).cases[0].metrics
    ttft, itl = m.value("time_to_first_token", "p50"), m.value("inter_token_latency", "p50")
    assert ttft is not None and itl is not None
    return ttft, itl


@pytest.mark.slow
def test_a_calibrated_default_mock_reproduces_the_profiled_one_at_held_out_points(
    tmp_path: Path,
) -> None:
    """The correctness check of the fit: both mocks keep their model's time (the mock's deadline
    clock), so p50s agree to a few percent and 10% is a real bound, not a timing assertion
    on this machine's speed; the held-out ISLs and (context, batch) are none of the
    profile's."""
    timing = [f"--set=mock.{k}={v}" for k, v in (
        ("prefill_base_ms", TRUE.prefill_base_ms), ("prefill_per_token_ms",
         TRUE.prefill_per_token_ms), ("prefill_quadratic_ms", TRUE.prefill_quadratic_ms),
        ("decode_base_ms", TRUE.decode_base_ms), ("decode_per_seq_ms", TRUE.decode_per_seq_ms),
        ("decode_per_context_token_ms", TRUE.decode_per_context_token_ms),
    )]  # fmt: skip
    held_out = [(1500, 2, 1), (2500, 2, 1), (1200, 20, 3), (2000, 20, 2)]
    source_flags = ["--max-model-len", "4096", "--num-blocks", "1024"]
    with MockServerProcess.start(
        *source_flags, "--speedup-ratio", str(SOURCE_SPEEDUP), *timing
    ) as source:
        options = ProfileOptions(
            url=source.url, granularity=5, concurrency_points=3, decode_osl=20, warmup_requests=1
        )
        report = run_profile(options)
        assert not report.skipped and not report.aborted
        measured = {p: _measure(source.url, *p, seed=1000 + i) for i, p in enumerate(held_out)}
    profiled = {p.isl for p in report.prefill} | {(p.isl, p.concurrency) for p in report.decode}
    assert not profiled & ({p[0] for p in held_out} | {(p[0], p[2]) for p in held_out})
    write_profile(report, tmp_path)
    # a fresh mock with default timing (and speedup 1): only the profile sets its times, and
    # its KV capacity and max context are the profile's
    with MockServerProcess.start("--profile", str(tmp_path)) as calibrated:
        stats = calibrated.request("GET", "/kv/stats").body
        assert stats["num_blocks"] * stats["block_size"] == report.max_kv_tokens
        got = {p: _measure(calibrated.url, *p, seed=2000 + i) for i, p in enumerate(held_out)}
    for (isl, osl, c), (ttft, itl) in measured.items():
        want, have = (ttft, got[isl, osl, c][0]) if osl == 2 else (itl, got[isl, osl, c][1])
        what = f"{'TTFT' if osl == 2 else 'ITL'} p50 at ISL {isl} x {c}"
        assert have == pytest.approx(want, rel=0.10), f"{what}: {have:.2f} vs source {want:.2f}"
