"""TransferEngine: segments, batches and the choice of transport (Mooncake semantics, Python idiom).

An engine owns memory regions it allocated or registered, optionally serves them to peers
(``listen``), and moves bytes between its regions and other engines' segments in batches::

    engine = TransferEngine()
    name = engine.listen()                     # "127.0.0.1:15428": the segment name peers open
    local = engine.allocate(64 << 20)           # touched, shareable memory
    peer = engine.open_segment("10.0.0.2:15428")
    batch = engine.allocate_batch(16)
    engine.submit(batch, [TransferRequest(OpCode.READ, local, 0, peer, 0, 1 << 20)])
    status = engine.wait(batch, timeout=5)      # BatchStatus: overall + per request
    engine.free_batch(batch)

The engine validates every request before anything moves (a submit is all or nothing), picks a
transport per segment by locality (local > shm > tcp) unless ``transfer.transport`` forces one,
and leaves the byte moving to the transports. A request whose local buffer is GPU memory
(``DeviceRegion``) is staged here: a WRITE copies its bytes to a pinned host buffer before it is
posted, a READ lands in one and is copied to the device before it completes, one device copy per
run of adjacent requests of a submit (``kvferry.transfer.staging``). Transports only ever see
host memory on the initiator's side.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypeVar, overload

from kvferry.config.models import KvferryConfig
from kvferry.errors import KvferryError, SegmentError, TransferError
from kvferry.observe.counters import MetricSet
from kvferry.transfer import handshake, staging, wire
from kvferry.transfer.batch import Batch, BatchStatus, OpCode, TransferRequest, TransferState
from kvferry.transfer.host import boot_id
from kvferry.transfer.memory import (
    DeviceRegion,
    MemoryRegion,
    allocate_device,
    allocate_region,
    register_buffer,
)
from kvferry.transfer.metadata.base import MetadataService
from kvferry.transfer.metadata.refresh import Republisher
from kvferry.transfer.registry import AUTO_ORDER, load_metadata, load_transport
from kvferry.transfer.segment import PeerInfo, SegmentHandle
from kvferry.transfer.server import CallHandler, TargetServer
from kvferry.transfer.transports.base import Channel, Transport, TransportContext, WorkItem

_R = TypeVar("_R", MemoryRegion, DeviceRegion, MemoryRegion | DeviceRegion)


class TransferEngine:
    """Moves bytes between registered memory of this process and other engines' segments.

    Args:
        config: the whole kvferry config (its ``transfer``, ``listen`` and ``metadata``
            sections are used); defaults when omitted.

    Thread safety: every method may be called from any thread; many batches may be in flight
    from many threads at once.
    """

    def __init__(self, config: KvferryConfig | None = None) -> None:
        self.config = config or KvferryConfig()
        self.instance = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._regions: dict[int, MemoryRegion | DeviceRegion] = {}
        self._has_device = False
        self._region_ids = itertools.count(1)
        self._batch_ids = itertools.count(1)
        self._metrics = MetricSet()
        self._ctx = TransportContext(
            instance=self.instance,
            boot_id=boot_id(),
            pid=os.getpid(),
            listen=self.config.listen,
            counters={},
            local_regions=self._regions,
        )
        self._transports: dict[str, Transport] = {}
        self._handles: dict[str, SegmentHandle] = {}
        # their channels, for wait and status to drive without the lock (replaced, not mutated)
        self._open_channels: tuple[Channel, ...] = ()
        self._server: TargetServer | None = None
        self._service: dict[str, Any] = {}
        self._metadata: MetadataService | None = None
        self.segment_name: str | None = None
        self._closed = False
        self._republisher: Republisher | None = None

    # -- memory ---------------------------------------------------------------------------
    @overload
    def allocate(self, size: int, location: Literal["cpu"] = "cpu") -> MemoryRegion: ...

    @overload
    def allocate(self, size: int, location: str) -> MemoryRegion | DeviceRegion: ...

    def allocate(self, size: int, location: str = "cpu") -> MemoryRegion | DeviceRegion:
        """Allocate and register ``size`` bytes of memory.

        Args:
            size: bytes (> 0).
            location: "cpu" or "cpu:<numa node>" (touched, shareable host memory; the node is
                advisory on single-node hosts), or "cuda" / "cuda:<index>" (zeroed GPU memory,
                needs torch with CUDA; a ``DeviceRegion``).

        Raises:
            SegmentError: a bad size or location, or the memory cannot be had.
        """
        if location == "cuda" or (location.startswith("cuda:") and location[5:].isdigit()):
            return self._add_region(allocate_device(next(self._region_ids), size, location))
        if location != "cpu" and not (location.startswith("cpu:") and location[4:].isdigit()):
            raise SegmentError(
                f"location {location!r} is not supported; use 'cpu', 'cpu:<numa node>', 'cuda' "
                "or 'cuda:<index>'"
            )
        return self._add_region(
            allocate_region(
                next(self._region_ids), size, use_hugepages=self.config.transfer.use_hugepages
            )
        )

    def register(self, buffer: object) -> MemoryRegion | DeviceRegion:
        """Register a caller's writable buffer (numpy, memoryview, bytearray, mmap, torch
        tensor; a CUDA tensor becomes a ``DeviceRegion``).

        The caller keeps the buffer alive until ``unregister``. Peers reach registered buffers
        over tcp (shm needs host memory from ``allocate``).

        Raises:
            SegmentError: the buffer cannot be registered (read-only, non-contiguous, ...).
        """
        return self._add_region(register_buffer(next(self._region_ids), buffer))

    def _add_region(self, region: _R) -> _R:
        if isinstance(region, DeviceRegion):
            self._has_device = True  # submit stages only from here on
        self._regions[region.region_id] = region
        return region

    def unregister(self, region: MemoryRegion | DeviceRegion) -> None:
        """Stop serving and moving ``region``; peers' later requests to it are refused."""
        if self._regions.pop(region.region_id, None) is None:
            raise SegmentError(f"{region!r} is not registered with this engine")
        region.close()

    @property
    def regions(self) -> list[MemoryRegion | DeviceRegion]:
        return list(self._regions.values())

    # -- serving --------------------------------------------------------------------------
    def listen(
        self,
        segment_name: str | None = None,
        *,
        call: CallHandler | None = None,
        service: dict[str, Any] | None = None,
    ) -> str:
        """Serve this engine's regions to peers; return the segment name they open.

        ``call`` handles CALL frames and ``service`` (JSON-ready) is announced in the handshake:
        a service mounted on the listener (the store server) and how it describes itself.

        Binds ``listen.bind_address:listen.port`` (127.0.0.1 by default). With p2p metadata the
        name is "host:port"; with redis metadata ``segment_name`` (default "host:port") is
        published. A failed call leaves nothing listening.

        Raises:
            PeerClosed: the address cannot be bound or the metadata service is unreachable.
            SegmentError: the metadata service cannot publish ``segment_name`` (p2p: any name
                but the listener's host:port).
        """
        with self._lock:
            if self._server is not None:
                assert self.segment_name is not None
                return self.segment_name
            self._service = dict(service or {})
            server = TargetServer(
                self._regions,
                self._describe,
                self.config.listen,
                self.config.transfer,
                self._metrics.group("server"),
                call,
            )
            host, port = server.start()
            self._server = server
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        name = segment_name or f"{host}:{port}"
        try:
            self._metadata_service().publish(name, (host, port), self.instance)
        except BaseException:
            # Not serving under a name no one can resolve: the engine is as before the call.
            with self._lock:
                if self._server is server:
                    self._server = None
            server.close()
            raise
        self.segment_name = name
        ttl = self.config.metadata.ttl
        if ttl > 0:
            # An entry with a ttl expires unless refreshed: refresh it while this engine serves.
            self._republisher = Republisher(
                self._metadata_service(), name, (host, port), self.instance, ttl
            )
        return name

    @property
    def address(self) -> tuple[str, int] | None:
        """The (host, port) the listener is bound to, or None before ``listen``."""
        return self._server.address if self._server else None

    def _describe(self) -> dict[str, Any]:
        return {
            "version": wire.WIRE_VERSION,
            "ops": ["readv", "writev"],
            "max_frame": self.config.transfer.max_frame_size,
            "instance": self.instance,
            "boot_id": self._ctx.boot_id,
            "pid": self._ctx.pid,
            "regions": [
                {
                    "id": r.region_id,
                    "size": r.size,
                    "location": r.location,
                    "shm": r.shm.to_json() if r.shm else None,
                    "writable": r.peer_writable,
                }
                for r in list(self._regions.values())
            ],
            "service": self._service,
        }

    # -- segments -------------------------------------------------------------------------
    def open_segment(self, name: str, *, refresh: bool = False) -> SegmentHandle:
        """Open a peer's segment (or this engine's own, by its name) for transfers.

        Resolves the name through the metadata service, does the handshake (learning the
        target's regions) and picks a transport. Handles are cached per name.

        Raises:
            SegmentError: the name is malformed/unknown or the forced transport cannot reach it.
            PeerClosed: the target cannot be reached.
            AuthError: the target refused our token.
        """
        with self._lock:
            if self._closed:
                raise SegmentError("engine is closed")
            cached = self._handles.get(name)
        if cached is not None and not refresh:
            return cached
        if name == self.segment_name:
            peer = self._self_peer(name)
        else:
            address = self._metadata_service().resolve(name)
            sock, peer = handshake.connect(
                address,
                token=self._token(),
                timeout=self.config.transfer.connect_timeout,
                name=name,
            )
            sock.close()
        transport = self._pick_transport(peer)
        handle = SegmentHandle(name, peer, transport.name, transport.open(peer))
        with self._lock:
            old = self._handles.get(name)
            self._handles[name] = handle
            self._open_channels = tuple(h.channel for h in self._handles.values())
        if old is not None:
            old.channel.close()
        return handle

    def close_segment(self, handle: SegmentHandle) -> None:
        """Close a handle's channel; its pending requests fail with PeerClosed."""
        with self._lock:
            if self._handles.get(handle.name) is handle:
                del self._handles[handle.name]
                self._open_channels = tuple(h.channel for h in self._handles.values())
        handle.channel.close()

    def _self_peer(self, name: str) -> PeerInfo:
        doc = self._describe()
        address = self.address or ("127.0.0.1", 0)
        return handshake.parse_peer(doc, address, name)

    def _token(self) -> str | None:
        token = self.config.listen.auth_token
        return token.get_secret_value() if token is not None else None

    def _transport(self, name: str) -> Transport:
        with self._lock:
            transport = self._transports.get(name)
            if transport is None:
                cls = load_transport(name)
                self._ctx.counters.setdefault(name, self._metrics.group(name))
                transport = self._transports[name] = cls(self.config.transfer, self._ctx)
            return transport

    def _pick_transport(self, peer: PeerInfo) -> Transport:
        forced = self.config.transfer.transport
        if forced != "auto":
            transport = self._transport(forced)
            if not transport.reachable(peer):
                raise SegmentError(
                    f"transport {forced!r} cannot reach segment {peer.name} "
                    f"(local: same engine only; shm: same host and allocated memory only); "
                    "use transport 'auto' or 'tcp'"
                )
            return transport
        for name in AUTO_ORDER:
            transport = self._transport(name)
            if transport.reachable(peer):
                return transport
        raise SegmentError(f"no transport can reach {peer.name}")  # pragma: no cover - tcp can

    def _metadata_service(self) -> MetadataService:
        with self._lock:
            if self._metadata is None:
                cls = load_metadata(self.config.metadata.backend)
                self._metadata = cls(self.config.metadata)
            return self._metadata

    # -- batches --------------------------------------------------------------------------
    def allocate_batch(self, capacity: int) -> Batch:
        """A batch that can hold up to ``capacity`` requests."""
        return Batch(next(self._batch_ids), capacity)

    def submit(self, batch: Batch, requests: Sequence[TransferRequest]) -> None:
        """Validate every request, then start them all (returns without waiting).

        Raises:
            SegmentError: a request is invalid (unknown region or handle, range out of bounds,
                batch full or freed); nothing of this call was started.
        """
        if batch.freed:
            raise SegmentError(f"{batch!r} was freed")
        if len(batch.requests) + len(requests) > batch.capacity:
            raise SegmentError(
                f"{batch!r} holds at most {batch.capacity} requests; "
                f"{len(batch.requests)} submitted, {len(requests)} more asked"
            )
        if len(requests) == 1 and not self._has_device:
            # a lone request (a KV block fetched on demand): the same steps, without the
            # grouping and staging a batch needs
            request, region_id = self._check(requests[0])
            channel = request.target.channel
            length = request.length
            state = batch._add_one(
                length,
                1 if length < channel.single_below else channel.slice_count(length, region_id),
            )
            channel.post(
                [
                    WorkItem(
                        state,
                        request.op,
                        request.local,  # type: ignore[arg-type]  # no device regions: host
                        request.local_offset,
                        region_id,
                        request.target_offset,
                        length,
                    )
                ]
            )
            return
        checked = [self._check(r) for r in requests]
        runs: list[staging.Run] = []
        host: MemoryRegion | None = None
        if self._has_device:
            runs, host, staged = self._stage([r for r, _ in checked])
        states = batch._add_many(
            [
                (
                    r.length,
                    1
                    if r.length < r.target.channel.single_below
                    else r.target.channel.slice_count(r.length, rid),
                )
                for r, rid in checked
            ]
        )
        if host is not None:
            for run in runs:
                if run.op is OpCode.READ:
                    staging.ReadRun(run, host, states)
        groups: dict[int, tuple[Channel, list[WorkItem]]] = {}
        for i, ((request, region_id), state) in enumerate(zip(checked, states, strict=True)):
            channel = request.target.channel
            local, local_offset = request.local, request.local_offset
            if isinstance(local, DeviceRegion):
                assert host is not None
                local, local_offset = host, staged[i]
            item = WorkItem(
                state,
                request.op,
                local,
                local_offset,
                region_id,
                request.target_offset,
                request.length,
            )
            groups.setdefault(id(channel), (channel, []))[1].append(item)
        for channel, items in groups.values():
            channel.post(items)

    @staticmethod
    def _stage(
        requests: list[TransferRequest],
    ) -> tuple[list[staging.Run], MemoryRegion | None, dict[int, int]]:
        """Stage the requests whose local buffer is device memory (``kvferry.transfer.staging``):
        their runs, one pinned host buffer for all, and each one's offset in it (by index). The
        WRITE runs' bytes are copied into it now, before anything is posted.

        Raises:
            TransferError: a device copy failed; nothing of this submit was started.
        """
        size, runs = staging.plan(requests)
        if not runs:
            return [], None, {}
        try:
            host = staging.stage_buffer(runs, size)
            staging.copy_out(runs, host)
        except Exception as e:  # CUDA errors come as RuntimeError (or torch's own)
            raise TransferError(
                f"staging {size} bytes of device memory through host memory: {e}"
            ) from e
        offsets = {i: run.host_offset + at for run in runs for i, at, _ in run.members}
        return runs, host, offsets

    def _check(self, r: TransferRequest) -> tuple[TransferRequest, int]:
        if self._regions.get(r.local.region_id) is not r.local:
            raise SegmentError(f"local buffer {r.local!r} is not registered with this engine")
        if self._handles.get(r.target.name) is not r.target:
            raise SegmentError(f"segment handle {r.target.name!r} is not open in this engine")
        if r.length <= 0:
            raise SegmentError(f"length must be positive, got {r.length}")
        if r.local_offset < 0 or r.local_offset + r.length > r.local.size:
            raise SegmentError(
                f"local range [{r.local_offset}, {r.local_offset + r.length}) is outside "
                f"{r.local!r}"
            )
        region = r.target.peer.region(r.target_region)
        if not region.writable and r.op is OpCode.WRITE:
            raise SegmentError(
                f"region {region.region_id} of {r.target.name} is read-only to peers "
                "(a store server's pool: write blocks with its put calls)"
            )
        if r.target_offset < 0 or r.target_offset + r.length > region.size:
            raise SegmentError(
                f"target range [{r.target_offset}, {r.target_offset + r.length}) is outside "
                f"region {region.region_id} of {r.target.name} ({region.size} bytes)"
            )
        return r, region.region_id

    def status(self, batch: Batch) -> BatchStatus:
        """Overall and per-request state; drives pending I/O a step without blocking."""
        if batch.is_done():
            return batch.status()
        for channel in self._open_channels:
            channel.poll()
        return batch.status()

    def wait(self, batch: Batch, timeout: float | None = None) -> BatchStatus:
        """Drive and wait until the batch is done or ``timeout`` seconds pass.

        Returns the status either way (PENDING after a timeout). Transfers themselves fail with
        TransferTimeout after ``transfer.transfer_timeout``, so a wait without timeout ends.
        """
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while not batch.is_done():
            channels = self._open_channels
            if len(channels) == 1:
                channels[0].progress(batch, deadline)
            else:
                for channel in channels:
                    channel.progress(batch, min(deadline, time.monotonic() + 0.001))
                if not channels:
                    batch.wait_done(max(0.0, min(0.01, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                break
        return batch.status()

    def free_batch(self, batch: Batch) -> None:
        """Release a finished batch.

        Raises:
            TransferError: requests are still pending (wait for them first).
        """
        if not batch.is_done():
            raise TransferError(f"{batch!r} still has pending requests; wait for it first")
        batch.freed = True

    def transfer_sync(
        self, requests: Sequence[TransferRequest], timeout: float | None = None
    ) -> None:
        """Submit requests as one batch and wait; raise the first error if any failed.

        Raises:
            SegmentError: invalid request (nothing started).
            TransferError: a request failed or did not finish within ``timeout``.
        """
        batch = self.allocate_batch(max(1, len(requests)))
        self.submit(batch, requests)
        status = self.wait(batch, timeout)
        if status.state is TransferState.PENDING:
            raise TransferError(f"batch did not finish within {timeout}s")
        if status.state is TransferState.FAILED:
            first: KvferryError = status.errors[0]
            raise first
        batch.freed = True

    # -- observability & lifecycle --------------------------------------------------------
    def metrics(self) -> dict[str, dict[str, object]]:
        """Counters per transport (and "server" for bytes served): bytes, requests, errors,
        retries, latency histogram."""
        return self._metrics.snapshot()

    def stop_listening(self) -> None:
        """Stop serving peers (no new connection; those open are closed once their request in
        progress ends) but keep every region: what a server does before its last work on them
        (a store server's flush to disk). Idempotent; ``close`` does it too."""
        with self._lock:
            server, self._server = self._server, None
            republisher, self._republisher = self._republisher, None
        if republisher is not None:
            republisher.stop()
        if server is not None:
            server.close()

    def close(self) -> None:
        """Close channels, stop serving, unpublish and free regions; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handles = list(self._handles.values())
            self._handles.clear()
            self._open_channels = ()
            server, self._server = self._server, None
            republisher, self._republisher = self._republisher, None
            metadata = self._metadata
        if republisher is not None:
            republisher.stop()
        for handle in handles:
            handle.channel.close()
        if server is not None:
            server.close()
        if metadata is not None:
            if self.segment_name is not None:
                metadata.unpublish(self.segment_name)
            metadata.close()
        for transport in self._transports.values():
            transport.close()
        for region in list(self._regions.values()):
            region.close()
        self._regions.clear()

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def requests_for(
    op: Any,
    local: MemoryRegion | DeviceRegion,
    target: SegmentHandle,
    offsets: Iterable[tuple[int, int]],
    length: int,
) -> list[TransferRequest]:
    """Convenience: one request per (local_offset, target_offset) pair of ``length`` bytes."""
    return [TransferRequest(op, local, lo, target, to, length) for lo, to in offsets]
