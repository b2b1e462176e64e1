"""The server tier's wire: one connection per (thread, store server), framed calls on it.

A :class:`Connections` keeps, for each thread, one handshaken connection per server (a call is
one request/reply on it, so threads never share a socket and need no lock for it), and maps a
same-host server's pool once per (server, pid) for every thread. A call that fails on the wire
raises :class:`Unreachable`, which the tier takes as "that server is down"; an ERR reply raises
:class:`StorageError` and leaves the connection good. Any socket failure closes that connection
(a half-read reply must never be parsed as the next one); the next call reconnects.

Must not: decide which server a block goes to, or mark servers down (the tier does, in
``client``).
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading

from kvferry.backends.base import Buffer
from kvferry.backends.server import protocol as p
from kvferry.errors import ConfigError, KvferryError, PeerClosed, StorageError
from kvferry.transfer import handshake, wire
from kvferry.transfer.host import boot_id as _boot_id
from kvferry.transfer.memory import PeerMapping
from kvferry.transfer.segment import PeerInfo

log = logging.getLogger("kvferry.backends.server")


class Unreachable(StorageError):
    """A call to a server failed on the wire (connect, handshake, send, receive, timeout): the
    server is marked down."""


class ServerRefused(KvferryError):
    """The server answered ERR: the reply was read whole, the connection is still good."""


class Stale(PeerClosed):
    """The connection was closed before a byte of the reply came."""


class Conn:
    __slots__ = ("peer", "sock", "used")

    def __init__(self, sock: socket.socket, peer: PeerInfo) -> None:
        self.sock = sock
        self.peer = peer
        self.used = False
        """A call has completed on it: it may since have been closed by the server's idle
        timeout, and a call that finds it so is retried once on a fresh connection."""


class Connections:
    """Per-thread connections to store servers, and same-host pool mappings.

    Args:
        token: the servers' shared auth token, or None.
        timeout: seconds to connect, and to wait for any reply.
        shm: map a same-host server's pool (``server.transport: auto``).
    """

    def __init__(self, token: str | None, timeout: float, shm: bool) -> None:
        self._token = token
        self._timeout = timeout
        self._shm = shm
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: set[Conn] = set()
        self._maps: dict[tuple[str, int], PeerMapping] = {}
        self._boot = _boot_id()
        self._req_ids = itertools.count(1)
        self._closed = False

    def conn(self, member: str) -> Conn:
        """This thread's connection to ``member``, opened on first use.

        Raises:
            StorageError: closed.
            Unreachable: see :meth:`open`.
        """
        conns: dict[str, Conn] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(member)
        if conn is None:
            if self._closed:
                raise StorageError("server tier is closed")
            sock, peer = self.open(member)
            conn = conns[member] = Conn(sock, peer)
            with self._lock:
                self._conns.add(conn)
        return conn

    def open(self, member: str) -> tuple[socket.socket, PeerInfo]:
        """A fresh, handshaken connection to ``member``.

        Raises:
            Unreachable: connect or handshake failed (refused, timed out, token refused), or
                the server speaks another store protocol; names the server.
        """
        try:
            sock, peer = handshake.connect(
                parse_address(member), token=self._token, timeout=self._timeout
            )
        except (OSError, KvferryError) as e:
            raise Unreachable(f"server tier: store server {member}: {e}") from e
        version = peer.service.get("store_protocol")
        if version != p.PROTOCOL_VERSION:
            sock.close()
            raise Unreachable(
                f"server tier: {member} speaks store protocol {version!r}, this client "
                f"{p.PROTOCOL_VERSION}: run the same kvferry version on both sides"
            )
        try:
            sock.settimeout(self._timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        except OSError as e:
            sock.close()
            raise Unreachable(f"server tier: store server {member}: {e}") from e
        return sock, peer

    def drop(self, member: str) -> None:
        """Close this thread's connection to ``member`` (the next call reconnects)."""
        conns: dict[str, Conn] = getattr(self._local, "conns", {})
        conn = conns.pop(member, None)
        if conn is not None:
            with self._lock:
                self._conns.discard(conn)
            conn.sock.close()

    def _send(self, conn: Conn, method: p.Method, parts: list[Buffer]) -> None:
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

    def _reply_header(self, conn: Conn, member: str) -> int:
        """Read a reply header; the payload length for OK, StorageError (after reading the
        message) for ERR.

        Raises:
            Stale: the connection was closed before a byte of the reply came.
        """
        buf = bytearray(wire.HEADER_SIZE)
        first = conn.sock.recv_into(buf)
        if first == 0:
            raise Stale("the server closed the connection")
        if first < wire.HEADER_SIZE:
            buf[first:] = handshake.recv_exact(conn.sock, wire.HEADER_SIZE - first)
        header = wire.decode(buf, reply=True, max_length=1 << 40)
        if header.op is wire.Op.ERR:
            message = bytes(handshake.recv_exact(conn.sock, header.length)).decode(errors="replace")
            raise ServerRefused(f"server tier: store server {member} answered: {message}")
        return header.length

    def request(self, member: str, method: p.Method, parts: list[Buffer]) -> tuple[Conn, int]:
        """Send a call and read its reply header: (connection, reply payload length).

        A pooled connection the server closed meanwhile (its idle timeout, a restart) fails
        before any reply byte; the call is then made once more on a fresh connection.

        Raises:
            ServerRefused: the server answered ERR (the connection stays good).
            OSError, KvferryError: the connection failed (the caller drops it).
        """
        conn = self.conn(member)
        try:
            self._send(conn, method, parts)
            return conn, self._reply_header(conn, member)
        except (Stale, BrokenPipeError, ConnectionResetError):
            if not conn.used:
                raise
        self.drop(member)
        conn = self.conn(member)
        self._send(conn, method, parts)
        return conn, self._reply_header(conn, member)

    def call(self, member: str, method: p.Method, parts: list[Buffer]) -> bytearray:
        """One call, its whole reply payload.

        Raises:
            StorageError: an ERR reply, or a malformed reply.
            Unreachable: the call failed on the wire.
        """
        try:
            conn, n = self.request(member, method, parts)
            reply = handshake.recv_exact(conn.sock, n)
            conn.used = True
            return reply
        except ServerRefused as e:
            raise StorageError(str(e)) from None
        except StorageError:  # from conn (which names the server), or a malformed reply
            self.drop(member)
            raise
        except (OSError, KvferryError) as e:
            self.drop(member)
            raise Unreachable(f"server tier: store server {member}: {e}") from e

    def mapping(self, member: str) -> PeerMapping | None:
        """The server's pool mapped here when it runs on this host (and shm is allowed)."""
        if not self._shm:
            return None
        peer = self.conn(member).peer
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

    def close(self) -> None:
        """Close every thread's connections and unmap the pools; calls after it fail."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, set()
            maps, self._maps = self._maps, {}
        for conn in conns:
            conn.sock.close()
        for mapping in maps.values():
            mapping.close()


def parse_address(text: str) -> tuple[str, int]:
    """(host, port) of "host:port" ("[::1]:port" too).

    Raises:
        ConfigError: not host:port with a port in 1..65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"server address {text!r} is not host:port (e.g. 127.0.0.1:15428)")
    return host.strip("[]"), int(port)
