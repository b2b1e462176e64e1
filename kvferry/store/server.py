"""The kvferry store server: a single-node process serving a TieredStore over the wire protocol.

The server is a TransferEngine target whose first tier (cpu) lives in an engine-allocated region,
so a peer can read or write block bytes with plain transfer-engine READ/WRITE frames or, on the
same host, straight through the shm mapping; the store calls (lookup, get, put, locate, ...) ride
in CALL frames on the same listener, behind the same handshake and token. Every payload is
validated (``protocol``); a bad call gets an ERR reply and the connection goes on; a malformed
frame closes only that connection.

Blocks handed out by LOCATE or RESERVE are pinned by store leases: a client that vanishes
loses them at ``store.lease_seconds``, never pins them forever.

A committed block is immutable to peers: the pool is registered read-only to the wire (WRITE
and WRITEV frames into it are refused), PUT copies into fresh slots only, and a same-host client
that writes through the shared mapping after RESERVE declares each block's checksum at COMMIT,
which publishes only slots that hold exactly those bytes. Every block it lends (GET, LOCATE)
goes out with its checksum, and clients check what they received (``protocol``).

Each request counts once in the store's statistics (whoever runs the server serves them on
``store.metrics_port`` with ``kvferry.telemetry.prometheus.export_store``): CONTAINS
(a client store's lookup) and LOOKUP as lookups, GET and LOCATE as gets, PUT and RESERVE+COMMIT
as puts; the store calls that serve a request are made with ``count=False``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import ClassVar

from kvferry.backends.base import Key, SlotTier, Tier, TierContext
from kvferry.backends.cpu import CpuTier
from kvferry.backends.disk import instance_directory
from kvferry.backends.registry import check_tiers, load_tier
from kvferry.backends.server import protocol as p
from kvferry.backends.server.membership import Registration
from kvferry.config.models import KvferryConfig
from kvferry.errors import ConfigError, LeaseExpired, ProtocolError
from kvferry.observe.logs import RateLimitedLog
from kvferry.store import LoadHandle, StoreHandle, TieredStore
from kvferry.transfer.engine import TransferEngine
from kvferry.transfer.server import CallReply

log = logging.getLogger("kvferry.store.server")
_client_log = RateLimitedLog(log)  # what clients can provoke, at a rate


def _check_bindable(host: str, port: int, what: str) -> None:
    """Bind ``host:port`` once and let it go: an address that is not this host's or a port in
    use fails here, before the tiers are allocated, rather than at ``start``.

    Raises:
        ConfigError: the bind failed; names the address, the error and the keys to change.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener does
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {e.strerror or e}; give an address of this "
                f"host (listen.bind_address, --bind) and a free {what}, or 0 for any free port"
            ) from e


