"""The profile run: ``ProfileOptions`` -> :func:`run` -> :class:`ProfileReport`.

Owns learning the engine's limits (:func:`engine_limits`: max context from ``/v1/models``, KV
capacity from ``/kv/stats`` or vLLM's ``/metrics``) and measuring the points, each one a run of
the endpoint bench (:func:`kvferry.bench.endpoint.harness.run`: its client, its worker process,
its unique prompts). Nothing here prints; the caller's ``progress`` sees each point.

- Warm-up: the first point of each mode sends ``warmup_requests`` uncounted requests first, so
  no point is measured cold (the endpoint bench's preflight request precedes every point too).
- Prefix caching is defeated: every point runs with its own seed, so no two requests of the
  profile share a prompt prefix (the endpoint bench draws each request's words from (seed,
  level, index)).
- A point whose requests fail (a timeout: each request may take ``point_timeout_s`` divided by
  the point's waves of requests) is skipped and recorded; the profile goes on.
- An engine that goes away (the endpoint bench cannot reach it) ends the profile: the points
  measured so far are kept and ``aborted`` says why.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from kvferry.bench.endpoint import harness as endpoint
from kvferry.bench.endpoint.aggregate import RunMetrics
from kvferry.bench.profile import decode, prefill
from kvferry.bench.profile.options import ProfileError, ProfileOptions
from kvferry.bench.profile.report import DecodePoint, PrefillPoint, ProfileReport, SkippedPoint

__all__ = ["EngineLimits", "ProfileProgress", "engine_limits", "run"]

INFO_TIMEOUT_S = 10.0
SEED_STRIDE = 7919
"""Each point's prompt seed is the profile's seed plus this times the point's number."""
_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{([^}]*)\}", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class ProfileProgress:
    """The point about to run (``done`` points finished of ``total`` planned)."""

    mode: str
    label: str
    done: int
    total: int


ProgressFn = Callable[[ProfileProgress], None]


@dataclass(frozen=True)
class EngineLimits:
    max_context: int
    max_kv_tokens: int
    kv_source: str


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=INFO_TIMEOUT_S) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise ProfileError(
            f"cannot reach {url}: {getattr(e, 'reason', e)}; is the server running there? "
            "(check --url)"
        ) from e


def _kv_from_stats(base: str) -> int | None:
    status, body = _get(base + "/kv/stats")
    if status != 200:
        return None
    try:
        stats = json.loads(body)
        return int(stats["num_blocks"]) * int(stats["block_size"])
    except (ValueError, KeyError, TypeError):
        return None


def _kv_from_metrics(base: str) -> int | None:
    status, body = _get(base + "/metrics")
    if status != 200:
        return None
    found = _CACHE_INFO.search(body.decode(errors="replace"))
    if found is None:
        return None
    labels = dict(_LABEL.findall(found.group(1)))
    try:
        return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
    except (KeyError, ValueError):
        return None


def engine_limits(options: ProfileOptions) -> EngineLimits:
    """The max context and KV capacity: the flags where given, else asked of the server.

    Raises:
        ProfileError: the server cannot be reached, or does not say (name the flag to give).
    """
    base = endpoint.ServeBenchOptions(url=options.url).base_url()
    max_context = options.max_context
    if max_context is None:
        status, body = _get(base + "/v1/models")
        try:
            max_context = int(json.loads(body)["data"][0]["max_model_len"])
        except (ValueError, KeyError, TypeError, IndexError):
            raise ProfileError(
                f"{base}/v1/models (HTTP {status}) gives no max_model_len; give --max-context N"
            ) from None
    kv, source = options.max_kv_tokens, "--max-kv-tokens"
    if kv is None and options.decode:
        kv, source = _kv_from_stats(base), "/kv/stats"
        if kv is None:
            kv, source = _kv_from_metrics(base), "/metrics cache_config_info"
        if kv is None:
            raise ProfileError(
                f"{base} tells no KV capacity (no /kv/stats, no vllm:cache_config_info in "
                "/metrics); give --max-kv-tokens N"
            )
    return EngineLimits(max_context, kv or 0, source if kv else "")


class _Aborted(Exception):
    pass


@dataclass
class _Point:
    metrics: RunMetrics | None
    reason: str


class _Runner:
    def __init__(self, options: ProfileOptions, report: ProfileReport) -> None:
        self.options = options
        self.report = report
        self.count = 0
        self.warm_modes: set[str] = set()

    def measure(self, mode: str, isl: int, osl: int, concurrency: int, requests: int) -> _Point:
        o = self.options
        self.count += 1
        warmup = 0 if mode in self.warm_modes else o.warmup_requests
        self.warm_modes.add(mode)
        waves = math.ceil(requests / concurrency) + (math.ceil(warmup / concurrency))
        bench = endpoint.ServeBenchOptions(
            url=o.url,
            model=o.model or self.report.model,
            tokenizer=o.tokenizer,
            concurrency=(concurrency,),
            request_count=requests,
            warmup_requests=warmup,
            isl=isl,
            osl=osl,
            seed=o.seed + SEED_STRIDE * self.count,
            request_timeout_s=o.point_timeout_s / max(1, waves),
            workers=1,
        )
        try:
            result = endpoint.run(bench)
        except endpoint.EndpointBenchError as e:
            # the point's own test request may time out behind the engine's last step (a
            # prefill of a point just abandoned): that is a slow point, not a dead engine
            try:
                _get(bench.base_url() + "/v1/models")
            except ProfileError:
                raise _Aborted(str(e)) from e
            return _Point(None, f"the engine is up but the point could not start: {e}")
        if not self.report.model:
            self.report.model = result.model
            self.report.url = result.url
        m = result.cases[0].metrics
        if m.error_count:
            error, _ = m.errors[0]
            failed = f"{m.error_count} of {m.error_count + m.request_count} requests"
            if "timeout" in f"{error.type} {error.message}".lower():
                return _Point(
                    None,
                    f"{failed} timed out (each had {bench.request_timeout_s:.3g} s: "
                    f"--point-timeout {o.point_timeout_s:g} s over {waves} wave(s) of requests)",
                )
            code = f"HTTP {error.code} " if error.code is not None else ""
            return _Point(None, f"{failed} failed ({code}{error.type}: {error.message})")
        return _Point(m, "")


