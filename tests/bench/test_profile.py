"""The SLA profiler and planner (``kvferry profile``, ``kvferry plan``): the fit and
interpolation math against hand-computed values, the sweeps' points and KV clamp, SLA selection
(feasible, infeasible, ties, replicas), Dynamo's npz names, and real profiles of ``kvferry serve
mock``: the whole command, a point that times out, an engine killed mid-profile."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvferry.bench.profile import decode, prefill
from kvferry.bench.profile.candidates import parse_candidates
from kvferry.bench.profile.fit import fit_quadratic, interp_1d, interp_at, interp_grid
from kvferry.bench.profile.harness import ProfileProgress, run
from kvferry.bench.profile.npz import (
    DECODE_KEYS,
    DECODE_NPZ,
    PREFILL_KEYS,
    PREFILL_NPZ,
    read_profile,
    write_npz,
    write_profile,
)
from kvferry.bench.profile.options import ProfileError, ProfileOptions
from kvferry.bench.profile.report import DecodePoint, PrefillPoint, ProfileReport
from kvferry.bench.profile.select import plan
from kvferry.bench.profile.simulate import SimulateOptions
from kvferry.bench.result import load_result
from kvferry.cli.main import main
from kvferry.errors import ConfigError
from kvferry.testing.mock_engine import MockServerProcess

# --- fit and interpolation -----------------------------------------------------------------


def test_quadratic_fit_of_an_exact_quadratic_has_its_coefficients_and_r2_1() -> None:
    xs = [0.0, 1.0, 2.0, 3.0, 4.0]
    fit = fit_quadratic(xs, [2 + 3 * x + 0.5 * x * x for x in xs])
    assert (fit.c0, fit.c1, fit.c2) == pytest.approx((2.0, 3.0, 0.5))
    assert fit.r2 == pytest.approx(1.0)
    assert fit(10.0) == pytest.approx(82.0)


def test_quadratic_fit_r2_by_hand() -> None:
    # y = 0,1,0,1 at x = 0..3: with t = x - 1.5 the normal equations give c = 0, b = 0.2,
    # a = 0.5, so y = 0.2 + 0.2x; residuals -.2 .6 -.6 .2 -> SS_res 0.8; SS_tot 1 -> R^2 0.2
    fit = fit_quadratic([0, 1, 2, 3], [0, 1, 0, 1])
    assert (fit.c0, fit.c1, fit.c2) == pytest.approx((0.2, 0.2, 0.0), abs=1e-12)
    assert fit.r2 == pytest.approx(0.2)


def test_quadratic_fit_needs_three_distinct_x() -> None:
    with pytest.raises(ProfileError, match="3 or more points"):
        fit_quadratic([1, 1, 2], [1, 2, 3])


def test_interp_1d_is_linear_between_points_and_clamped_outside() -> None:
    xs, ys = [20.0, 0.0, 10.0], [400.0, 0.0, 100.0]  # unsorted on purpose
    assert interp_1d(xs, ys, 5) == pytest.approx(50.0)
    assert interp_1d(xs, ys, 15) == pytest.approx(250.0)
    assert interp_1d(xs, ys, -5) == 0.0
    assert interp_1d(xs, ys, 25) == 400.0


def test_surface_reproduces_a_plane_and_fills_holes_by_the_nearest_point() -> None:
    def plane(x: float, y: float) -> float:
        return 1 + 2 * x + 3 * y

    pts = [(0.0, 0.0), (1.0, 0.0), (0.0, 10.0), (0.5, 10.0)]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    zs = [plane(x, y) for x, y in pts]
    got = interp_at(xs, ys, zs, np.array([0.25, 1.0]), np.array([5.0, 10.0]))
    assert got[0, 0] == pytest.approx(plane(0.25, 5.0))  # 16.5, inside every row's range
    # (1.0, 10): outside row y=10's x range; nearest measured point, x and y scaled to their
    # ranges (1 and 10), is (0.5, 10) at 0.5 (not (1, 0) at 1): z = 32
    assert got[1, 1] == pytest.approx(32.0)
    # rows whose x ranges do not overlap (KV usage grows with context): at (1.5, 5), halfway
    # (t = .5) between row y=0 (x 0..1, z 0..1) and row y=10 (x 2..3, z 10..20), the strip
    # spans x 1..2 so u = .5: (0.5 + 15) / 2 = 7.75
    apart = interp_at([0, 1, 2, 3], [0, 0, 10, 10], [0, 1, 10, 20], np.array([1.5]),
                      np.array([5.0]))  # fmt: skip
    assert apart[0, 0] == pytest.approx(7.75)
    gx, gy, gz = interp_grid(xs, ys, zs, size=5)
    assert gz.shape == (5, 5) and not np.isnan(gz).any()
    assert (gx[0], gx[-1], gy[0], gy[-1]) == (0.0, 1.0, 0.0, 10.0)


# --- the sweeps' points ----------------------------------------------------------------------


def test_prefill_isls_spread_under_the_margin_and_densify_where_ttft_bends() -> None:
    isls = prefill.base_isls(4096, 12, 2)
    assert isls[0] == prefill.MIN_ISL and isls[-1] == 4096 - 512 and len(isls) == 8
    # slopes 0.001 then 0.007 at ISL 2000: the bend is there; both intervals are 1000 wide,
    # the lower one is halved
    assert prefill.next_isl([(100, 1.0), (1000, 2.0), (2000, 3.0), (3000, 10.0)]) == 1500


def test_decode_concurrency_is_clamped_to_the_kv_capacity() -> None:
    cells = decode.decode_grid(4196, 10_000, 100, 3, 3, 64)
    assert sorted({c.isl for c in cells}) == [100, 2098, 4096]
    for c in cells:
        assert c.concurrency * (c.isl + 100) <= 10_000
        assert c.clamp == min(10_000 // (c.isl + 100), 64) and c.kv_bound
    assert [c.concurrency for c in cells if c.isl == 100] == [1, 7, 50]
    capped = decode.decode_grid(4196, 10_000, 100, 3, 3, 8)
    assert max(c.concurrency for c in capped) == 8
    assert not next(c for c in capped if c.isl == 100).kv_bound


def test_bad_options_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="--mode must be one of prefill, decode, both"):
        ProfileOptions(mode="fast").validate()
    with pytest.raises(ConfigError, match="--point-timeout must be > 0 s"):
        ProfileOptions(point_timeout_s=0).validate()


# --- SLA selection ---------------------------------------------------------------------------


def _report(prefill_pts: list[tuple[int, float]], decode_pts: list[tuple[float, float, float]],
            model: str = "m") -> ProfileReport:  # fmt: skip
    """Prefill (ISL, TTFT ms); decode (KV usage, ITL ms, tokens/s) at ISL 100, OSL 100."""
    return ProfileReport(
        options=ProfileOptions(),
        model=model,
        max_kv_tokens=1000,
        prefill=[PrefillPoint(isl, t, t, 3) for isl, t in prefill_pts],
        decode=[DecodePoint(100, 100, 1, x, itl, itl, tp, 2) for x, itl, tp in decode_pts],
    )


A = _report([(1000, 10.0), (2000, 25.0)], [(0.1, 1.0, 100.0), (0.5, 3.0, 400.0)], "a")
B = _report([(1000, 8.0), (2000, 30.0)], [(0.3, 1.5, 100.0)], "b")


def test_prefill_picks_the_highest_throughput_that_meets_ttft_at_the_isl() -> None:
    # at ISL 1500: A 17.5 ms (85,714 tokens/s), B 19 ms (78,947 tokens/s)
    p = plan([A, B], ttft_ms=20, itl_ms=5, isl=1500, osl=100)
    assert p.prefill is not None and p.prefill.candidate == "a" and p.prefill.feasible
    assert p.prefill.latency_ms == pytest.approx(17.5)
    assert p.prefill.tokens_per_s == pytest.approx(1500 / 17.5 * 1000)


def test_infeasible_names_the_closest_candidate_and_its_miss() -> None:
    p = plan([B, A], ttft_ms=15, itl_ms=5, isl=1500, osl=100)
    assert p.prefill is not None and not p.prefill.feasible and not p.feasible
    assert p.prefill.candidate == "a" and p.prefill.miss_ms == pytest.approx(2.5)
    text = "\n".join(p.lines())
    assert "prefill: infeasible" in text and "closest: a" in text and "misses by 2.5 ms" in text


def test_ties_go_to_the_lower_latency_then_the_earlier_candidate() -> None:
    # measured points (no ISL/OSL), ITL <= 1.6: A's (ITL 1.0) and B's (ITL 1.5) both give 100
    # tokens/s; B comes first but A's latency is lower
    p = plan([B, A], ttft_ms=100, itl_ms=1.6)
    assert p.decode is not None and p.decode.candidate == "a" and p.decode.latency_ms == 1.0
    p2 = plan([B, B], ttft_ms=100, itl_ms=5, names=["first", "second"])
    assert p2.decode is not None and p2.decode.candidate == "first"
    assert p2.prefill is not None and p2.prefill.candidate == "first"


def test_decode_along_kv_usage_at_the_target_context_and_replicas() -> None:
    # A's row: ITL 1 + 5(x - .1), tokens/s 100 + 750(x - .1) for x in [.1, .5]; ITL <= 2 up
    # to x = .3 (250 tokens/s); the 100-cell grid's last cell below is x = .29798: 248.5
    # context = ISL + OSL/2 = 150, A's row
    p = plan([A], ttft_ms=20, itl_ms=2, request_rate=10, isl=100, osl=100)
    d = p.decode
    assert d is not None and d.feasible and d.latency_ms <= 2
    assert d.tokens_per_s == pytest.approx(100 + 750 * (0.4 * 49 / 99), rel=1e-9)
    prefill_r, decode_r = p.replicas
    assert prefill_r.count == 1 and prefill_r.load_tokens_per_s == 1000  # 10,000 per instance
    assert decode_r.count == 5  # 1000 tokens/s over 248.5 per instance: 4.02 -> 5
    assert decode_r.margin == pytest.approx(5 * d.tokens_per_s / 1000 - 1)


def test_a_load_needs_its_lengths() -> None:
    with pytest.raises(ConfigError, match="--request-rate needs --isl and --osl"):
        plan([A], ttft_ms=20, itl_ms=2, request_rate=10)


# --- files ---------------------------------------------------------------------------------


def test_npz_files_have_dynamos_names_and_shapes(tmp_path: Path) -> None:
    write_npz(A, tmp_path)
    with np.load(tmp_path / PREFILL_NPZ) as f:
        assert sorted(f.files) == sorted(PREFILL_KEYS)
        assert all(f[k].shape == (2,) for k in PREFILL_KEYS)
        assert list(f["prefill_thpt_per_gpu"]) == pytest.approx([100_000.0, 80_000.0])
    with np.load(tmp_path / DECODE_NPZ) as f:
        assert sorted(f.files) == sorted(DECODE_KEYS)
        assert all(f[k].shape == (2,) for k in DECODE_KEYS if k != "max_kv_tokens")
        assert f["max_kv_tokens"].shape == (1,) and int(f["max_kv_tokens"][0]) == 1000
        assert list(f["y_context_length"]) == [150.0, 150.0]


def test_plan_reads_a_missing_profile_as_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["plan", "--profile", str(tmp_path / "none"), "--ttft", "10", "--itl", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --profile")


# --- real profiles of kvferry serve mock ------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[MockServerProcess]:
    # fast (20x) and small: max context 4096, 32,768 KV tokens so the decode clamp binds
    with MockServerProcess.start(
        "--speedup-ratio", "20", "--max-model-len", "4096", "--num-blocks", "2048"
    ) as s:
        yield s


def test_profile_of_the_mock_end_to_end(
    server: MockServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "prof"
    rc = main([
        "profile", "--url", server.url, "--granularity", "4", "--concurrency-points", "2",
        "--decode-osl", "10", "--out", str(out), "--ttft", "1000", "--itl", "1000",
        "--quiet",
    ])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    report = read_profile(out)
    assert isinstance(load_result(json.loads((out / "profile.json").read_text())), ProfileReport)
    assert report.max_context == 4096 and report.max_kv_tokens == 2048 * 16
    assert report.kv_source == "/kv/stats" and not report.skipped and not report.aborted
    isls = [p.isl for p in report.prefill]
    assert len(isls) == 4 and isls == sorted(set(isls)) and isls[-1] == 4096 - 512
    assert report.prefill[-1].ttft_avg_ms > report.prefill[0].ttft_avg_ms
    assert len(report.decode) == 6  # 3 contexts (granularity / 3, at least 3) x 2
    for p in report.decode:
        assert p.concurrency * (p.isl + p.osl) <= report.max_kv_tokens
        assert p.itl_avg_ms > 0 and p.tokens_per_s > 0
    assert any("clamped by the KV capacity" in n for n in report.notes)
    assert "TTFT fit (ms):" in text and "SLA met" in text
    for name in ("prefill_ttft_interpolation", "decode_itl_interpolation"):
        assert (out / f"{name}.png").stat().st_size > 0
    assert (out / PREFILL_NPZ).exists() and (out / DECODE_NPZ).exists()

    rc = main(["plan", "--profile", str(out), "--ttft", "0.001", "--itl", "0.001", "--strict"])
    text = capsys.readouterr().out
    assert rc == 1 and "prefill: infeasible" in text and "decode: infeasible" in text
    assert "closest: prof" in text
    assert main(["plan", "--profile", str(out), "--ttft", "0.001", "--itl", "0.001"]) == 0

    md = tmp_path / "r.md"
    assert main(["report", str(out), "-o", str(tmp_path / "r.html"), "--md", str(md)]) == 0
    assert "## SLA profile" in md.read_text()


def test_a_point_that_times_out_is_skipped_and_the_profile_goes_on() -> None:
    # real time (no speedup): ISL 7680 prefills in ~0.58 s, past the 0.2 s each request
    # of a 3-request point gets of --point-timeout 0.6; ISL 100 takes ~12 ms
    with MockServerProcess.start("--max-model-len", "8192", "--num-blocks", "2048") as s:
        options = ProfileOptions(
            url=s.url, mode="prefill", granularity=3, point_timeout_s=0.6, warmup_requests=0
        )
        report = run(options)
    assert [p.isl for p in report.prefill] == [100]
    skipped = {sk.label: sk.reason for sk in report.skipped}
    # ISL 3890's requests time out; ISL 7680's either do too, or its test request waits behind
    # the engine's last step of 3890 and times out first: skipped either way, never "the engine
    # went away" (it did not)
    assert sorted(skipped) == ["isl 3890", "isl 7680"]
    assert "timed out" in skipped["isl 3890"]
    assert "timed out" in skipped["isl 7680"] or "engine is up" in skipped["isl 7680"]
    assert not report.aborted


def test_an_engine_killed_mid_profile_keeps_its_points(tmp_path: Path) -> None:
    engine = MockServerProcess.start("--speedup-ratio", "20", "--max-model-len", "4096")
    try:

        def progress(p: ProfileProgress) -> None:
            if p.done == 2:
                engine.proc.kill()
                engine.proc.wait()

        options = ProfileOptions(url=engine.url, mode="both", granularity=4, max_kv_tokens=10**5)
        report = run(options, progress)
    finally:
        engine.kill()
    assert len(report.prefill) == 2 and not report.decode
    assert "went away after 2 point(s)" in report.aborted and "kept" in report.aborted
    write_profile(report, tmp_path)
    assert [p.isl for p in read_profile(tmp_path).prefill] == [p.isl for p in report.prefill]


def test_the_automatic_speedup_keeps_the_simulated_load_within_the_token_budget() -> None:
    def speedup(rate: float, isl: int, osl: int, given: float | None = None) -> float:
        return SimulateOptions(
            profile="p", ttft_ms=1, itl_ms=1, request_rate=rate, isl=isl, osl=osl,
            speedup_ratio=given,
        ).speedup()  # fmt: skip

    assert speedup(20, 1000, 50) == 2  # 60,000 / 21,000 tokens/s = 2.86, whole
    assert speedup(1, 100, 10) == 10  # at most 10
    assert speedup(100, 4000, 100) == 1  # never under 1
    assert speedup(100, 4000, 100, given=25) == 25  # as given


# --- candidates ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fast", "expected NAME=ARGS"),
        ("=mock", "expected NAME=ARGS"),
        ("a/b=mock", "letters, digits"),
        ("x=", "ARGS is empty"),
        ("x=sglang --model m", "unknown engine 'sglang'"),
        ("x=http://127.0.0.1:1 --max-num-seqs 4", "takes no flags"),
        ("x=ftp://host", "--url must be http"),
        ("x=vllm --max-num-seqs 4", "needs --model"),
        ("x=mock --model 'unclosed", "cannot split"),
    ],
)
def test_a_bad_candidate_says_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_candidates([spec])


def test_candidates_parse_urls_and_engines_and_refuse_a_name_twice() -> None:
    got = parse_candidates(
        ["a=http://127.0.0.1:9/", "b=mock --speedup-ratio 20", "c=vllm --model=/m --dtype float"]
    )
    assert [(c.name, c.kind, c.args) for c in got] == [
        ("a", "url", ("http://127.0.0.1:9/",)),
        ("b", "mock", ("--speedup-ratio", "20")),
        ("c", "vllm", ("--model=/m", "--dtype", "float")),
    ]
    with pytest.raises(ConfigError, match="'a' is given twice"):
        parse_candidates(["a=mock", "a=mock --speedup-ratio 2"])


def test_profile_cli_refuses_url_with_candidates_and_json_with_several(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["profile", "--url", "http://127.0.0.1:9", "--candidate", "a=mock"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["profile", "--candidate", "a=mock", "--candidate", "b=mock", "--json", "-"]) == 2
    assert "--out DIR" in capsys.readouterr().err


def test_candidates_are_started_profiled_stopped_and_planned_among(
    server: MockServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two mocks kvferry starts, a running one by URL, and one that cannot start: each profiled
    in turn, the plan picks among the candidates by name, the broken one is reported and the
    exit status says so."""
    small = "--max-model-len 2048 --num-blocks 512"
    out = tmp_path / "cands"
    rc = main([
        "profile", "--granularity", "3", "--concurrency-points", "1", "--decode-osl", "6",
        "--warmup-requests", "1", "--startup-timeout", "60", "--out", str(out),
        "--candidate", f"fast=mock --speedup-ratio 40 {small}",
        "--candidate", f"slow=mock --speedup-ratio 10 {small}",
        "--candidate", f"running={server.url}",
        "--candidate", "broken=mock --num-blocks 0",
        "--ttft", "1000", "--itl", "1000", "--quiet",
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 1, captured.out + captured.err
    fast, slow, running = (read_profile(out / n) for n in ("fast", "slow", "running"))
    assert fast.candidate.startswith("fast=mock") and running.candidate == f"running={server.url}"
    assert fast.max_context == slow.max_context == 2048 and running.max_context == 4096
    assert len(fast.prefill) == len(slow.prefill) == 3 and fast.decode and slow.decode
    broken = read_profile(out / "broken")
    assert not broken.prefill and "candidate broken" in broken.aborted
    assert "num_blocks" in broken.aborted  # the mock's own error, quoted
    assert "error: candidate broken" in captured.err
    assert "SLA met" in captured.out
    assert re.search(r"^prefill: (fast|slow|running) at ISL", captured.out, re.MULTILINE)
    assert re.search(r"^decode: (fast|slow|running) at ", captured.out, re.MULTILINE)
    for name in ("fast", "slow", "running", "broken"):
        assert f"candidate {name}: {name}=" in captured.out
    # the mocks it started are gone: their ports refuse
    assert fast.url != slow.url and not _answers(fast.url) and not _answers(slow.url)


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=2):
            return True
    except OSError:
        return False
