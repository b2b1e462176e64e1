"""The plan checked on calibrated simulated engines (``kvferry plan --profile DIR --simulate``):
fleets of 1, 2, ... ``max_instances`` mocks calibrated from the profile
(:mod:`kvferry.serving.mock.calibrate`) behind ``kvferry serve router``, per routing mode, at
the target load; the smallest fleet whose TTFT and ITL p50 meet the SLA.

``SimulateOptions`` -> :func:`run` -> :class:`SimulationReport` (tool ``plan``; ``kvferry plan``
without ``--simulate`` writes one too, with no options and no runs, so the report reads both the
same way). Each run is a
fresh fleet (``kvferry serve mock --profile DIR --speedup-ratio S``, the profile's KV capacity
and max context) and a fresh router, and ``kvferry bench serve``
(:func:`kvferry.bench.endpoint.harness.run`) through it: ``requests`` requests of ``isl`` +
``osl`` tokens, Poisson arrivals at ``request_rate x S`` (the load in simulated time), unique
prompts. A mode stops at the first fleet that meets the SLA (``all_fleets``: it runs every
size).

Time: the mocks run ``S`` times faster than the profiled engine, so every measured time is
scaled back by ``S``. The router and the client are not sped up: by default ``S`` is chosen
for the load (:meth:`SimulateOptions.speedup`, at most 10x), and a run whose ITL falls under
the model's fastest decode step (tokens bunched by a router or client that fell behind) is
noted. What a request spends outside the model (HTTP, the router's hop, the client) is not
sped up and would be multiplied by ``S`` too; it is measured first (the probe: a
few lone requests through a fleet of one, against the model's own TTFT and ITL of a lone request
from the same fit) and subtracted before scaling: ``engine ms = (measured ms - overhead) x S``.
The profile's own times already hold its engine's HTTP time (in the fitted base terms).

The mocks' clocks say when the machine could not keep their time (``slipped`` seconds, summed
over a run's mocks: :mod:`kvferry.serving.mock.clock`); a run that gave up more than 1% of its
duration is noted, and a lower ``S`` is the fix. Nothing here prints; the caller's
``progress`` sees each run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from kvferry.bench.endpoint.aggregate import RunMetrics
from kvferry.bench.endpoint.harness import ProgressUpdate, ServeBenchOptions
from kvferry.bench.endpoint.harness import run as run_serve
from kvferry.bench.profile.options import ProfileError
from kvferry.bench.profile.select import Plan
from kvferry.bench.result import BenchResult
from kvferry.bench.router.fleet import ServeProcess, router_stats
from kvferry.config.models import MockConfig
from kvferry.errors import ConfigError

__all__ = [
    "MODES",
    "SimProgress",
    "SimRun",
    "SimulateOptions",
    "SimulationReport",
    "num",
    "run",
]

MODES = ("kv", "round-robin", "random")
"""The router's modes (``router.mode``)."""
PROBE_REQUESTS = 5
MAX_AUTO_SPEEDUP = 10.0
SIM_TOKENS_PER_S = 60_000.0
"""Tokens per second (prompt + output, in simulated time) the automatic speed-up keeps the
load under. The mocks are sped up, the router and the client are not: on this 2-core VM (loaded
by other work) a KV-mode router held 20 requests/s of 1,000 + 50 tokens at 3x (63,000 tokens/s)
and fell seconds behind at 10x (210,000), bunching tokens (an ITL p50 of 0.2 ms)."""
SLIP_SHARE = 0.01
"""A run whose mocks gave up more than this share of its duration is noted (a few ms of a
stalled host are not worth a note; a machine that cannot keep the speed-up is)."""
ITL_FLOOR = 0.8
"""A run whose ITL p50 is under this share of the model's fastest decode step at the load's
context had its tokens bunched outside the engines: noted as not to be trusted."""
SYNC_TIMEOUT_S = 10.0
_SLIP = "kvferry_mock_clock_slip_seconds_total"


