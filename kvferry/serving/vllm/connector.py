"""kvferry as a vLLM KV connector (``KVConnectorBase_V1``).

Use it with::

    --kv-transfer-config '{"kv_connector": "KvferryConnector",
        "kv_connector_module_path": "kvferry.serving.vllm.connector", "kv_role": "kv_both",
        "kv_connector_extra_config": {...}}'

``kv_connector_extra_config`` is described in :mod:`kvferry.serving.vllm.config`.

How a request flows:

1. Scheduler, ``get_num_new_matched_tokens``: the prompt's full vLLM blocks are hashed into
   kvferry block keys (:class:`~kvferry.index.BlockHasher`: chained over the token ids, salted
   with the model id, KV dtype, KV shape and the request's ``cache_salt``; the hash is
   ``store.key_hash``, blake2b-128 where tenants must not forge each other's keys) and the store is
   asked for its longest cached prefix. Tokens beyond what vLLM's own prefix cache has are
   reported as external hits, in whole blocks, never the prompt's last token (vLLM must compute
   at least one token to sample from).
2. Scheduler, ``update_state_after_alloc`` / ``build_connector_meta``: the blocks to load (with
   the vLLM block ids they go to) and the newly computed full prompt blocks to save go to the
   workers in :class:`KvferryConnectorMetadata`.
3. Worker, ``start_load_kv`` (before the forward pass; vLLM orders synchronous loads first):
   one batch ``get`` from the store into a staging buffer, then each layer's blocks are written
   into vLLM's paged KV cache. A block that is missing, short or errors is reported through
   ``get_block_ids_with_load_errors`` with every block after it, and vLLM recomputes them;
   the request's saves in that step are dropped, because they were computed from a bad prefix.
4. Worker, ``wait_for_save`` (after the forward pass): the blocks to save are gathered from
   every layer into one contiguous buffer and stored with one batch ``put``.

A kvferry block holds all layers of one vLLM block: for each layer, in sorted layer-name order,
the bytes of ``kv_cache[block_id]`` in logical (row-major) order of vLLM's standardized
per-layer view. The bytes do not depend on how vLLM lays the cache out in memory.

Failures never reach vLLM as exceptions from the connector: a store that errors or times out
makes lookups miss and loads fail (recomputed), saves are skipped, and all of it is counted in
the stats (in vLLM's /metrics under the names of :mod:`kvferry.serving.vllm.metrics`, the
store's own where they mean the same, and in its periodic "KV Transfer metrics" log line).
After a failure the connector leaves the store alone for ``retry_after`` seconds.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from pydantic import SecretStr
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
)

from kvferry.backends import PutStatus
from kvferry.config import KvferryConfig
from kvferry.errors import ConfigError, StorageError
from kvferry.index import BlockHasher
from kvferry.serving.vllm.config import ConnectorSettings, parse_extra_config, store_mode
from kvferry.serving.vllm.handoff import (
    TRANSFER_MODE,
    HandOff,
    HandOffError,
    KvReceiver,
    KvSender,
)
from kvferry.serving.vllm.kv_blocks import KvLayer, gather_blocks, host_staging, scatter_blocks
from kvferry.serving.vllm.stats import (
    ConnectorPromMetrics,
    IntervalCounters,
    KvferryConnectorStats,
)
from kvferry.store import TieredStore
from kvferry.telemetry.prometheus import export_store

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvferry.serving.vllm.connector")

__all__ = ["KvferryConnector", "KvferryConnectorMetadata", "KvferryConnectorStats"]


@dataclass
class TransferSpec:
    """Blocks of one request to load or save: keys, vLLM block ids, depth of the first."""

    req_id: str
    hashes: list[bytes]
    block_ids: list[int]
    depth: int


STORE_MODE = "kvferry-store"
"""``kv_transfer_params["transfer_mode"]`` of a hand-off through the store."""


@dataclass
class PdRecv:
    """A hand-off for a decode worker: read ``handoff``'s blocks ``first, first + 1, ...`` into
    ``block_ids`` (none: the blocks were cached here, only release them)."""

    req_id: str
    handoff: HandOff
    block_ids: list[int]
    first: int = 0


@dataclass
class KvferryHandshake(KVConnectorHandshakeMetadata):  # type: ignore[misc]
    """What a prefill worker tells its scheduler: where its KV listener is."""

    host: str
    port: int
    engine_id: str


@dataclass
class KvferryConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """What the scheduler tells the workers for one step."""

    loads: list[TransferSpec] = field(default_factory=list)
    saves: list[TransferSpec] = field(default_factory=list)
    pd_stage: list[tuple[str, list[int], float | None]] = field(default_factory=list)
    """Prefills that complete in this step and hand off to a decode instance: request id, its
    prompt's block ids and the lease it asked for (None: ``pd_lease``). Staged after the
    forward pass (``wait_for_save``)."""
    pd_recvs: list[PdRecv] = field(default_factory=list)
    store_address: str = ""
    """host:port of the embedded store server (embedded mode), else empty."""
    store_token: str = ""


@dataclass
class _ReqState:
    """Scheduler-side state of one request."""

    hashes: list[bytes]
    prompt_len: int
    local_tokens: int = 0
    hit_blocks: int = 0
    load: tuple[int, int] | None = None
    block_ids: list[int] = field(default_factory=list)
    saved: int = 0
    started: bool = False
    handoff: HandOff | None = None
    """P/D, decode side: the hand-off to read (direct data plane), until it is planned."""
    remote_decode: bool = False
    """P/D, prefill side: the request asked for remote decode (direct data plane)."""
    lease: float | None = None
    staged: bool = False
    pd_load: tuple[HandOff, int, int] | None = None
    """P/D, decode side: the hand-off and the blocks [start, end) to read into."""


class _Breaker:
    """After a store failure, skip the store for ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        self._until = 0.0

    @property
    def open(self) -> bool:
        return time.monotonic() < self._until

    def trip(self, what: str, error: BaseException) -> None:
        if not self.open:
            log.warning(
                "kvferry: %s failed (%s: %s); not using the store for %.1f s",
                what,
                type(error).__name__,
                error,
                self.retry_after,
            )
        self._until = time.monotonic() + self.retry_after


