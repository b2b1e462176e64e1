"""The server tier: kvferry store servers (``kvferry serve store``) as a shared remote tier.

Keys are spread over the servers by consistent hashing (``ring``); the member list comes from
``server.addresses`` or from the Redis hash the servers register in (``server.membership_url``).
Each thread keeps one connection per server (a call is one request/reply on it).

Data paths, picked per server:
- same host (``transport: auto`` and the server's handshake shows our boot id): LOCATE pins the
  blocks and gives their offsets in the server's pool, the bytes are copied straight out of the
  shared mapping, RELEASE unpins (put: RESERVE, copy in, COMMIT);
- otherwise inline over tcp: GET's reply carries the bytes, received straight into the caller's
  buffers (no staging copy); PUT carries them in the request.

Every block a server lends comes with its checksum (``protocol``): the bytes received (tcp) or
copied out of the shared pool (same host) are checked against it, and a block that does not match
is a miss, counted (``corrupt``), and reported to the server with CHECK so that it re-checks and
drops it. A put through the shared pool declares each block's checksum at COMMIT.

Any socket failure closes that connection (a half-read reply must never be parsed as the next
one) and raises :class:`~kvferry.errors.StorageError` naming the server; the next call
reconnects.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from kvferry.backends.base import (
    Buffer,
    Key,
    PutStatus,
    Tier,
    TierContext,
    TierStats,
    block_checksum,
)
from kvferry.backends.server import protocol as p
from kvferry.backends.server.ring import HashRing
from kvferry.config.models import ServerTierConfig
from kvferry.errors import ConfigError, KvferryError, MissingDependency, PeerClosed, StorageError
from kvferry.observe.logs import RateLimitedLog
from kvferry.transfer import handshake, wire
from kvferry.transfer.host import boot_id as _boot_id
from kvferry.transfer.memory import PeerMapping
from kvferry.transfer.segment import PeerInfo

log = logging.getLogger("kvferry.backends.server")
_corrupt_log = RateLimitedLog(log)

_MEMBERSHIP_REFRESH_S = 5.0
_MEMBER_STALE_S = 10.0


class _Conn:
    __slots__ = ("peer", "sock", "used")

    def __init__(self, sock: socket.socket, peer: PeerInfo) -> None:
        self.sock = sock
        self.peer = peer
        self.used = False
        """A call has completed on it: it may since have been closed by the server's idle
        timeout, and a call that finds it so is retried once on a fresh connection."""


class ServerTier(Tier):
    """Client of one or more store servers; see the module docstring."""

    name = "server"
    config_section = "server"
    shared = True

    def __init__(self, config: ServerTierConfig, context: TierContext) -> None:
        super().__init__(config, context)
        self.cfg = config
        self._token = config.auth_token.get_secret_value() if config.auth_token else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._maps: dict[tuple[str, int], PeerMapping] = {}
        self._boot = _boot_id()
        self._req_ids = itertools.count(1)
        self._ring_at = 0.0
        self._closed = False
        self._corrupt = 0
        self._ring = self._load_ring()

    # -- membership -------------------------------------------------------------------------
    def _load_ring(self) -> HashRing:
        members = list(self.cfg.addresses)
        if self.cfg.membership_url:
            members += self._members_from_redis()
        if not members:
            raise ConfigError(
                "server tier: no store server known; set server.addresses (host:port, ...) or "
                "server.membership_url where servers register"
            )
        for m in members:
            _parse_address(m)
        self._ring_at = time.monotonic()
        return HashRing(members, self.cfg.virtual_nodes)

    def _members_from_redis(self) -> list[str]:
        try:
            import redis
            import redis.backoff
            import redis.retry
        except ImportError as e:
            raise MissingDependency("redis", "redis") from e
        # Read inside a tier call every few seconds: one server.timeout at most against a hung
        # Redis, no retry (the next refresh is the retry), and no client left open behind.
        timeout = self.cfg.timeout
        client = redis.Redis.from_url(
            self.cfg.membership_url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        )
        try:
            entries = client.hgetall(self.cfg.membership_key)
        except redis.RedisError as e:
            raise StorageError(
                f"server tier: cannot read the membership at {self.cfg.membership_url}: {e}"
            ) from e
        finally:
            client.close()
        now = time.time()
        members: list[str] = []
        for m, ts in entries.items():
            if now - float(ts) <= _MEMBER_STALE_S:
                members.append(m.decode() if isinstance(m, bytes) else str(m))
        return members

    def _ring_now(self) -> HashRing:
        if self.cfg.membership_url and time.monotonic() - self._ring_at > _MEMBERSHIP_REFRESH_S:
            try:
                self._ring = self._load_ring()
            except (StorageError, ConfigError) as e:
                log.warning("server tier: keeping the old member list: %s", e)
                self._ring_at = time.monotonic()
        return self._ring

    # -- connections ------------------------------------------------------------------------
    def _conn(self, member: str) -> _Conn:
        conns: dict[str, _Conn] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(member)
        if conn is None:
            if self._closed:
                raise StorageError("server tier is closed")
            try:
                sock, peer = handshake.connect(
                    _parse_address(member), token=self._token, timeout=self.cfg.timeout
                )
            except KvferryError as e:
                raise StorageError(f"server tier: store server {member}: {e}") from e
            version = peer.service.get("store_protocol")
            if version != p.PROTOCOL_VERSION:
                sock.close()
                raise StorageError(
                    f"server tier: {member} speaks store protocol {version!r}, this client "
                    f"{p.PROTOCOL_VERSION}: run the same kvferry version on both sides"
                )
            sock.settimeout(self.cfg.timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            conn = conns[member] = _Conn(sock, peer)
            with self._lock:
                self._conns.add(conn)
        return conn

    def _drop(self, member: str) -> None:
        conns: dict[str, _Conn] = getattr(self._local, "conns", {})
        conn = conns.pop(member, None)
        if conn is not None:
            with self._lock:
                self._conns.discard(conn)
            conn.sock.close()

    def _send(self, conn: _Conn, method: p.Method, parts: list[Buffer]) -> None:
        size = sum(len(x) for x in parts)
        head = wire.encode(wire.Op.CALL, region=method, req_id=next(self._req_ids), length=size)
        out: list[Buffer] = [head, *parts]
        while out:
            n = conn.sock.sendmsg(out[:512])
            while out and n >= len(out[0]):
                n -= len(out[0])
                out.pop(0)
            if n:
                out[0] = memoryview(out[0])[n:]

    def _reply_header(self, conn: _Conn, member: str) -> int:
        """Read a reply header; the payload length for OK, StorageError (after reading the
        message) for ERR.

        Raises:
            _Stale: the connection was closed before a byte of the reply came.
        """
        buf = bytearray(wire.HEADER_SIZE)
        first = conn.sock.recv_into(buf)
        if first == 0:
            raise _Stale("the server closed the connection")
        if first < wire.HEADER_SIZE:
            buf[first:] = handshake.recv_exact(conn.sock, wire.HEADER_SIZE - first)
        header = wire.decode(buf, reply=True, max_length=1 << 40)
        if header.op is wire.Op.ERR:
            message = bytes(handshake.recv_exact(conn.sock, header.length)).decode(errors="replace")
            raise _ServerRefused(f"server tier: store server {member} answered: {message}")
        return header.length

    def _request(self, member: str, method: p.Method, parts: list[Buffer]) -> tuple[_Conn, int]:
        """Send a call and read its reply header: (connection, reply payload length).

        A pooled connection the server closed meanwhile (its idle timeout, a restart) fails
        before any reply byte; the call is then made once more on a fresh connection.

        Raises:
            _ServerRefused: the server answered ERR (the connection stays good).
            OSError, KvferryError: the connection failed (the caller drops it).
        """
        conn = self._conn(member)
        try:
            self._send(conn, method, parts)
            return conn, self._reply_header(conn, member)
        except (_Stale, BrokenPipeError, ConnectionResetError):
            if not conn.used:
                raise
        self._drop(member)
        conn = self._conn(member)
        self._send(conn, method, parts)
        return conn, self._reply_header(conn, member)

    def _call(self, member: str, method: p.Method, parts: list[Buffer]) -> bytearray:
        try:
            conn, n = self._request(member, method, parts)
            reply = handshake.recv_exact(conn.sock, n)
            conn.used = True
            return reply
        except _ServerRefused as e:
            raise StorageError(str(e)) from None
        except StorageError:  # from _conn, which names the server already
            self._drop(member)
            raise
        except (OSError, KvferryError) as e:
            self._drop(member)
            raise StorageError(f"server tier: store server {member}: {e}") from e

    # -- sizes ------------------------------------------------------------------------------
    @property
    def capacity_blocks(self) -> None:
        return None

    @property
    def used_blocks(self) -> int:
        return self.stats().used_blocks

    # -- primitives -------------------------------------------------------------------------
    def contains(self, keys: Sequence[Key]) -> list[bool]:
        out = [False] * len(keys)
        for member, idx in self._ring_now().split(keys).items():
            reply = self._call(member, p.Method.CONTAINS, [p.encode_keys([keys[i] for i in idx])])
            if len(reply) != len(idx):
                raise StorageError(f"server tier: {member} sent a malformed CONTAINS reply")
            for i, b in zip(idx, reply):
                out[i] = b == 1
        return out

    def put(self, keys: Sequence[Key], values: Sequence[Buffer]) -> list[PutStatus]:
        limit = self.context.slot_size
        for v in values:
            if len(v) > limit:
                raise ValueError(
                    f"server tier: a {len(v)}-byte block is larger than store.slot_size ({limit})"
                )
        out = [PutStatus.NO_SPACE] * len(keys)
        for member, idx in self._ring_now().split(keys).items():
            ks = [keys[i] for i in idx]
            vs = [values[i] for i in idx]
            mapping = self._mapping(member)
            if mapping is not None:
                got = self._put_shm(member, mapping, ks, vs)
            else:
                head = p.encode_keys(ks) + p.encode_u32s([len(v) for v in vs])
                reply = self._call(member, p.Method.PUT, [head, *vs])
                got = p.decode_statuses(reply, len(ks))
            for i, s in zip(idx, got):
                out[i] = s
        return out

    def _put_shm(
        self, member: str, mapping: PeerMapping, ks: list[Key], vs: list[Buffer]
    ) -> list[PutStatus]:
        reply = self._call(
            member, p.Method.RESERVE, [p.encode_keys(ks), p.encode_u32s([len(v) for v in vs])]
        )
        if len(reply) != p.LEASE_REGION.size + p.RES.size * len(ks):
            raise StorageError(f"server tier: {member} sent a malformed RESERVE reply")
        lease, _region = p.LEASE_REGION.unpack_from(reply, 0)
        status: list[PutStatus] = []
        ok = bytearray(len(ks))
        sums: list[int] | None = None  # only when a slot is guarded (rare)
        view, size, stored, code_status = (
            mapping.view,
            mapping.size,
            PutStatus.STORED,
            p.CODE_STATUS,
        )
        entries = p.RES.iter_unpack(memoryview(reply)[p.LEASE_REGION.size :])
        for i, ((code, offset, declare), k, v) in enumerate(zip(entries, ks, vs)):
            s = code_status.get(code, PutStatus.NO_SPACE)
            status.append(s)
            if s is stored:
                n = len(v)
                if offset + n > size:
                    raise StorageError(f"server tier: {member} reserved outside its pool")
                view[offset : offset + n] = v
                if declare:  # a guarded slot: of what we meant to write, not of the slot
                    if sums is None:
                        sums = [0] * len(ks)
                    sums[i] = block_checksum(k, v)
                ok[i] = 1
        if not lease:
            return status
        declared = p.encode_u64s(sums) if sums is not None else bytes(8 * len(ks))
        final = self._call(member, p.Method.COMMIT, [p.U64.pack(lease), bytes(ok), declared])
        return p.decode_statuses(final, len(ks))

    def get(self, keys: Sequence[Key], outs: Sequence[memoryview]) -> list[int | None]:
        res: list[int | None] = [None] * len(keys)
        for member, idx in self._ring_now().split(keys).items():
            ks = [keys[i] for i in idx]
            os_ = [outs[i] for i in idx]
            mapping = self._mapping(member)
            if mapping is not None:
                got = self._get_shm(member, mapping, ks, os_)
                # LOCATE lends only blocks it can pin in the server's cpu tier; the others
                # (a batch larger than that tier, blocks on its disk) come inline.
                again = [j for j, n in enumerate(got) if n is None]
                if again:
                    more = self._get_inline(member, [ks[j] for j in again], [os_[j] for j in again])
                    for j, n in zip(again, more):
                        got[j] = n
            else:
                got = self._get_inline(member, ks, os_)
            for i, n in zip(idx, got):
                res[i] = n
        return res

    def _get_inline(self, member: str, ks: list[Key], outs: list[memoryview]) -> list[int | None]:
        too_small: str | None = None
        try:
            conn, total = self._request(member, p.Method.GET, [p.encode_keys(ks)])
            n_keys = len(ks)
            table = handshake.recv_exact(conn.sock, 1 + 4 * n_keys)
            flags = table[0]
            lengths = list(memoryview(table)[1:].cast("I"))
            sums: list[int | None] = []
            if flags & p.SUMS:
                checks = memoryview(handshake.recv_exact(conn.sock, 9 * n_keys))
                sums, _ = p.decode_checks(checks, 0, n_keys)
            body = sum(n for n in lengths if n != p.MISS)
            if 1 + (13 if sums else 4) * n_keys + body != total:
                raise StorageError(f"server tier: {member} sent a malformed GET reply")
            got: list[int | None] = []
            sock = conn.sock
            for n, out in zip(lengths, outs):
                if n == p.MISS:
                    got.append(None)
                    continue
                # Straight into the caller's buffer: the reply bytes are copied once, by recv.
                target = out if len(out) >= n else memoryview(bytearray(n))
                if target is not out and too_small is None:
                    too_small = (
                        f"server tier: output buffer of {len(out)} bytes is smaller than the "
                        f"{n}-byte block"
                    )
                view = target[:n]
                have = 0
                while have < n:
                    k = sock.recv_into(view[have:], n - have)
                    if k == 0:
                        raise OSError("store server closed the connection mid-reply")
                    have += k
                got.append(n)
            conn.used = True
        except _ServerRefused as e:
            raise StorageError(str(e)) from None
        except StorageError:  # from _conn, which names the server already
            self._drop(member)
            raise
        except (OSError, KvferryError) as e:
            self._drop(member)
            raise StorageError(f"server tier: store server {member}: {e}") from e
        if too_small is not None:
            raise ValueError(too_small)
        if sums:
            self._check(member, ks, outs, got, sums)
        return got

    def _check(
        self,
        member: str,
        ks: list[Key],
        outs: Sequence[memoryview],
        got: list[int | None],
        sums: Sequence[int | None],
    ) -> None:
        """Check each received block the server asked to check (its slot is guarded) against
        its checksum; a mismatch becomes a miss (in ``got``), is counted, and is reported to
        the server (CHECK), which re-checks it."""
        bad: list[Key] = []
        for j, (k, out, n) in enumerate(zip(ks, outs, got)):
            want = sums[j]
            if n is not None and want is not None and block_checksum(k, out[:n]) != want:
                got[j] = None
                bad.append(k)
        if not bad:
            return
        with self._lock:
            self._corrupt += len(bad)
        _corrupt_log.warning(
            "corrupt",
            "server tier: %d block(s) from %s failed their checksum; read as misses",
            len(bad),
            member,
        )
        try:
            self._call(member, p.Method.CHECK, [p.encode_keys(bad)])
        except StorageError as e:
            log.warning("server tier: asking %s to re-check blocks failed: %s", member, e)

    def _get_shm(
        self, member: str, mapping: PeerMapping, ks: list[Key], outs: list[memoryview]
    ) -> list[int | None]:
        for out in outs:
            if len(out) < 1:
                raise ValueError("server tier: an output buffer is empty")
        reply = self._call(member, p.Method.LOCATE, [p.encode_keys(ks)])
        size = p.LOCATE_HEAD.size + p.LOC.size * len(ks)
        lease, _region, flags = p.LOCATE_HEAD.unpack_from(reply, 0)
        if len(reply) != size + (9 * len(ks) if flags & p.SUMS else 0):
            raise StorageError(f"server tier: {member} sent a malformed LOCATE reply")
        sums: list[int | None] = []
        if flags & p.SUMS:
            sums, _ = p.decode_checks(memoryview(reply), size, len(ks))
        pos = p.LOCATE_HEAD.size
        view = mapping.view
        got: list[int | None] = []
        error: str | None = None
        for out in outs:
            offset, n = p.LOC.unpack_from(reply, pos)
            pos += p.LOC.size
            if n == p.MISS:
                got.append(None)
            elif offset + n > mapping.size:
                error = f"server tier: {member} located a block outside its pool"
                got.append(None)
            elif len(out) < n:
                error = (
                    f"server tier: output buffer of {len(out)} bytes is smaller than the "
                    f"{n}-byte block"
                )
                got.append(None)
            else:
                out[:n] = view[offset : offset + n]
                got.append(n)
        if lease:
            self._call(member, p.Method.RELEASE, [p.U64.pack(lease)])
        if error is not None:
            if "smaller" in error:
                raise ValueError(error)
            raise StorageError(error)
        if sums:
            self._check(member, ks, outs, got, sums)
        return got

    def _mapping(self, member: str) -> PeerMapping | None:
        """The server's pool mapped here when it runs on this host (and transport is auto)."""
        if self.cfg.transport != "auto":
            return None
        conn = self._conn(member)
        peer = conn.peer
        if not self._boot or peer.boot_id != self._boot or not peer.regions:
            return None
        region = peer.regions[0]
        if region.shm is None:
            return None
        key = (member, peer.pid)
        with self._lock:
            mapping = self._maps.get(key)
            if mapping is None:
                try:
                    mapping = PeerMapping(region.shm, region.size)
                except KvferryError as e:
                    # Another pid namespace or a restarted server: fall back to tcp, say so.
                    log.warning("server tier: cannot map %s's pool (%s); using tcp", member, e)
                    return None
                self._maps[key] = mapping
        return mapping

    def delete(self, keys: Sequence[Key]) -> int:
        removed = 0
        for member, idx in self._ring_now().split(keys).items():
            reply = self._call(member, p.Method.DELETE, [p.encode_keys([keys[i] for i in idx])])
            removed += p.U32.unpack(reply)[0]
        return removed

    def keys(self) -> list[Key]:
        out: list[Key] = []
        for member in self._ring_now().members:
            reply = self._call(member, p.Method.KEYS, [])
            ks, _ = p.decode_keys(memoryview(reply))
            out.extend(ks)
        return out

    def server_stats(self) -> dict[str, dict[str, Any]]:
        """Each server's StoreStats as JSON, by address."""
        return {
            m: json.loads(bytes(self._call(m, p.Method.STATS, [])))
            for m in self._ring_now().members
        }

    def stats(self) -> TierStats:
        used = total = peak = 0
        for doc in self.server_stats().values():
            usage = doc.get("usage", {})
            first: dict[str, Any] = (
                next(iter(usage.values()), {}) if isinstance(usage, dict) else {}
            )
            used += int(first.get("used_blocks", 0))
            total += int(first.get("total_blocks") or 0)
            peak += int(first.get("peak_blocks", 0))
        return TierStats(
            total_blocks=None,
            used_blocks=used,
            peak_blocks=peak,
            extra={
                "servers": float(len(self._ring.members)),
                "server_slots": float(total),
                "corrupt": float(self._corrupt),
            },
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns, self._conns = self._conns, set()
            maps, self._maps = self._maps, {}
        for conn in conns:
            conn.sock.close()
        for mapping in maps.values():
            mapping.close()


class _ServerRefused(KvferryError):
    """The server answered ERR: the reply was read whole, the connection is still good."""


class _Stale(PeerClosed):
    """The connection was closed before a byte of the reply came."""


def _parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"server address {text!r} is not host:port (e.g. 127.0.0.1:15428)")
    return host.strip("[]"), int(port)
