"""What the vLLM connector counts: its statistics' keys and their Prometheus names.

Owns the names only; the connector (:mod:`kvferry.serving.vllm.connector`) counts and registers
them. This
module imports neither torch nor vLLM, so that tools and tests (the Grafana dashboard's check)
can read the names without an inference engine.

Where a connector counter means what a store's does, it has the store's name, so that one
PromQL expression reads a store server, an embedded store and the connector alike:
``kvferry_store_{lookups,lookup_blocks,hit_blocks,gets,get_blocks,get_hit_blocks,puts,
put_blocks}_total`` count every request the connector had for the store, answered or not (one
it could not make, the store being down or skipped after a failure, found nothing). What came
of them is ``kvferry_connector_*_total``: tokens reported to vLLM as hits, blocks and bytes
loaded into vLLM's KV cache and saved from it, seconds spent, failures.

In vLLM's ``/metrics`` each counter carries vLLM's labels (``model_name``, ``engine``); the
same keys appear in vLLM's periodic "KV Transfer metrics" log line.
"""

from __future__ import annotations

from typing import Final

PROM_NAMES: Final[dict[str, tuple[str, str]]] = {
    # key: (Prometheus name without "_total", help)
    "lookups": (
        "kvferry_store_lookups",
        "Store lookups the connector made (one per new request).",
    ),
    "lookup_blocks": ("kvferry_store_lookup_blocks", "Blocks the connector's lookups asked for."),
    "hit_blocks": ("kvferry_store_hit_blocks", "Leading blocks the connector's lookups found."),
    "gets": ("kvferry_store_gets", "Store loads (get calls) the connector made."),
    "get_blocks": ("kvferry_store_get_blocks", "Blocks the connector's loads asked for."),
    "get_hit_blocks": ("kvferry_store_get_hit_blocks", "Blocks the connector's loads found."),
    "puts": ("kvferry_store_puts", "Store saves (put calls) the connector made."),
    "put_blocks": ("kvferry_store_put_blocks", "Blocks the connector offered to the store."),
    "lookup_errors": (
        "kvferry_connector_lookup_errors",
        "Lookups that failed or were skipped after a failure (read as misses).",
    ),
    "hit_tokens": (
        "kvferry_connector_hit_tokens",
        "Prompt tokens reported to vLLM as external prefix-cache hits.",
    ),
    "load_blocks": (
        "kvferry_connector_load_blocks",
        "Blocks loaded from the store into vLLM's KV cache.",
    ),
    "load_bytes": (
        "kvferry_connector_load_bytes",
        "Bytes loaded from the store into vLLM's KV cache.",
    ),
    "load_seconds": (
        "kvferry_connector_load_seconds",
        "Seconds spent loading (store get and the copy into vLLM's KV cache).",
    ),
    "load_failed_blocks": (
        "kvferry_connector_load_failed_blocks",
        "Blocks a load could not deliver (missing, short or failed); vLLM recomputes them.",
    ),
    "load_errors": (
        "kvferry_connector_load_errors",
        "Loads during which the store failed.",
    ),
    "save_blocks": (
        "kvferry_connector_save_blocks",
        "Blocks saved from vLLM's KV cache into the store.",
    ),
    "save_bytes": (
        "kvferry_connector_save_bytes",
        "Bytes saved from vLLM's KV cache into the store.",
    ),
    "save_seconds": (
        "kvferry_connector_save_seconds",
        "Seconds spent saving (the copy out of vLLM's KV cache and the store put).",
    ),
    "save_existing_blocks": (
        "kvferry_connector_save_existing_blocks",
        "Blocks a save offered that the store held already.",
    ),
    "save_rejected_blocks": (
        "kvferry_connector_save_rejected_blocks",
        "Blocks the store refused (no space).",
    ),
    "save_skipped_blocks": (
        "kvferry_connector_save_skipped_blocks",
        "Blocks not saved: computed from a prefix that failed to load, or the store was down.",
    ),
    "save_errors": ("kvferry_connector_save_errors", "Saves during which the store failed."),
    # P/D, the direct data plane (kvferry.serving.vllm.handoff)
    "pd_recvs": (
        "kvferry_connector_pd_recvs",
        "Hand-offs a decode instance read from a prefill instance (one per request).",
    ),
    "pd_recv_blocks": (
        "kvferry_connector_pd_recv_blocks",
        "Blocks read from prefill instances into this decode instance's KV cache.",
    ),
    "pd_recv_bytes": (
        "kvferry_connector_pd_recv_bytes",
        "Bytes read from prefill instances into this decode instance's KV cache.",
    ),
    "pd_recv_seconds": (
        "kvferry_connector_pd_recv_seconds",
        "Seconds from a hand-off's start to its RELEASE (the reads and the release call).",
    ),
    "pd_recv_failed_blocks": (
        "kvferry_connector_pd_recv_failed_blocks",
        "Hand-off blocks that could not be read (prefill gone, timeout, lease lost); "
        "vLLM recomputes them.",
    ),
    "pd_sends": (
        "kvferry_connector_pd_sends",
        "Finished prefills whose KV this prefill instance staged for a decode instance.",
    ),
    "pd_released": (
        "kvferry_connector_pd_released",
        "Staged hand-offs a decode instance released (read, or cached on its side).",
    ),
    "pd_expired": (
        "kvferry_connector_pd_expired",
        "Staged hand-offs whose lease (pd_lease) ran out before a decode instance released them.",
    ),
    "pd_dropped": (
        "kvferry_connector_pd_dropped",
        "Hand-offs not staged for want of room in the staging buffer (pd_buffer_blocks).",
    ),
}
"""Each statistic's key -> (Prometheus counter name without ``_total``, help)."""

STAT_KEYS: Final = tuple(PROM_NAMES)
"""The statistics the workers and the scheduler report; all are sums over an interval."""