@dataclass(frozen=True, kw_only=True)
class SimulateOptions:
    """Everything ``kvferry plan --simulate`` takes (its flags, one field each)."""

    profile: str
    """A ``kvferry profile --out`` directory: the engine the mocks are calibrated to."""
    ttft_ms: float
    itl_ms: float
    request_rate: float
    """The load in requests/s of the profiled engine's (real) time."""
    isl: int
    osl: int
    max_instances: int = 4
    """Fleets of 1 .. this many mocks are tried, per mode."""
    modes: tuple[str, ...] = ("kv", "round-robin")
    speedup_ratio: float | None = None
    """The mocks run this much faster than the profiled engine; times are scaled back. None:
    :meth:`speedup` picks it for the load."""
    requests: int = 100
    """Requests per run."""
    block_size: int = 16
    """Tokens per KV block of the mocks and the router."""
    seed: int = 0
    all_fleets: bool = False
    """Run every fleet size up to ``max_instances``, not only up to the first that meets the
    SLA (to compare each size with measured fleets)."""
    startup_timeout_s: float = 60.0
    request_timeout_s: float = 600.0

    def validate(self) -> None:
        """Check every option.

        Raises:
            ConfigError: naming the flag, the value and what would be valid.
        """
        if not self.modes:
            raise ConfigError(f"--router-modes is empty: give one or more of {', '.join(MODES)}")
        for mode in self.modes:
            if mode not in MODES:
                raise ConfigError(
                    f"--router-modes: unknown mode {mode!r}; valid: {', '.join(MODES)}"
                )
        if len(set(self.modes)) != len(self.modes):
            raise ConfigError(f"--router-modes names a mode twice: {','.join(self.modes)}")

        def pos(v: float) -> bool:
            return math.isfinite(v) and v > 0

        checks: list[tuple[str, object, bool, str]] = [
            ("--ttft", self.ttft_ms, pos(self.ttft_ms), "> 0 ms"),
            ("--itl", self.itl_ms, pos(self.itl_ms), "> 0 ms"),
            ("--request-rate", self.request_rate, pos(self.request_rate), "> 0 requests/s"),
            ("--isl", self.isl, self.isl >= 1, ">= 1"),
            ("--osl", self.osl, self.osl >= 2, ">= 2 (an ITL needs two tokens)"),
            ("--max-instances", self.max_instances, 1 <= self.max_instances <= 64, "1..64"),
            (
                "--speedup-ratio",
                self.speedup_ratio,
                self.speedup_ratio is None or pos(self.speedup_ratio),
                "> 0",
            ),
            ("--sim-requests", self.requests, self.requests >= 1, ">= 1"),
            ("--block-size", self.block_size, self.block_size >= 1, ">= 1"),
            ("--seed", self.seed, self.seed >= 0, ">= 0"),
        ]
        for flag, value, ok, valid in checks:
            if not ok:
                raise ConfigError(f"{flag} must be {valid}, got {value!r}")

    def speedup(self) -> float:
        """``speedup_ratio``, or when None the most (up to :data:`MAX_AUTO_SPEEDUP`, at least
        1) that keeps the simulated load's prompt and output tokens within
        :data:`SIM_TOKENS_PER_S` (the router and the client are not sped up)."""
        if self.speedup_ratio is not None:
            return self.speedup_ratio
        tokens = self.request_rate * (self.isl + self.osl)
        return max(1.0, min(MAX_AUTO_SPEEDUP, math.floor(SIM_TOKENS_PER_S / tokens)))


@dataclass(kw_only=True)
class SimRun:
    """One fleet at the load: the profiled engine's times (scaled back), and the raw ones."""

    mode: str
    instances: int
    requests: int = 0
    errors: int = 0
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    meets: bool = False
    """No request failed, TTFT p50 <= target and ITL p50 <= target."""
    slipped_s: float = 0.0
    """Model time the mocks gave up because the machine fell behind them (0: they kept it)."""
    requests_per_instance: list[int] = field(default_factory=list)
    metrics: RunMetrics | None = None
    """The endpoint bench's aggregates, in simulated (sped-up) time, before the scaling."""