class StoreServer:
    """A store server; ``start`` listens, ``close`` stops.

    Args:
        config: ``store`` (tiers must be local: cpu, disk), the tiers' sections, ``listen``
            (bind address, port, token), ``transfer``; ``server.membership_url`` set means
            register this server there. A disk tier without ``disk.path`` on a fixed port
            keeps its files in ``~/.cache/kvferry/disk/store-<port>`` (so servers on one host
            never share a directory, and a restart on the port finds its blocks); on port 0,
            in private files that go with the process (``kvferry.backends.disk``).

    Everything is validated before anything is allocated: the tier names, the listen address
    and port (and ``store.metrics_port``) by a trial bind, and every tier's limits
    (``Tier.check``: memory for cpu, free space and path for disk), so a bad value fails in
    milliseconds, not after the cpu pool was touched.

    Raises:
        ConfigError: a shared tier (redis, server, mooncake) in ``store.tiers``, an address or
            port that cannot be bound, or a tier config the host cannot honour.
    """

    def __init__(self, config: KvferryConfig) -> None:
        sections = set()
        for name in config.store.tiers:
            cls = load_tier(name)
            if cls.shared:
                raise ConfigError(
                    f"store.tiers: a store server holds local tiers only (cpu, disk), not {name!r}"
                )
            sections.add(cls.config_section)
        if "disk" in sections and not config.disk.path and config.listen.port:
            path = instance_directory(f"store-{config.listen.port}")
            config = config.model_copy(
                update={"disk": config.disk.model_copy(update={"path": path})}
            )
        self.config = config
        listen = config.listen
        _check_bindable(listen.bind_address, listen.port, "listen.port (--port)")
        if config.store.metrics_port:
            _check_bindable(
                listen.bind_address,
                config.store.metrics_port,
                "store.metrics_port (--metrics-port)",
            )
        classes = check_tiers(config.store.tiers, config)
        self.engine = TransferEngine(config)
        tiers: list[Tier] = []
        try:
            for i, cls in enumerate(classes):
                ctx = TierContext(
                    slot_size=config.store.slot_size,
                    label=cls.name,
                    allocate=self.engine.allocate if i == 0 else None,
                )
                tiers.append(cls(getattr(config, cls.config_section), ctx))
        except BaseException:
            for tier in tiers:
                tier.close()
            self.engine.close()
            raise
        self.store = TieredStore(config, tiers=tiers)
        first = self.store.first
        self._region_id = 0
        if isinstance(first, CpuTier):
            first.region.peer_writable = False  # blocks are written by PUT or RESERVE/COMMIT
            self._region_id = first.region.region_id
        self._leases: dict[int, LoadHandle | StoreHandle] = {}
        # GET copies blocks it cannot lend (not in the cpu tier) into fresh buffers: at most
        # this many bytes of them per call.
        self._copy_budget = int(config.transfer.max_frame_size)
        self._copy_skipped = 0
        self._lock = threading.Lock()
        self.address: tuple[str, int] = ("", 0)
        self._stop = threading.Event()
        self.registration: Registration | None = None
        """This server's lease in the membership (``server.membership_url``), once started."""

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        """Listen (``listen.bind_address:listen.port``); returns the bound (host, port)."""
        self.engine.listen(call=self._call, service={"store_protocol": p.PROTOCOL_VERSION})
        address = self.engine.address
        assert address is not None
        self.address = address
        if self.config.server.membership_url:
            self._register()
        return self.address

    def close(self) -> None:
        """Leave the membership, stop serving, write the blocks only the memory tier holds to
        the disk tier (at most ``store.shutdown_flush_seconds``), then free everything;
        idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self.registration is not None:
            self.registration.close()  # first: clients stop routing here before we stop serving
        # No peer may change the store while it is flushed; the pool must live until then.
        self.engine.stop_listening()
        try:
            seconds = self.config.store.shutdown_flush_seconds
            if seconds > 0:
                flushed = self.store.flush(seconds)
                if flushed:
                    log.info("store server: wrote %d blocks to disk before closing", flushed)
        finally:
            self.engine.close()
            self.store.close()

    def __enter__(self) -> StoreServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- membership -----------------------------------------------------------------------
    def _member(self) -> str:
        """host:port that clients dial: listen.advertise_address, else the bound address (the
        hostname when bound to all interfaces, which no other machine could dial)."""
        host, port = self.address
        if self.config.listen.advertise_address:
            host = self.config.listen.advertise_address
        elif host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # IPv6: host:port stays parseable
        return f"{host}:{port}"

    def _register(self) -> None:
        cfg = self.config.server
        reg = Registration(
            cfg.membership_url, cfg.membership_key, self._member(), cfg.membership_ttl
        )
        try:
            reg.start()
        except BaseException:
            reg.close()
            raise
        self.registration = reg

    # -- calls ------------------------------------------------------------------------------
    def _call(self, method: int, payload: memoryview) -> CallReply:
        try:
            m = p.Method(method)
        except ValueError:
            raise ProtocolError(f"unknown store method {method}") from None
        handler = self._handlers.get(m)
        if handler is None:  # pragma: no cover - every Method has a handler
            raise ProtocolError(f"method {m.name} is not served")
        return handler(self, payload)

    def _lookup(self, buf: memoryview) -> CallReply:
        keys, pos = p.decode_keys(buf)
        p.expect_end(buf, pos)
        return CallReply([p.U32.pack(self.store.lookup(keys))])

    def _contains(self, buf: memoryview) -> CallReply:
        t0 = time.perf_counter_ns()
        keys, pos = p.decode_keys(buf)
        p.expect_end(buf, pos)
        present = self.store.contains(keys)
        # A client store's lookup reaches a server as CONTAINS: count it as this store's lookup.
        self.store.count_lookup(len(keys), sum(present), t0)
        return CallReply([bytes(present)])

    def _present_pinned(
        self, keys: list[Key]
    ) -> tuple[LoadHandle | None, dict[Key, int], list[Key]]:
        """Pin the present blocks among ``keys``: (handle, key -> index in handle.buffers, the
        present blocks it could not pin, in order and without repeats)."""
        present = list(dict.fromkeys(k for k, ok in zip(keys, self.store.contains(keys)) if ok))
        if not present:
            return None, {}, []
        handle = self.store.prepare_load(present, count=False)  # the caller counts its request
        where = {k: i for i, k in enumerate(handle.hashes)}
        return handle, where, [k for k in present if k not in where]

    def _lent_checks(self, handle: LoadHandle | None) -> list[int | None]:
        """For each of a load handle's (pinned) blocks, the checksum a client must check it
        against (the slot is guarded), or None; empty when none needs a check."""
        first = self.store.first
        if handle is None or not isinstance(first, SlotTier):
            return []
        sums = first.checksums(handle.hashes)
        return sums if any(c is not None for c in sums) else []

    def _get(self, buf: memoryview) -> CallReply:
        t0 = time.perf_counter_ns()
        keys, pos = p.decode_keys(buf)
        p.expect_end(buf, pos)
        handle, where, rest = self._present_pinned(keys)
        # Present blocks the pinned prefix did not cover (a batch larger than the cpu tier, or
        # blocks only on disk that found no cpu slot) are copied out instead of lent: as many
        # as the copy budget holds (a request of a million keys must not allocate a slot per
        # key); the others answer MISS and count, and the client reads them as misses.
        budget = max(1, self._copy_budget // self.store.slot_size)
        if len(rest) > budget:
            self._copy_skipped += len(rest) - budget
            rest = rest[:budget]
        copied: dict[Key, memoryview] = {}
        if rest:
            outs = [memoryview(bytearray(self.store.slot_size)) for _ in rest]
            for k, out, n in zip(rest, outs, self.store.get(rest, outs, count=False)):
                if n is not None:
                    copied[k] = out[:n]
        # Lent blocks in guarded slots go out with the checksum the client must check; copies
        # were checked by the tier that made them.
        lent = self._lent_checks(handle)
        lengths: list[int] = []
        sums: list[int | None] = []
        parts: list[bytes | memoryview] = []
        for k in keys:
            i = where.get(k)
            view: memoryview | None
            if i is not None and handle is not None:
                view = handle.buffers[i]
                sums.append(lent[i] if lent else None)
            else:
                view = copied.get(k)
                sums.append(None)
            if view is None:
                lengths.append(p.MISS)
            else:
                lengths.append(len(view))
                parts.append(view)
        self.store.count_get(len(keys), len(keys) - lengths.count(p.MISS), t0)
        head = [p.U8.pack(p.SUMS if lent else 0), p.encode_u32s(lengths)]
        if lent:
            head.append(p.encode_checks(sums))
        if handle is None:
            return CallReply([*head, *parts])
        return CallReply([*head, *parts], after=lambda: self._complete_load(handle))

    def _complete_load(self, handle: LoadHandle) -> None:
        try:
            self.store.complete_load(handle)
        except LeaseExpired as e:
            _client_log.warning("lease", "store server: %s", e)

    def _put(self, buf: memoryview) -> CallReply:
        keys, pos = p.decode_keys(buf)
        lengths, pos = p.decode_u32s(buf, pos, len(keys), "value lengths")
        if pos + sum(lengths) != len(buf):
            raise ProtocolError(
                f"PUT announces {sum(lengths)} value bytes but carries {len(buf) - pos}"
            )
        values: list[memoryview] = []
        for n in lengths:
            values.append(buf[pos : pos + n])
            pos += n
        return CallReply([p.encode_statuses(self.store.put(keys, values))])

    def _delete(self, buf: memoryview) -> CallReply:
        keys, pos = p.decode_keys(buf)
        p.expect_end(buf, pos)
        return CallReply([p.U32.pack(self.store.delete(keys))])

    def _locate(self, buf: memoryview) -> CallReply:
        t0 = time.perf_counter_ns()
        keys, pos = p.decode_keys(buf)
        p.expect_end(buf, pos)
        handle, where, _ = self._present_pinned(keys)
        lease_id = 0
        if handle is not None and handle.lease is not None:
            lease_id = handle.lease.lease_id
            self._remember(lease_id, handle)
        lent = self._lent_checks(handle)
        out = [p.LOCATE_HEAD.pack(lease_id, self._region_id, p.SUMS if lent else 0)]
        sums: list[int | None] = []
        found = 0
        for k in keys:
            i = where.get(k)
            loc = None if i is None or handle is None else handle.locations[i]
            if loc is None or i is None:
                out.append(p.LOC.pack(0, p.MISS))
                sums.append(None)
            else:
                out.append(p.LOC.pack(*loc))
                sums.append(lent[i] if lent else None)
                found += 1
        if lent:
            out.append(p.encode_checks(sums))
        self.store.count_get(len(keys), found, t0)
        return CallReply([b"".join(out)])

    def _release(self, buf: memoryview) -> CallReply:
        if len(buf) != 8:
            raise ProtocolError("RELEASE carries one u64 lease id")
        (lease_id,) = p.U64.unpack(buf)
        with self._lock:
            handle = self._leases.pop(lease_id, None)
        if not isinstance(handle, LoadHandle):
            raise LeaseExpired(f"lease {lease_id} is unknown or already ended")
        self.store.complete_load(handle)
        return CallReply([])

    def _reserve(self, buf: memoryview) -> CallReply:
        keys, pos = p.decode_keys(buf)
        sizes, pos = p.decode_u32s(buf, pos, len(keys), "sizes")
        p.expect_end(buf, pos)
        if not isinstance(self.store.first, SlotTier):  # pragma: no cover - cpu is first
            raise ProtocolError("this server's first tier lends no slots")
        handle = self.store.prepare_store(keys, sizes)
        lease_id = handle.lease.lease_id if handle.lease is not None else 0
        if lease_id:
            self._remember(lease_id, handle)
        # A slot whose earlier holder vanished is guarded: its writer must declare what it wrote.
        declare = self.store.first.needs_checksum(handle.hashes)
        out = [p.LEASE_REGION.pack(lease_id, self._region_id)]
        for status, loc, d in zip(handle.status, handle.locations, declare):
            out.append(p.RES.pack(p.STATUS_CODE[status], loc[0] if loc else 0, d))
        return CallReply([b"".join(out)])

    def _commit(self, buf: memoryview) -> CallReply:
        if len(buf) < 8:
            raise ProtocolError("COMMIT starts with a u64 lease id")
        (lease_id,) = p.U64.unpack_from(buf, 0)
        with self._lock:
            handle = self._leases.pop(lease_id, None)
        if not isinstance(handle, StoreHandle):
            raise LeaseExpired(f"lease {lease_id} is unknown or already ended")
        n = len(handle.hashes)
        if len(buf) != 8 + 9 * n:
            raise ProtocolError(
                f"COMMIT of {n} blocks carries {len(buf) - 8} bytes; want {n} flags and "
                f"{n} u64 checksums ({9 * n} bytes)"
            )
        ok = bytes(buf[8 : 8 + n])
        sums, _ = p.decode_u64s(buf, 8 + n, n, "checksums")
        final = self.store.complete_store(handle, [b == 1 for b in ok], sums)
        return CallReply([p.encode_statuses(final)])

    def _stats(self, buf: memoryview) -> CallReply:
        doc = self.store.stats().to_json()
        doc["server"] = {"get_copy_skipped": self._copy_skipped}
        return CallReply([json.dumps(doc).encode()])

    def _check(self, buf: memoryview) -> CallReply:
        keys, pos = p.decode_keys(buf)
        p.expect_end(buf, pos)
        return CallReply([p.U32.pack(self.store.verify(keys))])

    def _keys(self, buf: memoryview) -> CallReply:
        keys: list[Key] = []
        for tier in self.store.tiers:
            keys.extend(tier.keys())
        return CallReply([p.encode_keys(list(dict.fromkeys(keys)))])

    def _remember(self, lease_id: int, handle: LoadHandle | StoreHandle) -> None:
        with self._lock:
            self._leases[lease_id] = handle
            if len(self._leases) > 4096:
                # Leases the store expired (a vanished client) leave our table here.
                dead = [i for i, h in self._leases.items() if h.lease is None or not h.lease.active]
                for i in dead:
                    del self._leases[i]

    _handlers: ClassVar[dict[p.Method, Callable[[StoreServer, memoryview], CallReply]]] = {
        p.Method.LOOKUP: _lookup,
        p.Method.CONTAINS: _contains,
        p.Method.GET: _get,
        p.Method.PUT: _put,
        p.Method.DELETE: _delete,
        p.Method.LOCATE: _locate,
        p.Method.RELEASE: _release,
        p.Method.RESERVE: _reserve,
        p.Method.COMMIT: _commit,
        p.Method.STATS: _stats,
        p.Method.KEYS: _keys,
        p.Method.CHECK: _check,
    }