def _client_config(config: KvferryConfig, address: str, token: str) -> KvferryConfig:
    server = config.server.model_copy(
        update={"addresses": [address], "auth_token": SecretStr(token), "membership_url": ""}
    )
    store = config.store.model_copy(update={"tiers": ["server"], "metrics_port": 0})
    return config.model_copy(update={"server": server, "store": store})


def _auto_buffer_blocks(max_model_len: int, block_size: int, cache_blocks: int) -> int:
    """The default staging buffer: room for 4 full-length prompts, at most a quarter of the
    instance's own KV cache, at least one full-length prompt."""
    per_prompt = -(-max_model_len // block_size)
    return max(per_prompt, min(4 * per_prompt, cache_blocks // 4))


class KvferryConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """The kvferry KV connector; see the module docstring."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        self.settings: ConnectorSettings = parse_extra_config(ktc.kv_connector_extra_config)
        opts = self.settings.options
        self.mode = store_mode(self.settings.config)
        self.block_size: int = vllm_config.cache_config.block_size
        self._counters = IntervalCounters()
        self._breaker = _Breaker(opts.retry_after)
        self._lock = threading.Lock()
        self._store: TieredStore | None = None
        self._server: Any = None
        self._address = ""
        self._token = ""

        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        if len(groups) != 1:
            raise ConfigError(
                f"the kvferry connector supports models with one KV cache group (full "
                f"attention in every layer); this model has {len(groups)}"
            )
        spec = groups[0].kv_cache_spec
        self.layer_names = sorted(groups[0].layer_names)
        self.page_bytes = int(spec.page_size_bytes)
        self.block_bytes = self.page_bytes * len(self.layer_names)
        model_id = opts.model_id or str(vllm_config.model_config.model)
        shape = (
            f"{type(spec).__name__}:kv_heads={getattr(spec, 'num_kv_heads', '?')}:"
            f"head_size={getattr(spec, 'head_size', '?')}:layers={len(self.layer_names)}:"
            f"page={self.page_bytes}"
        )
        self._salt = {
            "model_name": model_id,
            "dtype": str(spec.dtype),
            "layout": shape,
            "algorithm": self.settings.config.store.key_hash,
        }
        self._hashers: dict[str, BlockHasher] = {}
        self.layout = f"{spec.dtype}:{shape}:block={self.block_size}"
        """The KV layout fingerprint both sides of a direct hand-off must share."""
        self.pd = opts.pd_data_plane or (
            "direct" if ktc.kv_role in ("kv_producer", "kv_consumer") else ""
        )
        self.pd_send = bool(self.pd) and ktc.kv_role != "kv_consumer"
        self.pd_recv = bool(self.pd) and ktc.kv_role != "kv_producer"
        self._max_model_len = int(vllm_config.model_config.max_model_len)

        if role == KVConnectorRole.SCHEDULER:
            if opts.on_load_failure == "recompute":
                # Read by vLLM's scheduler right after it builds this connector.
                ktc.kv_load_failure_policy = "recompute"
            self._reqs: dict[str, _ReqState] = {}
            self._pd_peer: KvferryHandshake | None = None
            self._pd_recvs: list[PdRecv] = []
            self._open_scheduler_store()
        else:
            self._layers: list[KvLayer] = []
            self._failed_block_ids: set[int] = set()
            self._failed_reqs: set[str] = set()
            self._warned_rejected = False
            self._sender: KvSender | None = None
            self._receiver: KvReceiver | None = None
            self._sender_seen = (0, 0, 0, 0)
        log.info(
            "kvferry connector (%s, %s, %s store, tiers %s, P/D %s): %d-token blocks of %d bytes",
            role.name.lower(),
            ktc.kv_role,
            self.mode,
            self.settings.config.store.tiers,
            self.pd or "off",
            self.block_size,
            self.block_bytes,
        )

    # -- the store --------------------------------------------------------------------------
    def _store_config(self, config: KvferryConfig) -> KvferryConfig:
        """``config`` with ``store.slot_size`` large enough for one block."""
        if config.store.slot_size >= self.block_bytes:
            return config
        store = config.store.model_copy(update={"slot_size": self.block_bytes})
        return config.model_copy(update={"store": store})

    def _open_scheduler_store(self) -> None:
        config = self._store_config(self.settings.config)
        # store.metrics_port is served from the scheduler's process only: a worker's store (in
        # that process too, with one GPU) would ask for the same port.
        if self.mode == "shared":
            self._store = TieredStore(config)
            try:
                export_store(self._store)
            except BaseException:
                self._store.close()
                raise
            return
        from kvferry.store.server import StoreServer

        self._token = secrets.token_hex(16)
        listen = config.listen.model_copy(
            update={"bind_address": "127.0.0.1", "port": 0, "auth_token": SecretStr(self._token)}
        )
        server_cfg = config.model_copy(update={"listen": listen})
        self._server = StoreServer(server_cfg)
        try:
            export_store(self._server.store, transfer=self._server.engine.metrics)
            host, port = self._server.start()
        except BaseException:
            self._server.close()
            raise
        self._address = f"{host}:{port}"
        self._store = TieredStore(_client_config(config, self._address, self._token))
        log.info("kvferry: embedded store server on %s", self._address)

    def _worker_store(self, meta: KvferryConnectorMetadata) -> TieredStore | None:
        with self._lock:
            if self._store is None:
                config = self._store_config(self.settings.config)
                if self.mode == "embedded":
                    if not meta.store_address:
                        return None
                    config = _client_config(config, meta.store_address, meta.store_token)
                self._store = TieredStore(config)
            return self._store

    def _hasher(self, cache_salt: str | None) -> BlockHasher:
        key = cache_salt or ""
        hasher = self._hashers.get(key)
        if hasher is None:
            hasher = BlockHasher(self.block_size, cache_salt=key, **self._salt)
            self._hashers[key] = hasher
        return hasher

    # -- scheduler side ---------------------------------------------------------------------
    def _state(self, request: Request) -> _ReqState:
        st = self._reqs.get(request.request_id)
        if st is None:
            prompt = list(request.prompt_token_ids or [])
            hashes = self._hasher(getattr(request, "cache_salt", None)).hashes(prompt)
            st = _ReqState(hashes=hashes, prompt_len=len(prompt))
            self._reqs[request.request_id] = st
        return st

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        opts = self.settings.options
        st = self._state(request)
        st.local_tokens = num_computed_tokens
        params = getattr(request, "kv_transfer_params", None)
        if params and params.get("do_remote_decode") and self.pd_send and self.pd == "direct":
            st.remote_decode = True
            asked = params.get("kvferry_lease_s")
            if isinstance(asked, int | float) and not isinstance(asked, bool) and asked > 0:
                st.lease = float(asked)
        if (
            params
            and params.get("do_remote_prefill")
            and params.get("transfer_mode") == TRANSFER_MODE
            and self.pd_recv
            and self.pd == "direct"
        ):
            # Prefilled elsewhere: the prompt's KV is read from the prefill instance in the
            # step that schedules the request, all but the last token (vLLM computes it to
            # sample from). One hand-off per request.
            params["do_remote_prefill"] = False
            try:
                st.handoff = HandOff.from_params(params)
            except HandOffError as e:
                log.warning("kvferry P/D: request %s: %s", request.request_id, e)
        if st.handoff is not None:
            count = st.prompt_len - 1 - num_computed_tokens
            if count > 0:
                return count, False
            # All cached here already: only release the prefill's copy.
            self._pd_recvs.append(PdRecv(request.request_id, st.handoff, []))
            st.handoff = None
            return 0, False
        # Never the prompt's last token: vLLM computes at least one token to sample from.
        n = (st.prompt_len - 1) // self.block_size
        if not opts.load or st.started or n <= 0:
            return 0, False
        if self._store is None or self._breaker.open:
            self._counters.add(lookups=1, lookup_blocks=n, lookup_errors=1)
            return 0, False
        errors = self._store.error_count()
        try:
            hit = self._store.lookup(st.hashes[:n])
        except Exception as e:  # a store failure is a miss, never a failed request
            self._counters.add(lookups=1, lookup_blocks=n, lookup_errors=1)
            self._breaker.trip("lookup", e)
            return 0, False
        if self._store.error_count() != errors:  # a tier failed: the store read it as a miss
            self._counters.add(lookups=1, lookup_blocks=n, lookup_errors=1)
            self._breaker.trip("lookup", StorageError("a store tier failed (see its log)"))
            return 0, False
        self._counters.add(lookups=1, lookup_blocks=n, hit_blocks=hit)
        st.hit_blocks = hit
        st.saved = max(st.saved, hit)
        if hit < opts.min_hit_blocks:
            return 0, False
        return max(0, hit * self.block_size - num_computed_tokens), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        st = self._reqs.get(request.request_id)
        if st is not None and st.handoff is not None:
            handoff, st.handoff = st.handoff, None
            if num_external_tokens <= 0:  # not loaded after all: release the prefill's copy
                self._pd_recvs.append(PdRecv(request.request_id, handoff, []))
                return
            start = st.local_tokens // self.block_size
            end = -(-(st.local_tokens + num_external_tokens) // self.block_size)
            st.pd_load = (handoff, start, end)
            self._counters.add(hit_tokens=num_external_tokens)
            return
        if num_external_tokens <= 0:
            return
        st = self._state(request)
        start = st.local_tokens // self.block_size
        end = start + num_external_tokens // self.block_size
        st.load = (start, end)
        self._counters.add(hit_tokens=num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KvferryConnectorMetadata:
        meta = KvferryConnectorMetadata(store_address=self._address, store_token=self._token)
        meta.pd_recvs, self._pd_recvs = self._pd_recvs, []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.started = True
            st.block_ids = list(new.block_ids[0])
            if st.load is not None:
                a, b = st.load
                meta.loads.append(TransferSpec(new.req_id, st.hashes[a:b], st.block_ids[a:b], a))
                st.load = None
            if st.pd_load is not None:
                handoff, a, b = st.pd_load
                meta.pd_recvs.append(PdRecv(new.req_id, handoff, st.block_ids[a:b], a))
                st.pd_load = None
            done = new.num_computed_tokens + scheduled[new.req_id]
            self._plan_save(new.req_id, st, done, meta)
            self._plan_handoff(new.req_id, st, done, meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                if new_ids is not None:
                    st.block_ids = list(new_ids[0])
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            done = cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
            self._plan_save(req_id, st, done, meta)
            self._plan_handoff(req_id, st, done, meta)
        for req_id in scheduler_output.finished_req_ids:
            self._reqs.pop(req_id, None)
        return meta

    def _plan_save(
        self, req_id: str, st: _ReqState, computed: int, meta: KvferryConnectorMetadata
    ) -> None:
        if not self.settings.options.save:
            return
        full = min(min(computed, st.prompt_len) // self.block_size, len(st.block_ids))
        if full > st.saved:
            a = st.saved
            meta.saves.append(TransferSpec(req_id, st.hashes[a:full], st.block_ids[a:full], a))
            st.saved = full

    def _plan_handoff(
        self, req_id: str, st: _ReqState, computed: int, meta: KvferryConnectorMetadata
    ) -> None:
        """P/D, prefill side: the step that completes the prompt stages its blocks."""
        if not st.remote_decode or st.staged or computed < st.prompt_len:
            return
        n = -(-st.prompt_len // self.block_size)
        if len(st.block_ids) < n:
            return
        st.staged = True
        meta.pd_stage.append((req_id, st.block_ids[:n], st.lease))

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        # Saves and hand-offs copy the blocks out of vLLM's cache in the step that computed
        # them, so vLLM may free the blocks now.
        st = self._reqs.pop(request.request_id, None)
        params = getattr(request, "kv_transfer_params", None)
        if not params or not self.pd:
            return False, None
        if st is not None and (st.handoff is not None or st.pd_load is not None):
            # Ended (aborted) before its hand-off was read: release the prefill's copy.
            handoff = st.handoff or (st.pd_load[0] if st.pd_load else None)
            if handoff is not None:
                self._pd_recvs.append(PdRecv(request.request_id, handoff, []))
            return False, None
        if not params.get("do_remote_decode") or not self.pd_send:
            return False, None
        from vllm.v1.request import RequestStatus

        if request.status not in (
            RequestStatus.FINISHED_LENGTH_CAPPED,
            RequestStatus.FINISHED_STOPPED,
        ):
            return False, None  # aborted: nothing to hand off
        if self.pd == "store":
            return False, {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "transfer_mode": STORE_MODE,
                "remote_num_tokens": request.num_computed_tokens,
            }
        peer = self._pd_peer
        if peer is None or st is None or not st.staged:
            if peer is None:
                log.warning("kvferry P/D: the prefill worker announced no KV listener")
            return False, None
        n = -(-st.prompt_len // self.block_size)
        handoff = HandOff(
            engine_id=peer.engine_id,
            request_id=request.request_id,
            host=peer.host,
            port=peer.port,
            block_ids=tuple(st.block_ids[:n]),
            num_tokens=st.prompt_len,
            layout=self.layout,
        )
        return False, handoff.to_params()

    def set_xfer_handshake_metadata(
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        for md in metadata.values():
            if isinstance(md, KvferryHandshake):
                self._pd_peer = md
                log.info("kvferry P/D: prefill KV listener on %s:%d", md.host, md.port)

    def get_kv_connector_stats(self) -> KvferryConnectorStats | None:
        return self._counters.take()

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KvferryConnectorStats | None:
        return KvferryConnectorStats(data=dict(data)) if data is not None else None

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        return ConnectorPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def reset_cache(self) -> bool | None:
        return None

    # -- worker side ------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.layer_names if n not in kv_caches]
        if missing:
            raise ConfigError(f"kvferry connector: vLLM registered no KV cache for {missing}")
        offset = 0
        layers = []
        for name in self.layer_names:
            t = kv_caches[name]
            size = t[0].numel() * t.element_size()
            if size != self.page_bytes:
                raise ConfigError(
                    f"kvferry connector: layer {name} has {size} bytes per block in its KV "
                    f"cache view {tuple(t.shape)}, the KV cache spec says {self.page_bytes}"
                )
            layers.append(KvLayer(name, t, offset, size))
            offset += size
        self._layers = layers
        log.info(
            "kvferry connector: %d layers, block view %s %s",
            len(layers),
            tuple(layers[0].tensor.shape[1:]) if layers else (),
            layers[0].tensor.dtype if layers else "",
        )
        if self.pd == "direct":
            opts = self.settings.options
            config = self.settings.config
            if self.pd_send:
                blocks = opts.pd_buffer_blocks or _auto_buffer_blocks(
                    self._max_model_len, self.block_size, int(layers[0].tensor.shape[0])
                )
                self._sender = KvSender(
                    config,
                    layers,
                    self.layout,
                    host=opts.pd_host,
                    port=opts.pd_port,
                    lease_s=opts.pd_lease,
                    buffer_blocks=blocks,
                )
                log.info(
                    "kvferry P/D: staging hand-offs in %d blocks (%.0f MiB), served read-only "
                    "on %s:%d",
                    blocks,
                    self._sender.region.size / 2**20,
                    self._sender.host,
                    self._sender.port,
                )
            if self.pd_recv:
                self._receiver = KvReceiver(config, layers, self.layout, timeout_s=opts.pd_timeout)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        sender = getattr(self, "_sender", None)
        if sender is None:
            return None
        return KvferryHandshake(sender.host, sender.port, sender.engine_id)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvferryConnectorMetadata):
            return
        for recv in meta.pd_recvs:
            self._start_recv(recv)
        if not meta.loads:
            return
        store = self._worker_store(meta)
        for spec in meta.loads:
            self._load(store, spec)

    def _load(self, store: TieredStore | None, spec: TransferSpec) -> None:
        n = len(spec.hashes)
        bb = self.block_bytes
        staging = host_staging(n, bb, self._layers)
        view = staging.numpy().data.cast("B")
        outs = [view[i * bb : (i + 1) * bb] for i in range(n)]
        t0 = time.perf_counter()
        got: list[int | None]
        if store is None or self._breaker.open:
            got = [None] * n
        else:
            errors = store.error_count()
            try:
                got = store.get(spec.hashes, outs, depth=spec.depth)
            except Exception as e:
                self._counters.add(load_errors=1)
                self._breaker.trip("load", e)
                got = [None] * n
            else:
                if store.error_count() != errors:
                    self._counters.add(load_errors=1)
                    self._breaker.trip("load", StorageError("a store tier failed (see its log)"))
        good = next((i for i, g in enumerate(got) if g != bb), n)
        if good:
            scatter_blocks(self._layers, spec.block_ids[:good], staging[:good])
        seconds = time.perf_counter() - t0
        if good < n:
            self._failed_block_ids.update(spec.block_ids[good:])
            self._failed_reqs.add(spec.req_id)
            self._counters.add(load_failed_blocks=n - good)
        self._counters.add(
            gets=1,
            get_blocks=n,
            get_hit_blocks=n - got.count(None),
            load_blocks=good,
            load_bytes=good * bb,
            load_seconds=seconds,
        )

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads finish in start_load_kv, before the forward pass: on a CPU the copies and the
        # model share the same cores, so overlapping them per layer gains nothing.
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        # Blocks are saved whole (every layer) in wait_for_save, after the forward pass.
        return

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvferryConnectorMetadata):
            return
        failed, self._failed_reqs = self._failed_reqs, set()
        if self._sender is not None:
            for req_id, block_ids, lease in meta.pd_stage:
                if req_id not in failed:  # else computed from a prefix that failed to load
                    self._sender.stage(req_id, block_ids, lease)
        if not meta.saves:
            return
        store = self._worker_store(meta)
        for spec in meta.saves:
            if spec.req_id in failed or store is None or self._breaker.open:
                # computed from a prefix that failed to load, or the store is down
                n = len(spec.hashes)
                self._counters.add(puts=1, put_blocks=n, save_skipped_blocks=n)
                continue
            self._save(store, spec)

    def _save(self, store: TieredStore, spec: TransferSpec) -> None:
        n = len(spec.hashes)
        bb = self.block_bytes
        t0 = time.perf_counter()
        staging = host_staging(n, bb, self._layers)
        gather_blocks(self._layers, spec.block_ids, staging)
        view = staging.numpy().data.cast("B")
        values = [view[i * bb : (i + 1) * bb] for i in range(n)]
        errors = store.error_count()
        try:
            status = store.put(spec.hashes, values, depth=spec.depth)
        except Exception as e:
            self._counters.add(puts=1, put_blocks=n, save_errors=1, save_skipped_blocks=n)
            self._breaker.trip("save", e)
            return
        if store.error_count() != errors:  # a tier failed: the store answered NO_SPACE
            self._counters.add(puts=1, put_blocks=n, save_errors=1, save_skipped_blocks=n)
            self._breaker.trip("save", StorageError("a store tier failed (see its log)"))
            return
        stored = status.count(PutStatus.STORED)
        rejected = status.count(PutStatus.NO_SPACE)
        if rejected and not self._warned_rejected:
            self._warned_rejected = True
            log.warning(
                "kvferry: the store refused %d of %d blocks of %d bytes (no space): its "
                "capacity is full of pinned blocks, or a store server's store.slot_size is "
                "smaller than one block",
                rejected,
                n,
                bb,
            )
        self._counters.add(
            puts=1,
            put_blocks=n,
            save_blocks=stored,
            save_bytes=stored * bb,
            save_seconds=time.perf_counter() - t0,
            save_existing_blocks=n - stored - rejected,
            save_rejected_blocks=rejected,
        )

    def _start_recv(self, recv: PdRecv) -> None:
        receiver = self._receiver
        if not recv.block_ids:
            if receiver is not None:
                receiver.release_quietly(recv.handoff)
            return
        if receiver is None:  # pragma: no cover - the scheduler plans reads only with one
            self._failed_block_ids.update(recv.block_ids)
            self._failed_reqs.add(recv.req_id)
            return
        r = receiver.read(recv.req_id, recv.handoff, recv.block_ids, recv.first)
        if r.failed_block_ids:
            log.warning(
                "kvferry P/D: request %s: %d blocks not read, vLLM recomputes them (%s)",
                r.request_id,
                len(r.failed_block_ids),
                r.error,
            )
            self._failed_block_ids.update(r.failed_block_ids)
            self._failed_reqs.add(recv.req_id)
        self._counters.add(
            pd_recvs=1,
            pd_recv_blocks=r.blocks - len(r.failed_block_ids),
            pd_recv_bytes=r.bytes,
            pd_recv_seconds=r.seconds,
            pd_recv_failed_blocks=len(r.failed_block_ids),
        )

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sender = self._sender
        if sender is not None:
            now = (sender.staged, sender.released, sender.expired, sender.dropped)
            last = self._sender_seen
            self._sender_seen = now
            self._counters.add(
                pd_sends=now[0] - last[0],
                pd_released=now[1] - last[1],
                pd_expired=now[2] - last[2],
                pd_dropped=now[3] - last[3],
            )
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    def shutdown(self) -> None:
        for part in (getattr(self, "_sender", None), getattr(self, "_receiver", None)):
            if part is not None:
                part.close()
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()
        if self._server is not None:
            self._server.close()
            self._server = None
        totals = self._counters.totals
        log.info("kvferry connector totals: %s", ", ".join(f"{k}={v:g}" for k, v in totals.items()))