@dataclass(kw_only=True)
class SimulationReport(BenchResult):
    """Fleets of calibrated mocks at a load: which smallest one meets the SLA, per mode; or
    the analytic plan alone (``options`` None, no runs: ``kvferry plan`` without
    ``--simulate``), so one tool's results have one class."""

    tool = "plan"

    options: SimulateOptions | None = None
    """The simulation's options; None when nothing was simulated (the plan alone)."""
    profiles: list[str] = field(default_factory=list)
    """The ``--profile`` directories the plan read, one per candidate."""
    speedup_ratio: float = 1.0
    """The speed-up the mocks ran at (``options.speedup_ratio`` or the automatic one)."""
    profile_name: str = ""
    """The profile directory's name (the candidate's, as ``kvferry plan`` names it)."""
    max_kv_tokens: int = 0
    max_context: int = 0
    overhead_ttft_ms: float = 0.0
    """Per request, outside the model, in simulated time (subtracted before scaling by S)."""
    overhead_itl_ms: float = 0.0
    runs: list[SimRun] = field(default_factory=list)
    plan: Plan | None = None
    """What the profile's interpolation predicts (``kvferry plan`` without ``--simulate``)."""

    def smallest(self, mode: str) -> SimRun | None:
        """The smallest fleet of ``mode`` that met the SLA, None when none did."""
        return next((r for r in self.runs if r.mode == mode and r.meets), None)

    def lines(self) -> list[str]:
        """What the simulation concludes, per mode."""
        o = self.options
        if o is None:
            return []
        out = []
        for mode in o.modes:
            best = self.smallest(mode)
            if best is not None:
                out.append(
                    f"{mode}: {best.instances} instance(s) meet TTFT p50 <= {o.ttft_ms:g} ms and "
                    f"ITL p50 <= {o.itl_ms:g} ms at {o.request_rate:g} requests/s: TTFT p50 "
                    f"{_ms(best.ttft_p50_ms)} (p99 {_ms(best.ttft_p99_ms)}), ITL p50 "
                    f"{_ms(best.itl_p50_ms)} (p99 {_ms(best.itl_p99_ms)})"
                )
                continue
            mine = [r for r in self.runs if r.mode == mode]
            last = mine[-1] if mine else None
            tail = (
                f"; at {last.instances}: TTFT p50 {_ms(last.ttft_p50_ms)}, ITL p50 "
                f"{_ms(last.itl_p50_ms)}, {last.errors} failed"
                if last is not None
                else ""
            )
            out.append(
                f"{mode}: infeasible: no fleet of up to {o.max_instances} instance(s) meets the "
                f"SLA at {o.request_rate:g} requests/s{tail}"
            )
        return out


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{num(v)} ms"


def num(v: float) -> str:
    """A time in ms as the tables print it: 3 significant digits, whole ms from 1,000."""
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


@dataclass(frozen=True)
class SimProgress:
    """Where a simulation is: run ``index`` (0-based) of at most ``total``, its mode and fleet
    size (mode ``probe`` for the overhead probe), and the running endpoint bench's figures."""

    index: int
    total: int
    mode: str
    instances: int
    serve: ProgressUpdate | None = None


SimProgressFn = Callable[[SimProgress], None]


