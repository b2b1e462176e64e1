"""The mock engine's timing model: formulas, speedup, profile fitting and its errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kvferry.config import load_config
from kvferry.config.models import MockConfig
from kvferry.errors import ConfigError
from kvferry.serving.mock.timing import TimingModel, fit_profile, load_profile, parse_profile

TRUE = TimingModel(
    prefill_base_ms=3.0,
    prefill_per_token_ms=0.05,
    prefill_quadratic_ms=2e-6,
    decode_base_ms=9.0,
    decode_per_seq_ms=0.1,
    decode_per_context_token_ms=3e-5,
)


def samples(model: TimingModel, noise: float = 0.0, seed: int = 0) -> list[dict[str, object]]:
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    for n in (128, 512, 1024, 2048, 4096, 8192):
        ms = model.prefill_ms([(n, 0)]) * (1 + rng.uniform(-noise, noise))
        out.append({"kind": "prefill", "tokens": n, "ms": ms})
    for batch in (1, 8, 32, 64):
        for per_seq in (256, 2048):
            ctx = batch * per_seq
            ms = model.decode_ms(batch, ctx) * (1 + rng.uniform(-noise, noise))
            out.append({"kind": "decode", "batch": batch, "context_tokens": ctx, "ms": ms})
    return out


def test_defaults_are_the_documented_small_model_numbers() -> None:
    t = TimingModel()
    assert t.prefill_ms([(1000, 0)]) == pytest.approx(5 + 0.07 * 1000 + 6e-7 * 1000 * 1000)
    assert t.decode_ms(64, 64 * 2000) == pytest.approx(7 + 0.04 * 64 + 5e-5 * 128_000)
    assert TimingModel.from_config(MockConfig()) == t  # config defaults == model defaults


def test_formulas() -> None:
    t = TRUE
    # One step: two chunks (one with a cached prefix of 100 tokens), a batch of 3 decodes.
    prefill = 3.0 + 0.05 * 300 + 2e-6 * (200 * 300 + 100 * 100)
    assert t.prefill_ms([(200, 100), (100, 0)]) == pytest.approx(prefill)
    assert t.decode_ms(3, 900) == pytest.approx(9.0 + 0.3 + 900 * 3e-5)
    assert t.step_ms([(200, 100), (100, 0)], 3, 900) == pytest.approx(prefill + 9.327)
    assert t.prefill_ms([]) == t.prefill_ms([(0, 50)]) == 0.0
    assert t.decode_ms(0, 0) == 0.0


def test_speedup_ratio_divides_every_time() -> None:
    fast = TimingModel(speedup_ratio=10)
    base = TimingModel()
    assert fast.prefill_ms([(512, 64)]) == pytest.approx(base.prefill_ms([(512, 64)]) / 10)
    assert fast.decode_ms(16, 4096) == pytest.approx(base.decode_ms(16, 4096) / 10)
    assert fast.step_ms([(7, 0)], 2, 99) == pytest.approx(base.step_ms([(7, 0)], 2, 99) / 10)
    assert fast.step_ms([(7, 0)], 2, 99) < base.step_ms([(7, 0)], 2, 99)


def test_fit_recovers_exact_coefficients() -> None:
    fitted = fit_profile(samples(TRUE))
    for name in (
        "prefill_base_ms",
        "prefill_per_token_ms",
        "prefill_quadratic_ms",
        "decode_base_ms",
        "decode_per_seq_ms",
        "decode_per_context_token_ms",
    ):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name


def test_fit_with_noise_predicts_within_a_few_percent() -> None:
    fitted = fit_profile(samples(TRUE, noise=0.03, seed=7))
    for n in (300, 3000, 6000):
        assert fitted.prefill_ms([(n, 0)]) == pytest.approx(TRUE.prefill_ms([(n, 0)]), rel=0.05)
    assert fitted.decode_ms(16, 16 * 1000) == pytest.approx(TRUE.decode_ms(16, 16000), rel=0.05)


def test_fit_keeps_coefficients_non_negative() -> None:
    # Pure proportional prefill with a slight concave bend: unconstrained least squares would
    # give a negative quadratic term.
    data = [{"kind": "prefill", "tokens": n, "ms": 0.1 * n - 1e-7 * n * n} for n in (10, 100, 1000)]
    fitted = fit_profile(data)
    assert fitted.prefill_quadratic_ms == 0.0
    assert fitted.prefill_base_ms >= 0 and fitted.prefill_per_token_ms > 0


def test_fit_with_two_prefill_sizes_fits_a_and_b_only() -> None:
    data = [
        {"kind": "prefill", "tokens": 100, "ms": 12.0},
        {"kind": "prefill", "tokens": 300, "ms": 32.0},
    ]
    fitted = fit_profile(data)
    assert (fitted.prefill_base_ms, fitted.prefill_per_token_ms) == pytest.approx((2.0, 0.1))
    assert fitted.prefill_quadratic_ms == 0.0


def test_a_kind_without_samples_keeps_the_base_and_speedup() -> None:
    base = TimingModel(speedup_ratio=4)
    fitted = fit_profile([s for s in samples(TRUE) if s["kind"] == "decode"], base=base)
    assert fitted.prefill_base_ms == base.prefill_base_ms
    assert fitted.decode_base_ms == pytest.approx(TRUE.decode_base_ms)
    assert fitted.speedup_ratio == 4


def test_load_profile_reads_both_json_shapes(tmp_path: Path) -> None:
    data = samples(TRUE)
    (tmp_path / "list.json").write_text(json.dumps(data))
    (tmp_path / "obj.json").write_text(json.dumps({"samples": data}))
    assert load_profile(tmp_path / "list.json") == load_profile(tmp_path / "obj.json")
    assert len(load_profile(tmp_path / "list.json")) == len(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "has no samples"),
        ({"rows": []}, "one key 'samples'"),
        ("x", "expected a list of samples"),
        ([7], "sample 0: expected an object"),
        ([{"kind": "train", "ms": 1}], "kind must be 'prefill' or 'decode'"),
        ([{"kind": "prefill", "ms": 1}], "missing field 'tokens'"),
        ([{"kind": "prefill", "tokens": 10, "ms": 0}], "ms must be a positive number"),
        ([{"kind": "prefill", "tokens": 10, "ms": "3"}], "ms must be a positive number"),
        ([{"kind": "prefill", "tokens": -1, "ms": 1}], "tokens must be a non-negative integer"),
        ([{"kind": "prefill", "tokens": 0, "ms": 1}], "tokens must be at least 1"),
        ([{"kind": "decode", "batch": 2, "ms": 1}], "missing field 'context_tokens'"),
        ([{"kind": "decode", "batch": 1, "context_tokens": 5, "ms": 1, "x": 1}], "unknown field"),
    ],
)
def test_bad_profiles_are_clear_errors(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_profile(data)


def test_underdetermined_profiles_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="at least two different token counts"):
        fit_profile([{"kind": "prefill", "tokens": 100, "ms": 9.0}] * 3)
    same_context_per_seq = [
        {"kind": "decode", "batch": b, "context_tokens": 1000 * b, "ms": 7 + b} for b in (1, 2, 4)
    ]
    with pytest.raises(ConfigError, match="vary batch and context_tokens independently"):
        fit_profile(same_context_per_seq)


def test_load_profile_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_profile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_profile(tmp_path / "bad.json")


def test_bad_coefficients_are_rejected() -> None:
    with pytest.raises(ConfigError, match="speedup_ratio must be positive"):
        TimingModel(speedup_ratio=0)
    with pytest.raises(ConfigError, match="decode_base_ms must be a finite non-negative"):
        TimingModel(decode_base_ms=-1)
    with pytest.raises(ConfigError, match=r"mock.speedup_ratio = '0' \(env KVFERRY_MOCK_SPEEDUP"):
        load_config(environ={"KVFERRY_MOCK_SPEEDUP_RATIO": "0"})
