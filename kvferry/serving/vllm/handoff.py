"""The direct P/D data plane: a decode instance reads a prefill instance's KV.

Prefill/decode disaggregation hands a request's KV cache from the instance that computed the
prompt (prefill) to the one that generates (decode). kvferry's direct data plane does it with
the transfer engine, pull-style, as vLLM's own P/D connectors do:

1. In the step that completes a prompt asking for remote decode (``kv_transfer_params``
   ``do_remote_decode``), the prefill worker copies the prompt's blocks of every layer into a
   staging buffer (:class:`KvSender`): transfer-engine memory, served **read-only** on
   ``pd_host`` (127.0.0.1 unless told otherwise), behind ``listen.auth_token`` when one is set.
   vLLM frees its own blocks as usual: the prefill instance goes idle at once.
2. The response carries ``kv_transfer_params`` (:class:`HandOff`): the engine id, host, port,
   block count and token count, under the names vLLM's pull-style connectors use.
3. The decode worker (:class:`KvReceiver`) asks the prefill side where the request's KV is
   (a GRANT call), reads it straight into its own KV cache with one READ per run of
   consecutive blocks per layer, in one batch (shm on one host, tcp across hosts), and calls
   RELEASE: the staged copy is dropped.
4. A lease bounds how long a staged copy waits: a decode instance that vanishes (or never
   comes) pins nothing for good; after ``pd_lease`` seconds the copy is dropped. RELEASE
   answers whether the lease still held: a read that outlived its lease may have raced with the
   buffer's reuse, so the decode side then drops what it read and vLLM recomputes.

Every failure on the decode side (prefill gone or restarted, wrong layout, nothing staged,
timeout, lease lost) ends the same way: the blocks are reported as failed and vLLM recomputes
them; the request still gets a correct answer. Nothing here imports vLLM.

Why a copy and not vLLM's delay-free blocks (the prefill keeps the blocks until the decode
read them): while vLLM holds finished requests' blocks it keeps stepping its engine without
pause (two busy processes per prefill instance for as long as the hold lasts), which on a few
cores starves the very transfers it waits for (measured on 2 cores: reads delayed by tens of
seconds until the lease ran out). The copy costs one gather of the prompt's KV in host memory,
frees vLLM's blocks at once, exposes only what is handed off, and lives in memory the engine
allocated, which a decode instance on the same host maps over shm.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
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

METHOD_GRANT = 2
"""CALL method: GRANT <request id>; the reply is JSON ``{"region", "offset", "blocks"}``: where
the request's staged KV is in the sender's segment (an ERR when nothing is staged for it)."""

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


@dataclass
class _Grant:
    start: int
    blocks: int
    deadline: float
    lease_s: float


class KvSender:
    """The prefill side: stages finished prefills' KV and serves it read-only under leases.

    The staging buffer is transfer-engine memory (shareable: a decode instance on the same host
    reads it over shm), ``buffer_blocks`` blocks of every layer. A request's blocks take one
    contiguous range, layer by layer (layer 0's blocks, then layer 1's, ...), so a decode reads
    one run of consecutive blocks per layer with one READ.

    Args:
        config: kvferry config (``listen.auth_token`` guards the listener; ``transfer.*``).
        layers: vLLM's KV cache, one tensor per layer (blocks first, contiguous, host memory).
        layout: the KV layout fingerprint; a decode side with another one refuses to read.
        host, port: where to listen (port 0: any free port).
        lease_s: seconds a staged hand-off waits for its RELEASE before it is dropped.
        buffer_blocks: the staging buffer's size in blocks.
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
        buffer_blocks: int,
    ) -> None:
        _check_layers(layers)
        if buffer_blocks < 1:
            raise HandOffError(f"pd_buffer_blocks must be >= 1, got {buffer_blocks}")
        self.layers = list(layers)
        self.lease_s = lease_s
        self.layout = layout
        self.page = layers[0].size
        self.buffer_blocks = buffer_blocks
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, buffer_blocks)]
        """Free ranges of the staging buffer, (first block, blocks), sorted, coalesced."""
        self._grants: dict[str, _Grant] = {}
        self._ended: OrderedDict[str, bool] = OrderedDict()
        """Recently ended hand-offs: request id -> released (True) or expired (False)."""
        self.staged = 0
        self.released = 0
        self.expired = 0
        self.dropped = 0
        """Hand-offs not staged: the buffer had no room (the decode side recomputes)."""
        self._wake = threading.Event()
        self._closed = False
        self.engine = TransferEngine(_engine_config(config, host, port))
        try:
            size = buffer_blocks * self.page * len(layers)
            self.region = self.engine.allocate(size)
            self.region.peer_writable = False
            service = {SERVICE: {"page_bytes": self.page, "layers": len(layers), "layout": layout}}
            self.engine.listen(call=self._call, service=service)
        except BaseException:
            self.engine.close()
            raise
        address = self.engine.address
        assert address is not None
        self.host, self.port = address
        self.engine_id = self.engine.instance
        self._timer = threading.Thread(target=self._expire_loop, name="kvferry-pd-lease")
        self._timer.daemon = True
        self._timer.start()

    # -- staging --------------------------------------------------------------------------
    def stage(
        self, request_id: str, block_ids: Sequence[int], lease_s: float | None = None
    ) -> bool:
        """Copy ``block_ids`` of every layer into the staging buffer and hold them for a
        decode instance for ``lease_s`` seconds (at most the sender's). False: no room."""
        n = len(block_ids)
        lease = self.lease_s if lease_s is None else min(lease_s, self.lease_s)
        with self._lock:
            start = self._alloc(n) if n else None
            if start is None:
                self.dropped += 1
                return False
        page = self.page
        ids = torch.tensor(list(block_ids), dtype=torch.long)
        array = self.region.array
        for i, layer in enumerate(self.layers):
            first = (start * len(self.layers) + i * n) * page
            rows = torch.from_numpy(array[first : first + n * page])
            t = layer.tensor
            rows.view(t.dtype).view((n, *t.shape[1:])).copy_(t[ids])
        with self._lock:
            self._grants[request_id] = _Grant(start, n, time.monotonic() + lease, lease)
            self.staged += 1
        self._wake.set()
        return True

    def _alloc(self, n: int) -> int | None:
        for i, (first, count) in enumerate(self._free):
            if count >= n:
                if count == n:
                    del self._free[i]
                else:
                    self._free[i] = (first + n, count - n)
                return first
        return None

    def _release(self, grant: _Grant) -> None:
        free = self._free
        free.append((grant.start, grant.blocks))
        free.sort()
        merged: list[tuple[int, int]] = []
        for first, count in free:
            if merged and merged[-1][0] + merged[-1][1] == first:
                merged[-1] = (merged[-1][0], merged[-1][1] + count)
            else:
                merged.append((first, count))
        self._free[:] = merged

    def _end(self, request_id: str, *, released: bool) -> None:
        grant = self._grants.pop(request_id)
        self._release(grant)
        self._ended[request_id] = released
        while len(self._ended) > _FORGET_AFTER:
            self._ended.popitem(last=False)
        if released:
            self.released += 1
        else:
            self.expired += 1
            log.warning(
                "kvferry P/D: no decode instance released request %s within its %.0f s lease "
                "(pd_lease); its staged KV is dropped",
                request_id,
                grant.lease_s,
            )

    def expire(self) -> float | None:
        """Drop hand-offs whose lease ran out; seconds until the next one ends (None: none)."""
        now = time.monotonic()
        with self._lock:
            for req_id, grant in list(self._grants.items()):
                if grant.deadline <= now:
                    self._end(req_id, released=False)
            deadlines = [g.deadline for g in self._grants.values()]
        return min(deadlines) - now if deadlines else None

    def _expire_loop(self) -> None:
        while not self._closed:
            left = self.expire()
            self._wake.wait(timeout=1.0 if left is None else max(0.01, min(left, 1.0)))
            self._wake.clear()

    @property
    def held_blocks(self) -> int:
        with self._lock:
            return sum(g.blocks for g in self._grants.values())

    # -- the decode side's calls ----------------------------------------------------------
    def _call(self, method: int, payload: memoryview) -> CallReply:
        request_id = bytes(payload).decode(errors="replace")
        with self._lock:
            grant = self._grants.get(request_id)
            if method == METHOD_GRANT:
                if grant is None:
                    why = "expired" if self._ended.get(request_id) is False else "unknown"
                    raise KvferryError(f"no staged KV for request {request_id} ({why})")
                doc = {
                    "region": self.region.region_id,
                    "offset": grant.start * self.page * len(self.layers),
                    "blocks": grant.blocks,
                }
                return CallReply([json.dumps(doc).encode()])
            if method == METHOD_RELEASE:
                if grant is not None:
                    self._end(request_id, released=True)
                    return CallReply([LEASE_HELD])
                return CallReply([LEASE_LOST])
        raise KvferryError(
            f"unknown P/D call {method}; this listener serves GRANT (2) and RELEASE (1)"
        )

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.engine.close()


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
    """The decode side: reads hand-offs into its own KV cache.

    Reads are synchronous, in the step that schedules the request (before its forward pass), as
    the store's loads are: a hand-off is a few milliseconds of copying, and vLLM's asynchronous
    loads keep its engine stepping without pause while they wait, which on a few cores starves
    the transfer (measured on 2 cores: stalls of up to a minute in vLLM's engine-to-worker
    queue). RELEASEs without a read go to a small thread pool.

    Args:
        config: kvferry config (``listen.auth_token`` is presented to prefill listeners).
        layers: this instance's KV cache (the same layout as the prefill side's).
        layout: this instance's KV layout fingerprint.
        timeout_s: the most one hand-off's reads may take.
        threads: RELEASE calls in flight at once.
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
        # A prefill worker busy with a long forward pass answers a handshake late: wait for it
        # as long as for the reads.
        self._connect_timeout = max(config.transfer.connect_timeout, timeout_s)
        transfer = config.transfer.model_copy(
            update={
                "connect_timeout": self._connect_timeout,
                "transfer_timeout": max(config.transfer.transfer_timeout, timeout_s),
            }
        )
        self.engine = TransferEngine(config.model_copy(update={"transfer": transfer}, deep=True))
        try:
            self._regions = [self.engine.register(layer.tensor) for layer in layers]
        except BaseException:
            self.engine.close()
            raise
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kvferry-pd-release")
        self._calls: dict[tuple[str, int], socket.socket] = {}
        self._call_lock = threading.Lock()

    def read(
        self,
        request_id: str,
        handoff: HandOff | None,
        local_block_ids: Sequence[int],
        first: int,
    ) -> RecvResult:
        """Read the hand-off's blocks ``first, first + 1, ...`` (the earlier ones were cached
        here) into ``local_block_ids``, then RELEASE them on the prefill side. Never raises:
        a failure fails every block (vLLM recomputes them)."""
        n = len(local_block_ids)
        t0 = time.perf_counter()
        try:
            moved = self._read(handoff, list(local_block_ids), first)
        except Exception as e:  # every failure is a recompute, never a failed request
            error = f"{type(e).__name__}: {e}"
            return RecvResult(request_id, n, list(local_block_ids), 0, 0.0, error)
        return RecvResult(request_id, n, [], moved, time.perf_counter() - t0)

    def _read(self, h: HandOff | None, local: list[int], first: int) -> int:
        if h is None:
            raise HandOffError("no usable kv_transfer_params")
        if h.layout != self.layout:
            raise HandOffError(
                f"the prefill instance's KV layout {h.layout!r} is not this instance's "
                f"{self.layout!r}: run the same model, dtype and block size on both"
            )
        total = len(h.block_ids)
        if first < 0 or first + len(local) > total:
            raise HandOffError(
                f"the hand-off has {total} blocks, this instance expects blocks {first} to "
                f"{first + len(local) - 1}"
            )
        name = f"{h.host}:{h.port}"
        t0 = time.perf_counter()
        handle = self.engine.open_segment(name)
        if handle.peer.instance != h.engine_id:
            # A prefill instance restarted on the same address: its KV is gone.
            handle = self.engine.open_segment(name, refresh=True)
            if handle.peer.instance != h.engine_id:
                raise HandOffError(
                    f"{name} is no longer the prefill engine {h.engine_id} (restarted?)"
                )
        service = handle.peer.service.get(SERVICE)
        layers = len(self._regions)
        if (
            not isinstance(service, dict)
            or service.get("page_bytes") != self._page
            or service.get("layers") != layers
        ):
            raise HandOffError(
                f"{name} serves no KV of {layers} layers of {self._page}-byte pages ({service!r})"
            )
        grant = json.loads(self.call(h, METHOD_GRANT))
        region, offset, blocks = int(grant["region"]), int(grant["offset"]), int(grant["blocks"])
        if blocks != total:
            raise HandOffError(f"{name} staged {blocks} blocks, the hand-off says {total}")
        t1 = time.perf_counter()
        page = self._page
        # Staged layer by layer: layer i's blocks start at offset + i * blocks * page.
        positions = range(first, first + len(local))
        requests = [
            TransferRequest(
                OpCode.READ,
                local_region,
                lo * page,
                handle,
                offset + (i * blocks + pos) * page,
                count * page,
                region,
            )
            for i, local_region in enumerate(self._regions)
            for pos, lo, count in coalesce(positions, local)
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
        t2 = time.perf_counter()
        answer = self.call(h, METHOD_RELEASE)
        log.debug(
            "kvferry P/D: request %s from %s (%s): grant %.3f s, %d reads %.3f s, release %.3f s",
            h.request_id,
            name,
            handle.transport,
            t1 - t0,
            len(requests),
            t2 - t1,
            time.perf_counter() - t2,
        )
        if answer != LEASE_HELD:
            raise HandOffError(
                f"the lease on request {h.request_id}'s KV at {name} ran out during the read "
                "(raise pd_lease)"
            )
        return sum(r.length for r in requests)

    def call(self, h: HandOff, method: int) -> bytes:
        """Call ``method`` (GRANT, RELEASE) for ``h``'s request on its prefill side.

        Raises:
            HandOffError: the prefill side answered ERR (nothing staged for the request).
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
                    wire.encode(wire.Op.CALL, region=method, length=len(payload)) + payload
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
            with self._call_lock:
                old = self._calls.setdefault(key, sock)
            if old is not sock:
                sock.close()
            if header.op is wire.Op.ERR:
                raise HandOffError(f"{h.host}:{h.port} answered: {body.decode(errors='replace')}")
            return body
        raise AssertionError("unreachable")  # pragma: no cover

    def release_quietly(self, h: HandOff) -> None:
        """RELEASE without reading (the blocks were cached here), in the background."""
        self._pool.submit(self._release_logged, h)

    def _release_logged(self, h: HandOff) -> None:
        try:
            self.call(h, METHOD_RELEASE)
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