def _fleet(options: SimulateOptions, n: int, mode: str, stack: ExitStack) -> tuple[list[str], str]:
    """``n`` calibrated mocks and a router in front of them; their URLs and the router's."""
    flags = [
        "--profile", options.profile,
        "--speedup-ratio", f"{options.speedup():g}",
        "--block-size", str(options.block_size),
    ]  # fmt: skip

    def start(_: int) -> ServeProcess:
        return ServeProcess("mock", flags, timeout_s=options.startup_timeout_s)

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(start, i) for i in range(n)]
    failure: BaseException | None = None
    urls = []
    for future in futures:
        try:
            urls.append(stack.enter_context(future.result()).url)
        except BaseException as e:  # every started mock is stopped by the stack
            failure = failure or e
    if failure is not None:
        raise failure
    args = ["--router-mode", mode, "--block-size", str(options.block_size)]
    for url in urls:
        args += ["--worker", url]
    router = stack.enter_context(ServeProcess("router", args, timeout_s=options.startup_timeout_s))
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while time.monotonic() < deadline:  # the router reads every mock's KV events first
        if all(w["kv_source"] != "connecting" for w in router_stats(router.url)["workers"]):
            break
        time.sleep(0.05)
    return urls, router.url


def _slipped(urls: list[str]) -> float:
    """Seconds of model time the mocks gave up (their ``/metrics``), summed."""
    import urllib.request

    total = 0.0
    for url in urls:
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(url + "/metrics", timeout=10) as r,
        ):
            for line in r.read().decode().splitlines():
                if line.startswith(_SLIP + " "):
                    total += float(line.split()[-1])
    return total


def _serve(
    options: SimulateOptions,
    url: str,
    *,
    rate: float | None,
    requests: int,
    seed: int,
    progress: Callable[[ProgressUpdate], None] | None,
) -> RunMetrics:
    bench = ServeBenchOptions(
        url=url,
        concurrency=(1,) if rate is None else (),
        request_rate=() if rate is None else (rate,),
        request_count=requests,
        isl=options.isl,
        osl=options.osl,
        seed=seed,
        request_timeout_s=options.request_timeout_s,
    )
    return run_serve(bench, progress).cases[0].metrics


def _model_lone_request(options: SimulateOptions) -> tuple[float, float]:
    """The calibrated model's TTFT and ITL of one request alone, in the profile's ms."""
    from kvferry.serving.mock.calibrate import (
        fit_sla_profile,
        profile_limits,
        read_sla_profile,
        request_features,
    )

    profile = read_sla_profile(options.profile)
    config = profile_limits(MockConfig(block_size=options.block_size), profile, set())
    if options.isl + options.osl > config.model_len:
        raise ConfigError(
            f"--isl {options.isl} + --osl {options.osl} exceeds the profiled engine's max "
            f"context {config.model_len} tokens"
        )
    t = fit_sla_profile(profile, config)
    coef = [
        t.prefill_base_ms, t.prefill_per_token_ms, t.prefill_quadratic_ms,
        t.decode_base_ms, t.decode_per_seq_ms, t.decode_per_context_token_ms,
    ]  # fmt: skip
    ttft, itl = request_features(config, options.isl, options.osl, 1)
    return (
        sum(a * b for a, b in zip(ttft, coef, strict=True)),
        sum(a * b for a, b in zip(itl, coef, strict=True)),
    )


def _scaled(value: float | None, overhead: float, s: float) -> float | None:
    return None if value is None else max(0.0, value - overhead) * s


