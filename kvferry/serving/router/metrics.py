"""What the router tells about itself: ``GET /router/stats`` (:func:`stats`) and the Prometheus
metrics of ``GET /metrics`` (:class:`Collector`), both read from the router's state when asked.

``/router/stats``: ``{"mode", "temperature", "prefill_weight", "block_size", "model",
"requests", "retries", "unrouted", "prompt_blocks", "hit_blocks", "hit_rate", "pd", "workers":
[{"url", "role", "healthy", "down_reason", "kv_source", "requests", "prompt_blocks", "hit_blocks",
"hit_rate", "errors", "retries", "checks", "in_flight", "active_blocks", "indexed_blocks",
"kv_events", "resyncs", "last_event_id", "event_blocks", "skipped_blocks"}]}``. ``hit_rate`` is
the router's predicted block-weighted hit rate (predicted overlap blocks / full prompt blocks
routed), per worker and overall; ``retries`` per worker counts requests that failed there and
went elsewhere; ``checks`` the /health checks after such a failure; ``unrouted`` counts 503s
for want of a healthy worker; ``kv_source`` is "events", "approx" or "connecting"; for a vLLM
worker read through ``router.vllm_events``, ``event_blocks`` are the blocks its events announced
that the router keyed and ``skipped_blocks`` those it could not key
(:mod:`kvferry.serving.router.vllm_events`), else null and 0.

Metrics: per worker (label ``worker``) counters ``kvferry_router_{requests,prompt_blocks,
hit_blocks,errors,retries,checks,kv_events,kv_resyncs}_total`` and gauges
``kvferry_router_{predicted_hit_rate,in_flight,active_blocks,indexed_blocks,worker_up}``;
``kvferry_router_requests_received_total``, ``kvferry_router_unrouted_total``,
``kvferry_router_http_responses_total{path,status}`` (path "malformed": requests that were not
HTTP), ``kvferry_router_http_connections_closed_total{reason}`` (header_timeout,
too_many_waiting).

Nothing here routes or changes state: :mod:`kvferry.serving.router.server` owns that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvferry.serving.http_front import connections_closed

if TYPE_CHECKING:
    from kvferry.serving.router.server import RouterServer
    from kvferry.serving.router.workers import Worker

__all__ = ["Collector", "stats"]

_PD_HELP = {
    "prefills": "P/D: prefill steps sent to prefill instances (retries included).",
    "prefill_retries": "P/D: prefill steps that failed on one instance and went to another.",
    "prefill_failures": "P/D: requests no prefill instance could prefill (answered 4xx/5xx).",
    "handoffs": "P/D: requests sent to a decode instance with a prefill's KV hand-off.",
    "without_handoff": "P/D: prefills that returned no kv_transfer_params (decode recomputes).",
    "decode_failures": "P/D: requests that failed on every decode instance tried.",
}


class Collector:
    """Reads the router's state at scrape time (module docstring lists the metrics)."""

    def __init__(self, router: RouterServer) -> None:
        self._router = router

    def collect(self) -> Iterable[Metric]:
        router = self._router
        workers = router.pool.workers
        p = "kvferry_router_"
        per_worker: Sequence[tuple[str, str, bool, Callable[[Worker], float]]] = (
            ("requests", "Requests sent to the worker.", True, lambda w: w.stats.requests),
            (
                "prompt_blocks",
                "Full prompt blocks of the requests sent to the worker.",
                True,
                lambda w: w.stats.prompt_blocks,
            ),
            (
                "hit_blocks",
                "Prompt blocks the router predicted the worker held (expected hits).",
                True,
                lambda w: w.stats.hit_blocks,
            ),
            ("errors", "Requests to the worker that failed.", True, lambda w: w.stats.errors),
            (
                "retries",
                "Requests that failed on the worker and were sent to another.",
                True,
                lambda w: w.stats.retries,
            ),
            (
                "checks",
                "Health checks of the worker after a request failed on it.",
                True,
                lambda w: w.stats.checks,
            ),
            ("kv_events", "KV events applied.", True, lambda w: w.events_applied),
            (
                "kv_resyncs",
                "Event stream restarts from a snapshot.",
                True,
                lambda w: w.resyncs,
            ),
            (
                "predicted_hit_rate",
                "Predicted hit blocks / prompt blocks (block-weighted).",
                False,
                lambda w: w.stats.hit_rate,
            ),
            (
                "in_flight",
                "Requests in flight on the worker.",
                False,
                lambda w: router.load.in_flight(w.url),
            ),
            (
                "active_blocks",
                "KV blocks of the requests in flight on the worker (shared prefixes once).",
                False,
                lambda w: router.load.active_blocks(w.url),
            ),
            (
                "indexed_blocks",
                "Blocks the router's index holds for the worker.",
                False,
                lambda w: router.index.blocks(w.url),
            ),
            ("worker_up", "1 while the worker is healthy.", False, lambda w: float(w.healthy)),
        )
        for name, doc, is_counter, value in per_worker:
            family: CounterMetricFamily | GaugeMetricFamily
            if is_counter:
                family = CounterMetricFamily(p + name, doc, labels=["worker"])
            else:
                family = GaugeMetricFamily(p + name, doc, labels=["worker"])
            for w in workers:
                family.add_metric([w.url], value(w))
            yield family
        yield CounterMetricFamily(
            p + "requests_received", "Generation requests received.", value=router.requests
        )
        yield CounterMetricFamily(
            p + "unrouted", "Requests answered 503: no healthy worker.", value=router.unrouted
        )
        if router.config.pd:
            for name, value in dataclasses.asdict(router.pd).items():
                yield CounterMetricFamily(p + "pd_" + name, _PD_HELP[name], value=value)
        http = CounterMetricFamily(
            p + "http_responses", "HTTP responses, by path and status.", labels=["path", "status"]
        )
        for (path, status), n in sorted(router.responses.items()):
            http.add_metric([path, str(status)], n)
        yield http
        yield connections_closed(p, "router", router.front.pending)


def stats(router: RouterServer) -> dict[str, object]:
    """What ``GET /router/stats`` answers (module docstring)."""
    workers = []
    for w in router.pool.workers:
        s = w.stats
        workers.append(
            {
                "url": w.url,
                "role": w.role,
                "healthy": w.healthy,
                "down_reason": w.down_reason,
                "kv_source": w.kv_source,
                "requests": s.requests,
                "prompt_blocks": s.prompt_blocks,
                "hit_blocks": s.hit_blocks,
                "hit_rate": s.hit_rate,
                "errors": s.errors,
                "retries": s.retries,
                "checks": s.checks,
                "in_flight": router.load.in_flight(w.url),
                "active_blocks": router.load.active_blocks(w.url),
                "indexed_blocks": router.index.blocks(w.url),
                "kv_events": w.events_applied,
                "resyncs": w.resyncs,
                "last_event_id": w.last_event_id,
                "event_blocks": w.event_blocks,
                "skipped_blocks": w.skipped_blocks,
            }
        )
    prompt = sum(w.stats.prompt_blocks for w in router.pool.workers)
    hit = sum(w.stats.hit_blocks for w in router.pool.workers)
    return {
        "mode": router.config.mode,
        "temperature": router.config.temperature,
        "prefill_weight": router.config.prefill_weight,
        "block_size": router.config.block_size,
        "model": router.pool.model,
        "requests": router.requests,
        "retries": router.retries,
        "unrouted": router.unrouted,
        "prompt_blocks": prompt,
        "hit_blocks": hit,
        "hit_rate": hit / prompt if prompt else 0.0,
        "pd": dataclasses.asdict(router.pd) if router.config.pd else None,
        "workers": workers,
    }
