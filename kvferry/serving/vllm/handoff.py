"""The direct P/D data plane: a decode instance reads a prefill instance's KV blocks.

Prefill/decode disaggregation hands a request's KV cache from the instance that computed the
prompt (prefill) to the one that generates (decode). kvferry's direct data plane does it with
the transfer engine, pull-style, as vLLM's own P/D connectors do:

1. The prefill worker registers each layer's KV cache with a :class:`TransferEngine` and serves
   it (``listen``): **read-only** (a peer's WRITE is refused), on ``pd_host`` (127.0.0.1 unless
   told otherwise), behind ``listen.auth_token`` when one is set. The handshake announces the
   layers' region ids and the KV layout (:class:`KvSender`).
2. When a prefill finishes, vLLM keeps the request's blocks (the connector returns
   ``delay_free_blocks``) and the response carries ``kv_transfer_params``
   (:class:`HandOff`): the engine id, host, port, block ids and token count.
3. The decode worker opens the prefill's segment and reads the blocks straight into its own
   KV cache, one READ per run of consecutive blocks per layer, in one batch
   (:class:`KvReceiver`). Then it calls RELEASE on the prefill's listener: the prefill side
   lets vLLM free the blocks.
4. A lease bounds how long blocks wait: a decode instance that vanishes (or never comes) pins
   nothing for good; the prefill side frees the blocks when ``pd_lease`` seconds pass. RELEASE
   answers whether the lease still held: a read that outlived its lease may have raced with
   the blocks' reuse, so the decode side then drops what it read and vLLM recomputes.

Every failure on the decode side (prefill gone, wrong layout, timeout, lease lost) ends the
same way: the blocks are reported as failed and vLLM recomputes them; the request still gets a
correct answer. Nothing here imports vLLM.

Memory that vLLM allocated cannot be mapped by another process, so transfers run over the
engine's tcp transport, on one host (loopback) as across hosts; the engine's shm transport
needs memory the engine allocates itself.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from kvferry.config import KvferryConfig
from kvferry.errors import KvferryError
from kvferry.serving.vllm.kv_blocks import KvLayer
from kvferry.transfer import handshake, wire
from kvferry.transfer.batch import OpCode, TransferRequest, TransferState
from kvferry.transfer.engine import TransferEngine
from kvferry.transfer.server import CallReply

log = logging.getLogger("kvferry.serving.vllm.handoff")

__all__ = [
    "TRANSFER_MODE",
    "HandOff",
    "HandOffError",
    "KvReceiver",
    "KvSender",
    "coalesce",
]

TRANSFER_MODE = "kvferry-direct"
"""``kv_transfer_params["transfer_mode"]`` of a direct hand-off."""

SERVICE = "kvferry_pd"
"""The key of the P/D service in the prefill engine's handshake."""

METHOD_RELEASE = 1
"""CALL method: RELEASE <request id>; the reply is :data:`LEASE_HELD` or :data:`LEASE_LOST`."""

LEASE_HELD = b"held"
LEASE_LOST = b"lost"

_FORGET_AFTER = 4096
"""Request ids a sender remembers after their lease ended (to answer a late RELEASE)."""


class HandOffError(KvferryError):
    """A hand-off that cannot be used (bad parameters, wrong layout, unreachable prefill)."""


@dataclass(frozen=True)
class HandOff:
    """What the decode side needs to read a request's blocks from the prefill side.

    It travels in vLLM's ``kv_transfer_params``, under the names vLLM's pull-style P/D
    connectors use (``remote_engine_id``, ``remote_host``, ...), so proxies built for them
    pass it through unchanged.
    """

    engine_id: str
    request_id: str
    host: str
    port: int
    block_ids: tuple[int, ...]
    num_tokens: int
    layout: str

    def to_params(self) -> dict[str, Any]:
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "transfer_mode": TRANSFER_MODE,
            "remote_engine_id": self.engine_id,
            "remote_request_id": self.request_id,
            "remote_host": self.host,
            "remote_port": self.port,
            "remote_block_ids": list(self.block_ids),
            "remote_num_tokens": self.num_tokens,
            "kv_layout": self.layout,
            "tp_size": 1,
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> HandOff:
        """Parse ``kv_transfer_params`` of a direct hand-off.

        Raises:
            HandOffError: a field is missing or of the wrong type (names it).
        """

        def get(name: str, kind: type) -> Any:
            value = params.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise HandOffError(
                    f"kv_transfer_params.{name} must be a {kind.__name__}, got {value!r}"
                )
            return value

        if params.get("transfer_mode") != TRANSFER_MODE:
            raise HandOffError(
                f"kv_transfer_params.transfer_mode is {params.get('transfer_mode')!r}, not "
                f"{TRANSFER_MODE!r}: the prefill instance does not run the kvferry connector "
                "with the direct data plane"
            )
        blocks = get("remote_block_ids", list)
        if any(not isinstance(b, int) or isinstance(b, bool) or b < 0 for b in blocks):
            raise HandOffError("kv_transfer_params.remote_block_ids must be block ids (ints)")
        port = get("remote_port", int)
        if not 0 < port < 65536:
            raise HandOffError(f"kv_transfer_params.remote_port {port} is not a port")
        return cls(
            engine_id=get("remote_engine_id", str),
            request_id=get("remote_request_id", str),
            host=get("remote_host", str),
            port=port,
            block_ids=tuple(blocks),
            num_tokens=get("remote_num_tokens", int),
            layout=get("kv_layout", str),
        )