def run(
    options: SimulateOptions, progress: SimProgressFn | None = None, *, plan: Plan | None = None
) -> SimulationReport:
    """The probe, then each mode's fleets from 1 instance up to the first that meets the SLA.

    Args:
        plan: the analytic plan to keep beside the simulation (``kvferry plan``'s).

    Raises:
        ConfigError: a bad option, or a load that does not fit the profiled engine.
        ProfileError: the profile cannot be read.
        RouterBenchError: a mock or the router did not start.
        EndpointBenchError: the router refused the endpoint bench's test request.
    """
    from kvferry.bench.profile.npz import read_profile

    options.validate()
    source = read_profile(options.profile)
    if not source.prefill or not source.decode:
        raise ProfileError(
            f"--profile {options.profile}: --simulate needs prefill and decode points (kvferry "
            "profile --mode both)"
        )
    report = SimulationReport(
        options=options,
        profiles=[options.profile],
        profile_name=Path(options.profile).name or options.profile,
        max_kv_tokens=source.max_kv_tokens,
        max_context=source.max_context,
        plan=plan,
        started_at=time.time(),
    )
    s = report.speedup_ratio = options.speedup()
    total = 1 + len(options.modes) * options.max_instances
    model_ttft, model_itl = _model_lone_request(options)

    def teller(where: SimProgress) -> Callable[[ProgressUpdate], None]:
        def tell(update: ProgressUpdate) -> None:
            if progress is not None:
                progress(SimProgress(where.index, where.total, where.mode, where.instances, update))

        if progress is not None:
            progress(where)
        return tell

    with ExitStack() as stack:
        _, url = _fleet(options, 1, "round-robin", stack)
        tell = teller(SimProgress(0, total, "probe", 1))
        probe = _serve(
            options, url, rate=None, requests=PROBE_REQUESTS, seed=options.seed, progress=tell
        )
    ttft = probe.value("time_to_first_token", "p50")
    itl = probe.value("inter_token_latency", "p50")
    report.overhead_ttft_ms = max(0.0, (ttft or 0.0) - model_ttft / s)
    report.overhead_itl_ms = max(0.0, (itl or 0.0) - model_itl / s)
    index = 1
    for mode in options.modes:
        for n in range(1, options.max_instances + 1):
            tell = teller(SimProgress(index, total, mode, n))
            index += 1
            with ExitStack() as stack:
                urls, url = _fleet(options, n, mode, stack)
                rate = options.request_rate * s
                m = _serve(
                    options, url, rate=rate, requests=options.requests, seed=options.seed + 1,
                    progress=tell,
                )  # fmt: skip
                slipped = _slipped(urls)
                per = [int(w["requests"]) for w in router_stats(url)["workers"]]
            o_t, o_i = report.overhead_ttft_ms, report.overhead_itl_ms
            sim = SimRun(
                mode=mode,
                instances=n,
                requests=m.request_count,
                errors=m.error_count,
                ttft_p50_ms=_scaled(m.value("time_to_first_token", "p50"), o_t, s),
                ttft_p99_ms=_scaled(m.value("time_to_first_token", "p99"), o_t, s),
                itl_p50_ms=_scaled(m.value("inter_token_latency", "p50"), o_i, s),
                itl_p99_ms=_scaled(m.value("inter_token_latency", "p99"), o_i, s),
                slipped_s=slipped,
                requests_per_instance=per,
                metrics=m,
            )
            sim.meets = (
                sim.errors == 0
                and sim.ttft_p50_ms is not None
                and sim.itl_p50_ms is not None
                and sim.ttft_p50_ms <= options.ttft_ms
                and sim.itl_p50_ms <= options.itl_ms
            )
            report.runs.append(sim)
            if slipped > SLIP_SHARE * max(m.duration_s, 1e-9):
                report.notes.append(
                    f"{mode} x {n}: the mocks fell {slipped:.3g} s behind their model (this "
                    f"machine could not keep --speedup-ratio {s:g}); lower it for this run's "
                    "times to hold"
                )
            if sim.errors:
                report.notes.append(f"{mode} x {n}: {sim.errors} request(s) failed")
            if sim.itl_p50_ms is not None and sim.itl_p50_ms < ITL_FLOOR * model_itl:
                report.notes.append(
                    f"{mode} x {n}: ITL p50 {sim.itl_p50_ms:.3g} ms is under the model's fastest "
                    f"decode step ({model_itl:.3g} ms): tokens were bunched outside the engines "
                    f"(the router or the client fell behind at {s:g}x); not to be trusted, "
                    "lower --speedup-ratio"
                )
            if sim.meets and not options.all_fleets:
                break
    report.notes.append(
        f"times are the profiled engine's: measured at {s:g}x, minus {report.overhead_ttft_ms:.3g}"
        f" ms (TTFT) and {report.overhead_itl_ms:.3g} ms (ITL) spent outside the model per "
        f"request (the probe), times {s:g}"
    )
    report.ended_at = time.time()
    return report