def _value(m: RunMetrics, tag: str, stat: str) -> float:
    v = m.value(tag, stat)
    return math.nan if v is None else v


def _prefill(
    runner: _Runner, limits: EngineLimits, progress: ProgressFn | None, total: int
) -> None:
    o = runner.options
    report = runner.report
    todo = prefill.base_isls(limits.max_context, o.granularity, o.prefill_osl)
    tried: set[int] = set()
    while len(tried) < o.granularity:
        if not todo:
            nxt = prefill.next_isl([(p.isl, p.ttft_avg_ms) for p in report.prefill])
            if nxt is None or nxt in tried:
                break
            todo = [nxt]
        isl = todo.pop(0)
        tried.add(isl)
        if progress is not None:
            progress(ProfileProgress("prefill", f"prefill isl {isl}", _done(report), total))
        point = runner.measure("prefill", isl, o.prefill_osl, 1, o.prefill_requests)
        if point.metrics is None:
            report.skipped.append(SkippedPoint("prefill", f"isl {isl}", point.reason))
            continue
        m = point.metrics
        report.prefill.append(
            PrefillPoint(
                isl=isl,
                ttft_avg_ms=_value(m, "time_to_first_token", "avg"),
                ttft_p50_ms=_value(m, "time_to_first_token", "p50"),
                requests=m.request_count,
            )
        )
    report.prefill.sort(key=lambda p: p.isl)


def _decode(runner: _Runner, limits: EngineLimits, progress: ProgressFn | None, total: int) -> None:
    o = runner.options
    report = runner.report
    for cell in _cells(o, limits):
        label = f"decode isl {cell.isl} x {cell.concurrency}"
        if progress is not None:
            progress(ProfileProgress("decode", label, _done(report), total))
        requests = max(2, cell.concurrency)
        point = runner.measure("decode", cell.isl, o.decode_osl, cell.concurrency, requests)
        if point.metrics is None:
            report.skipped.append(SkippedPoint("decode", label, point.reason))
            continue
        m = point.metrics
        report.decode.append(
            DecodePoint(
                isl=cell.isl,
                osl=o.decode_osl,
                concurrency=cell.concurrency,
                kv_usage=(cell.isl + o.decode_osl / 2) * cell.concurrency / limits.max_kv_tokens,
                itl_avg_ms=_value(m, "inter_token_latency", "avg"),
                itl_p50_ms=_value(m, "inter_token_latency", "p50"),
                tokens_per_s=_value(m, "output_token_throughput", "avg"),
                requests=m.request_count,
            )
        )


def _cells(o: ProfileOptions, limits: EngineLimits) -> list[decode.DecodeCell]:
    return decode.decode_grid(
        limits.max_context,
        limits.max_kv_tokens,
        o.decode_osl,
        max(3, o.granularity // 3),
        o.concurrency_points,
        o.max_concurrency,
    )


def _done(report: ProfileReport) -> int:
    return len(report.prefill) + len(report.decode) + len(report.skipped)


def planned_points(options: ProfileOptions, limits: EngineLimits) -> int:
    """Points the profile plans (prefill: up to the granularity; decode: the grid)."""
    total = options.granularity if options.prefill else 0
    return total + (len(_cells(options, limits)) if options.decode else 0)


def run(options: ProfileOptions, progress: ProgressFn | None = None) -> ProfileReport:
    """Profile the engine at ``options.url``.

    Raises:
        ConfigError: a bad option.
        ProfileError: the engine cannot be reached at the start, or does not tell its limits.
    """
    options.validate()
    started = time.time()
    limits = engine_limits(options)
    report = ProfileReport(
        options=options,
        url=options.url,
        model=options.model,
        max_context=limits.max_context,
        max_kv_tokens=limits.max_kv_tokens,
        kv_source=limits.kv_source,
        started_at=started,
    )
    runner = _Runner(options, report)
    total = planned_points(options, limits)
    if options.decode:
        bound = [c for c in _cells(options, limits) if c.kv_bound and c.concurrency == c.clamp]
        if bound:
            report.notes.append(
                "decode concurrency clamped by the KV capacity "
                f"({limits.max_kv_tokens:,} tokens from {limits.kv_source}): "
                + ", ".join(f"isl {c.isl} at {c.clamp}" for c in bound)
            )
    try:
        if options.prefill:
            _prefill(runner, limits, progress, total)
        if options.decode:
            _decode(runner, limits, progress, total)
    except _Aborted as e:
        report.aborted = (
            f"the engine went away after {_done(report)} point(s): {e}; the points measured "
            "so far are kept"
        )
        report.notes.append(report.aborted)
    if report.skipped:
        report.notes.append(f"{len(report.skipped)} point(s) skipped (see skipped)")
    report.ended_at = time.time()
    return report