def coalesce(remote: Sequence[int], local: Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs of blocks consecutive on both sides: (first remote id, first local id, count)."""
    runs: list[tuple[int, int, int]] = []
    for r, lo in zip(remote, local, strict=True):
        if runs:
            r0, l0, n = runs[-1]
            if r == r0 + n and lo == l0 + n:
                runs[-1] = (r0, l0, n + 1)
                continue
        runs.append((r, lo, 1))
    return runs


def _check_layers(layers: Sequence[KvLayer]) -> None:
    for layer in layers:
        t = layer.tensor
        if t.device.type != "cpu" or not t.is_contiguous():
            raise HandOffError(
                f"the direct data plane reads KV caches in host memory with blocks first and "
                f"contiguous; layer {layer.name} is {t.device.type} {tuple(t.shape)} "
                f"(contiguous: {t.is_contiguous()}); use pd_data_plane 'store'"
            )


def _engine_config(config: KvferryConfig, host: str, port: int) -> KvferryConfig:
    listen = config.listen.model_copy(update={"bind_address": host, "port": port})
    return config.model_copy(update={"listen": listen})


class KvSender:
    """The prefill side: serves its KV cache read-only and holds blocks under leases.

    Args:
        config: kvferry config (``listen.auth_token`` guards the listener; ``transfer.*``).
        layers: vLLM's KV cache, one tensor per layer (blocks first, contiguous, host memory).
        layout: the KV layout fingerprint; a decode side with another one refuses to read.
        host, port: where to listen (port 0: any free port).
        lease_s: seconds blocks wait for their RELEASE before they are freed anyway.
    """

    def __init__(
        self,
        config: KvferryConfig,
        layers: Sequence[KvLayer],
        layout: str,
        *,
        host: str,
        port: int,
        lease_s: float,
    ) -> None:
        _check_layers(layers)
        self.lease_s = lease_s
        self.layout = layout
        self._lock = threading.Lock()
        self._held: dict[str, float] = {}
        """request id -> monotonic deadline of its lease."""
        self._early: dict[str, float] = {}
        """RELEASEs that came before the worker heard of the request (id -> when)."""
        self._done: set[str] = set()
        self._ended: OrderedDict[str, bool] = OrderedDict()
        """Recently ended leases: request id -> released (True) or expired (False)."""
        self.released = 0
        self.expired = 0
        self.engine = TransferEngine(_engine_config(config, host, port))
        try:
            regions = []
            for layer in layers:
                region = self.engine.register(layer.tensor)
                region.peer_writable = False
                regions.append(region.region_id)
            service = {SERVICE: {"layers": regions, "page_bytes": layers[0].size, "layout": layout}}
            self.engine.listen(call=self._call, service=service)
        except BaseException:
            self.engine.close()
            raise
        address = self.engine.address
        assert address is not None
        self.host, self.port = address
        self.engine_id = self.engine.instance

    def hold(self, request_id: str) -> None:
        """Start ``request_id``'s lease (the scheduler delayed freeing its blocks)."""
        now = time.monotonic()
        with self._lock:
            if self._early.pop(request_id, None) is not None:
                self._end(request_id, released=True)
                return
            self._held[request_id] = now + self.lease_s

    def finished(self) -> set[str]:
        """Requests whose blocks vLLM may free now: released, or their lease ran out."""
        now = time.monotonic()
        with self._lock:
            for req_id, deadline in list(self._held.items()):
                if deadline <= now:
                    del self._held[req_id]
                    self._end(req_id, released=False)
                    log.warning(
                        "kvferry P/D: no decode instance read request %s within the %.0f s "
                        "lease (pd_lease); its blocks are freed",
                        req_id,
                        self.lease_s,
                    )
            for req_id, at in list(self._early.items()):
                if at + self.lease_s <= now:  # a RELEASE for a request this worker never held
                    del self._early[req_id]
            done, self._done = self._done, set()
        return done

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def _end(self, request_id: str, *, released: bool) -> None:
        self._done.add(request_id)
        self._ended[request_id] = released
        while len(self._ended) > _FORGET_AFTER:
            self._ended.popitem(last=False)
        if released:
            self.released += 1
        else:
            self.expired += 1

    def _call(self, method: int, payload: memoryview) -> CallReply:
        if method != METHOD_RELEASE:
            raise KvferryError(f"unknown P/D call {method}; this listener serves RELEASE (1)")
        request_id = bytes(payload).decode(errors="replace")
        with self._lock:
            if self._held.pop(request_id, None) is not None:
                self._end(request_id, released=True)
                return CallReply([LEASE_HELD])
            ended = self._ended.get(request_id)
            if ended is False:
                return CallReply([LEASE_LOST])
            if ended is None:
                # Not held yet: the scheduler delayed the free, the worker hears of it with
                # the next step. The blocks are still vLLM's to keep until then.
                self._early[request_id] = time.monotonic()
            return CallReply([LEASE_HELD])

    def close(self) -> None:
        self.engine.close()


@dataclass
class _Recv:
    request_id: str
    handoff: HandOff | None
    local_block_ids: list[int]
    started: float = field(default_factory=time.perf_counter)


@dataclass
class RecvResult:
    """How one request's read ended (the worker reports it to vLLM and counts it)."""

    request_id: str
    blocks: int
    failed_block_ids: list[int]
    bytes: int
    seconds: float
    error: str = ""


class KvReceiver:
    """The decode side: reads hand-offs into its own KV cache, in the background.

    Args:
        config: kvferry config (``listen.auth_token`` is presented to prefill listeners).
        layers: this instance's KV cache (the same layout as the prefill side's).
        layout: this instance's KV layout fingerprint.
        timeout_s: the most one hand-off's reads may take.
        threads: hand-offs read at once.
    """

    def __init__(
        self,
        config: KvferryConfig,
        layers: Sequence[KvLayer],
        layout: str,
        *,
        timeout_s: float,
        threads: int = 4,
    ) -> None:
        _check_layers(layers)
        self.layout = layout
        self.timeout_s = timeout_s
        self._page = layers[0].size
        self._token = _token(config)
        self._connect_timeout = config.transfer.connect_timeout
        self.engine = TransferEngine(config.model_copy(deep=True))
        try:
            self._regions = [self.engine.register(layer.tensor) for layer in layers]
        except BaseException:
            self.engine.close()
            raise
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kvferry-pd-recv")
        self._lock = threading.Lock()
        self._results: list[RecvResult] = []
        self._calls: dict[tuple[str, int], socket.socket] = {}
        self._call_lock = threading.Lock()

    def start(
        self, request_id: str, handoff: HandOff | None, local_block_ids: Sequence[int]
    ) -> None:
        """Read ``handoff``'s blocks into ``local_block_ids`` (the last ones of the hand-off
        when the local prefix cache had the first), then RELEASE them on the prefill side.
        With no local blocks (all cached here), only the RELEASE is sent."""
        job = _Recv(request_id, handoff, list(local_block_ids))
        self._pool.submit(self._run, job)

    def results(self) -> list[RecvResult]:
        """Hand-offs that ended since the last call."""
        with self._lock:
            out, self._results = self._results, []
        return out

    def _run(self, job: _Recv) -> None:
        n = len(job.local_block_ids)
        try:
            moved = self._read(job) if n else 0
        except Exception as e:  # every failure is a recompute, never a failed request
            error = f"{type(e).__name__}: {e}"
            result = RecvResult(job.request_id, n, list(job.local_block_ids), 0, 0.0, error)
        else:
            result = RecvResult(job.request_id, n, [], moved, time.perf_counter() - job.started)
        with self._lock:
            self._results.append(result)

    def _read(self, job: _Recv) -> int:
        h = job.handoff
        if h is None:
            raise HandOffError("no usable kv_transfer_params")
        if h.layout != self.layout:
            raise HandOffError(
                f"the prefill instance's KV layout {h.layout!r} is not this instance's "
                f"{self.layout!r}: run the same model, dtype and block size on both"
            )
        local = job.local_block_ids
        remote = list(h.block_ids[len(h.block_ids) - len(local) :])
        if len(remote) != len(local):
            raise HandOffError(
                f"the hand-off has {len(h.block_ids)} blocks, this instance expects {len(local)}"
            )
        name = f"{h.host}:{h.port}"
        handle = self.engine.open_segment(name)
        if handle.peer.instance != h.engine_id:
            # A prefill instance restarted on the same address: its blocks are gone.
            handle = self.engine.open_segment(name, refresh=True)
            if handle.peer.instance != h.engine_id:
                raise HandOffError(
                    f"{name} is no longer the prefill engine {h.engine_id} (restarted?)"
                )
        service = handle.peer.service.get(SERVICE)
        if not isinstance(service, dict) or service.get("page_bytes") != self._page:
            raise HandOffError(f"{name} serves no KV cache of {self._page}-byte pages")
        remote_regions = service.get("layers")
        if not isinstance(remote_regions, list) or len(remote_regions) != len(self._regions):
            raise HandOffError(f"{name} serves {remote_regions!r}, not one region per layer")
        page = self._page
        requests = [
            TransferRequest(
                OpCode.READ, region, lo * page, handle, r * page, count * page, int(rid)
            )
            for region, rid in zip(self._regions, remote_regions, strict=True)
            for r, lo, count in coalesce(remote, local)
        ]
        batch = self.engine.allocate_batch(len(requests))
        try:
            self.engine.submit(batch, requests)
            status = self.engine.wait(batch, timeout=self.timeout_s)
        finally:
            self.engine.free_batch(batch)
        if status.state is not TransferState.COMPLETED:
            errors = [s.error for s in status.requests if s.error is not None]
            raise HandOffError(
                f"reading {len(local)} blocks from {name} did not complete "
                f"({status.state.name.lower()}{': ' + str(errors[0]) if errors else ''})"
            )
        if self.release(h) != LEASE_HELD:
            raise HandOffError(
                f"the lease on request {h.request_id}'s blocks at {name} ran out during the "
                "read: its blocks may have been reused (raise pd_lease)"
            )
        return sum(r.length for r in requests)

    def release(self, h: HandOff) -> bytes:
        """RELEASE ``h``'s blocks on the prefill side; its answer (held or lost).

        Raises:
            KvferryError, OSError: the prefill side cannot be reached.
        """
        key = (h.host, h.port)
        payload = h.request_id.encode()
        with self._call_lock:
            sock = self._calls.pop(key, None)
        for attempt in (0, 1):
            if sock is None:
                sock, _ = handshake.connect(key, token=self._token, timeout=self._connect_timeout)
                sock.settimeout(self.timeout_s)
            try:
                sock.sendall(
                    wire.encode(wire.Op.CALL, region=METHOD_RELEASE, length=len(payload)) + payload
                )
                header = wire.decode(
                    handshake.recv_exact(sock, wire.HEADER_SIZE), reply=True, max_length=1 << 16
                )
                body = bytes(handshake.recv_exact(sock, header.length))
            except (OSError, KvferryError):
                sock.close()
                sock = None
                if attempt:
                    raise
                continue
            if header.op is wire.Op.ERR:
                sock.close()
                raise HandOffError(f"{h.host}:{h.port} refused RELEASE: {body.decode()}")
            with self._call_lock:
                old = self._calls.setdefault(key, sock)
            if old is not sock:
                sock.close()
            return body
        raise AssertionError("unreachable")  # pragma: no cover

    def release_quietly(self, h: HandOff) -> None:
        """RELEASE without reading (the blocks were cached here), in the background."""
        self._pool.submit(self._release_logged, h)

    def _release_logged(self, h: HandOff) -> None:
        try:
            self.release(h)
        except (OSError, KvferryError) as e:
            log.info(
                "kvferry P/D: RELEASE to %s:%d failed (%s); its lease frees it", h.host, h.port, e
            )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._call_lock:
            socks, self._calls = list(self._calls.values()), {}
        for sock in socks:
            sock.close()
        self.engine.close()


def _token(config: KvferryConfig) -> str | None:
    token: SecretStr | None = config.listen.auth_token
    return token.get_secret_value() if token is not None else None
