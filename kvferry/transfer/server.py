"""The target side of the tcp transport: a listener serving READ/WRITE on granted regions.

One thread per connection (the payload copies happen in the kernel with the GIL released).
Every frame is validated before a byte of memory is touched: magic, version, op, frame size, and
the range against the regions this engine granted. A malformed frame gets an ERR reply and the
connection is closed; the failure is counted and logged once per connection; everyone else keeps
being served. The handshake must come first and must carry the shared token when one is set.

Replies to pipelined requests are gathered and flushed with one ``sendmsg`` when the next request
is not already waiting, and the connection busy-polls for ``grace_period_ns`` before it blocks:
on small VMs a blocking wake-up costs more than a whole small transfer.

No peer can hold the listener: a handshake has a total deadline (``listen.handshake_timeout``),
and connections still in their handshake are bounded the way every kvferry listener bounds them
(:class:`~kvferry.admission.PendingConnections`): past ``listen.max_pending`` (per source
address ``listen.max_pending_per_host``) the one that has waited longest, once it has waited a
second, is closed for the newcomer, so a client that completes its handshake promptly gets in
while others trickle bytes, and a burst of honest connects is left alone. Each costs a thread
here, so at four times ``max_pending`` the oldest goes whatever its age. Only authenticated
connections count against ``listen.max_connections``. After the handshake the kernel times out
blocking reads and writes (SO_RCVTIMEO/SO_SNDTIMEO, no cost on the data path): a frame that makes
no progress for ``listen.stall_timeout`` closes its connection, and so does an idle wait between
frames past ``listen.idle_timeout``. A large CALL payload is received into lazily committed
memory, so a header that announces 64 MiB and stalls costs what it sent, not 64 MiB.

The module is one class, :class:`TargetServer`, kept whole past 500 lines on purpose: the accept
loop, the handshake, the data loop and the READV/WRITEV/CALL paths share one connection's
limits, counters and refusal path, and the data loop is one function so the per-frame hot path
runs on locals. What its threads do to a socket (bounded receives, gathered sends, ERR replies)
is in :mod:`kvferry.transfer.server_io`.
"""

from __future__ import annotations

import functools
import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from kvferry.admission import PendingConnections
from kvferry.config.models import ListenConfig, TransferConfig
from kvferry.errors import AuthError, KvferryError, PeerClosed, ProtocolError
from kvferry.observe.counters import TransportCounters
from kvferry.observe.logs import RateLimitedLog
from kvferry.transfer import wire
from kvferry.transfer.memory import DeviceRegion, MemoryRegion
from kvferry.transfer.server_io import (
    CallArena,
    Limits,
    Refused,
    ServeTimeout,
    fill,
    linger,
    merge_adjacent,
    peer_text,
    recv_by,
    refusal,
    send_error,
    sendmsg_all,
    take,
    timeval,
    try_fill,
)

__all__ = ["CallHandler", "CallReply", "TargetServer"]

CallHandler = Callable[[int, memoryview], "CallReply"]
"""(method, payload) -> reply; mounted by a service (the store server) on the listener. The
payload view is valid during the call only (the connection reuses its memory): a handler copies
what it keeps, and its reply's parts must not be views of it."""


class CallReply:
    """What a call handler answers: buffers to send (views are sent without a copy) and an
    optional ``after`` run once they are on the wire (to unpin what the views show)."""

    __slots__ = ("after", "parts")

    def __init__(
        self, parts: list[bytes | memoryview], after: Callable[[], None] | None = None
    ) -> None:
        self.parts = parts
        self.after = after


log = logging.getLogger("kvferry.transfer.server")
# A peer can provoke these at will: at most a few lines a kind per 10 s (the counters have all).
_peer_log = RateLimitedLog(log)

_FLUSH_BYTES = 4 << 20
_PENDING_CAP_FACTOR = 4
_RBUF_BYTES = 16 << 10


class TargetServer:
    """Accepts initiator connections and serves the engine's regions.

    Args:
        regions: the engine's live region table (id -> region); read on every request, so a
            region registered later is served and an unregistered one is refused.
        describe: returns the handshake document (regions, identity) for a new connection.
        listen: bind address, port, token, connection limit.
        transfer: frame size limit, grace period, handshake timeout.
        counters: where served bytes and refused frames are counted.
        call: handler of CALL frames (a mounted service); None refuses them.
    """

    def __init__(
        self,
        regions: dict[int, MemoryRegion | DeviceRegion],
        describe: Callable[[], dict[str, Any]],
        listen: ListenConfig,
        transfer: TransferConfig,
        counters: TransportCounters,
        call: CallHandler | None = None,
    ) -> None:
        self._regions = regions
        self._call = call
        self._describe = describe
        self._listen = listen
        token = listen.auth_token
        self._token = token.get_secret_value().encode() if token is not None else None
        self._max_frame = transfer.max_frame_size
        self._grace = transfer.grace_period_ns / 1e9
        self._handshake_timeout = listen.handshake_timeout
        self._stall = listen.stall_timeout
        self._idle = listen.idle_timeout
        # The kernel's blocking-read timeout: the shorter of the two, so both are seen.
        self._tick = min(self._stall, self._idle) if self._idle > 0 else self._stall
        self._limits = Limits(self._tick, self._stall, self._idle)
        self.counters = counters
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        # Connections in their handshake (each has a thread): slowloris bookkeeping.
        self._pending = PendingConnections(
            listen.handshake_timeout, listen.max_pending, listen.max_pending_per_host
        )
        self._pending_cap = _PENDING_CAP_FACTOR * listen.max_pending
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.address: tuple[str, int] = ("", 0)

    def start(self) -> tuple[str, int]:
        """Bind and start accepting; returns the (host, port) actually bound.

        Raises:
            PeerClosed: the address cannot be bound (in use, not local).
        """
        family = socket.AF_INET6 if ":" in self._listen.bind_address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._listen.bind_address, self._listen.port))
        except OSError as e:
            sock.close()
            raise PeerClosed(
                f"cannot listen on {self._listen.bind_address}:{self._listen.port}: {e} "
                "(pick another listen.port, or 0 for a free one)"
            ) from e
        # The accept queue is not where connections are limited (that is done after accept,
        # where the oldest pending handshake can make room): keep it deep enough for bursts.
        sock.listen(min(4096, max(128, self._listen.max_connections + self._listen.max_pending)))
        self._sock = sock
        self.address = sock.getsockname()[:2]
        thread = threading.Thread(target=self._accept_loop, name="kvferry-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self.address

    def close(self) -> None:
        """Stop accepting, close every connection and wait for the handlers; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=2)

    # -- accept ---------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                if len(self._pending) >= self._pending_cap:
                    self._pending.evict_oldest()  # a flood of young connections: bound threads
                self._pending.waiting(conn, str(peer[0]), functools.partial(self._evict, conn))
                self._threads = [t for t in self._threads if t.is_alive()]
                thread = threading.Thread(
                    target=self._serve, args=(conn, peer), name="kvferry-conn", daemon=True
                )
                self._threads.append(thread)
            thread.start()

    def _evict(self, sock: socket.socket) -> None:
        """Close a connection still in its handshake to make room; its thread sees the socket
        shut down and ends."""
        self.counters.add(evicted=1)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- one connection -------------------------------------------------------------------
    def _serve(self, sock: socket.socket, peer: tuple[Any, ...]) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._handshake(sock, time.monotonic() + self._handshake_timeout)
            self._pending.arrived(sock)
            with self._lock:
                if len(self._conns) >= self._listen.max_connections:
                    self.counters.add(protocol_errors=1)
                    send_error(sock, "too many connections")
                    return
                self._conns.add(sock)
            self._set_timeouts(sock)
            self._data_loop(sock)
        except ServeTimeout as e:
            self.counters.add(timeouts=1)
            log.debug("closing connection from %s: %s", peer_text(peer), e)
        except Refused as e:
            # already counted, before the ERR reply went out (a peer may read the counters as
            # soon as it has the reply)
            _peer_log.warning("refused", "refused a request from %s: %s", peer_text(peer), e)
            linger(sock)
        except (ProtocolError, ValueError) as e:
            # An isolation boundary: a bad peer gets a reason and loses only its own connection.
            self.counters.add(protocol_errors=1)
            _peer_log.warning("closed", "closing connection from %s: %s", peer_text(peer), e)
            send_error(sock, str(e))
            linger(sock)
        except (PeerClosed, OSError, TimeoutError):
            pass  # the peer went away; nothing to answer
        except Exception:  # pragma: no cover - a bug must not take the listener down
            self.counters.add(errors=1)
            log.exception("unexpected error serving %s", peer_text(peer))
        finally:
            self._pending.closed(sock)
            with self._lock:
                self._conns.discard(sock)
            sock.close()

    def _handshake(self, sock: socket.socket, deadline: float) -> None:
        header = wire.decode(
            recv_by(sock, wire.HEADER_SIZE, deadline), reply=False, max_length=wire.MAX_HELLO_BYTES
        )
        if header.op is not wire.Op.HELLO:
            raise ProtocolError("the first frame must be HELLO")
        doc = wire.decode_json(recv_by(sock, header.length, deadline))
        if doc.get("version") != wire.WIRE_VERSION:
            raise ProtocolError(f"wire version {doc.get('version')!r} is not {wire.WIRE_VERSION}")
        if self._token is not None:
            presented = doc.get("token")
            if not isinstance(presented, str) or not hmac.compare_digest(
                presented.encode(), self._token
            ):
                raise AuthError("bad or missing auth token")
        body = wire.encode_json(self._describe())
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(wire.encode(wire.Op.OK, length=len(body)) + body)
        sock.settimeout(None)

    def _set_timeouts(self, sock: socket.socket) -> None:
        """Kernel timeouts on blocking reads and writes (the socket is in blocking mode, so
        Python adds no poll of its own): they surface as BlockingIOError in ``fill`` and
        ``sendmsg_all``, which tell a stall from an idle wait."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(self._tick))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(self._stall))

    def _data_loop(self, sock: socket.socket) -> None:
        regions = self._regions
        max_frame = self._max_frame
        grace = self._grace
        # Requests are read in bulk into a small buffer and parsed from there: a pipelined burst
        # of READ headers costs one syscall, not one per frame. WRITE payload bytes that arrive
        # in the buffer are copied out (at most _RBUF_BYTES); the rest is received in place.
        rbuf = bytearray(_RBUF_BYTES)
        rview = memoryview(rbuf)
        rpos = rend = 0
        hdr_size = wire.HEADER_SIZE
        out: list[bytes | memoryview] = []
        out_bytes = 0
        counters = self.counters
        served_read = served_write = frames = 0
        unpack_from = wire.HEADER.unpack_from
        pack = wire.HEADER.pack
        data_ops = (wire.Op.READ, wire.Op.WRITE)
        read_op, ok_op, call_op = wire.Op.READ, wire.Op.OK, wire.Op.CALL
        vector_ops, writev_op = (wire.Op.READV, wire.Op.WRITEV), wire.Op.WRITEV
        call = self._call
        arena = CallArena()
        limits = self._limits
        try:
            while True:
                if rend - rpos < hdr_size:
                    # Next header: take it at once if it is already here; otherwise flush the
                    # gathered replies, busy-poll for the grace period, then block. A lone
                    # reply (one small request served, the buffer drained) goes out before the
                    # look: it is a round trip's latency, and nothing would join it.
                    if rpos == rend and 0 < len(out) <= 2:
                        rpos = rend = 0
                    else:
                        if rpos:
                            left = rend - rpos
                            rbuf[:left] = rview[rpos:rend]
                            rpos, rend = 0, left
                        rend = try_fill(sock, rview, rend)
                    if rend < hdr_size:
                        if served_read or served_write:
                            # Publish before going idle (a long-lived connection must not keep
                            # its bytes out of metrics() until it closes), and before the last
                            # replies go out: a peer that has them sees them counted.
                            with counters.lock:
                                counters.bytes_read += served_read
                                counters.bytes_written += served_write
                                counters.frames += frames
                            served_read = served_write = frames = 0
                        if out:
                            sendmsg_all(sock, out)
                            out.clear()
                            out_bytes = 0
                        rend = fill(sock, rview, rend, hdr_size, grace, limits, rend == 0)
                # Hot path: unpack once and check inline (no per-frame objects beyond the views).
                magic, version, op, region_id, req_id, offset, length = unpack_from(rbuf, rpos)
                hdr = rview[rpos : rpos + hdr_size]
                rpos += hdr_size
                if magic != wire.MAGIC or version != wire.WIRE_VERSION or op not in data_ops:
                    if op in vector_ops and magic == wire.MAGIC and version == wire.WIRE_VERSION:
                        write = op == writev_op
                        rpos, rend, served = self._serve_vector(
                            sock, write, req_id, offset, length, rview, rpos, rend, out
                        )
                        frames += 1
                        if write:
                            served_write += served
                            continue
                        out_bytes += served
                        served_read += served
                        if out_bytes >= _FLUSH_BYTES or len(out) >= 512:
                            sendmsg_all(sock, out)
                            out_bytes = 0
                        continue
                    if op == call_op and call is not None and magic == wire.MAGIC:
                        rpos, rend = self._serve_call(
                            sock, call, arena, region_id, req_id, length, rview, rpos, rend, out
                        )
                        out_bytes = 0
                        continue
                    wire.decode(hdr, reply=False, max_length=max_frame)  # raises the precise error
                    raise ProtocolError(f"op {op:#x} is not allowed after the handshake")
                region = regions.get(region_id)
                if (
                    region is None
                    or length <= 0
                    or offset + length > region.size
                    or (op != read_op and not region.peer_writable)
                ):
                    # Answer this very request (the initiator fails it without retry), then
                    # close: a WRITE payload may follow and must not be read as a header.
                    reason = refusal(region_id, region, offset, length)
                    if length > max_frame:
                        reason = f"frame length {length} exceeds the limit of {max_frame} bytes"
                    if out:
                        sendmsg_all(sock, out)
                    counters.add(protocol_errors=1)
                    send_error(sock, reason, req_id)
                    raise Refused(reason)
                if length > max_frame:
                    if out:
                        sendmsg_all(sock, out)
                    reason = f"frame length {length} exceeds the limit of {max_frame} bytes"
                    counters.add(protocol_errors=1)
                    send_error(sock, reason, req_id)
                    raise Refused(reason)
                if isinstance(region, DeviceRegion):
                    device: DeviceRegion | None = region
                    staged = self._device_copy(
                        sock, region, op == read_op, offset, length, req_id, out
                    )
                    view = staged.view
                else:
                    device = None
                    view = region.view[offset : offset + length]
                if op == read_op:
                    out.append(
                        pack(wire.MAGIC, wire.WIRE_VERSION, ok_op, region_id, req_id, 0, length)
                    )
                    out.append(view)
                    out_bytes += length
                    served_read += length
                    frames += 1
                else:  # take, inline: the hot path of small WRITEs
                    have = min(length, rend - rpos)
                    if have:
                        view[:have] = rview[rpos : rpos + have]
                        rpos += have
                    if have < length:
                        fill(sock, view, have, length, grace, limits)
                    if device is not None:
                        self._device_copy(sock, device, False, offset, length, req_id, out, staged)
                    out.append(pack(wire.MAGIC, wire.WIRE_VERSION, ok_op, region_id, req_id, 0, 0))
                    served_write += length
                    frames += 1
                if out_bytes >= _FLUSH_BYTES or len(out) >= 512:
                    sendmsg_all(sock, out)
                    out.clear()
                    out_bytes = 0
        except (ProtocolError, PeerClosed):
            # Requests already served are answered before the ERR reply or the close: replies
            # come in request order, and a peer that half-closed still reads them.
            if out:
                try:
                    sendmsg_all(sock, out)
                except OSError:
                    pass
            raise
        finally:
            if served_read or served_write:
                with counters.lock:
                    counters.bytes_read += served_read
                    counters.bytes_written += served_write
                    counters.frames += frames

    def _device_copy(
        self,
        sock: socket.socket,
        region: DeviceRegion,
        read: bool,
        offset: int,
        length: int,
        req_id: int,
        out: list[bytes | memoryview],
        staged: MemoryRegion | None = None,
    ) -> MemoryRegion:
        """Stage one request on a device region: for a READ, a host buffer holding its bytes; for a
        WRITE, first (``staged`` None) the host buffer to receive the payload into, then (given
        ``staged``) the copy of that payload to the device.

        A failed device copy is answered with an ERR reply for this request and the connection is
        closed, like a refused range (the peer's request fails without a retry).
        """
        try:
            if staged is None:
                staged = region.stage(length)
                if read:
                    region.to_host(offset, staged.array)
            else:
                region.from_host(offset, staged.array)
        except Exception as e:  # CUDA errors come as RuntimeError (or torch's own)
            reason = f"device copy of [{offset}, {offset + length}) of {region!r} failed: {e}"
            if out:
                sendmsg_all(sock, out)  # consumes the list
            self.counters.add(errors=1)
            send_error(sock, reason, req_id)
            raise Refused(reason) from e
        return staged

    def _vector_ranges(
        self,
        sock: socket.socket,
        write: bool,
        req_id: int,
        count: int,
        rview: memoryview,
        rpos: int,
        rend: int,
        out: list[bytes | memoryview],
    ) -> tuple[int, int, list[tuple[MemoryRegion | DeviceRegion, int, int]], int]:
        """Read and check the ``count`` range descriptors of a READV/WRITEV, every one before a
        byte is touched. Returns (rpos, rend, [(region, offset, length)], total bytes).

        A bad one refuses the frame (ERR echoing ``req_id``; the connection closes)."""
        entry = wire.VECTOR_ENTRY.size
        if not 1 <= count <= wire.MAX_VECTOR:
            reason = f"a vector of {count} ranges: want 1..{wire.MAX_VECTOR}"
            self._refuse(sock, out, reason, req_id)
        desc = bytearray(count * entry)
        rpos = take(sock, memoryview(desc), rview, rpos, rend, self._grace, self._limits)
        regions = self._regions
        ranges: list[tuple[MemoryRegion | DeviceRegion, int, int]] = []
        total = 0
        for region_id, offset, n in wire.VECTOR_ENTRY.iter_unpack(desc):
            region = regions.get(region_id)
            if region is None or n <= 0 or offset + n > region.size:
                self._refuse(sock, out, refusal(region_id, region, offset, n), req_id)
            if write and not region.peer_writable:
                self._refuse(sock, out, refusal(region_id, region, offset, n), req_id)
            total += n
            if total > self._max_frame:
                reason = f"a vector of more than {self._max_frame} bytes (the frame limit)"
                self._refuse(sock, out, reason, req_id)
            ranges.append((region, offset, n))
        return rpos, rend, ranges, total

    def _serve_vector(
        self,
        sock: socket.socket,
        write: bool,
        req_id: int,
        count: int,
        length: int,
        rview: memoryview,
        rpos: int,
        rend: int,
        out: list[bytes | memoryview],
    ) -> tuple[int, int, int]:
        """Serve one READV (queue one OK and the ranges' bytes) or WRITEV (take its bytes
        straight into the regions, then queue one OK); every range is checked before a byte is
        touched. Adjacent ranges of one region are served as one (a batch of consecutive KV
        blocks is one range here), so a device region costs one staging copy per such stretch,
        not per range. Returns (rpos, rend, bytes)."""
        descriptors = count * wire.VECTOR_ENTRY.size
        if not write and length != descriptors:
            reason = f"READV of {count} ranges in {length} descriptor bytes"
            self._refuse(sock, out, reason, req_id)
        rpos, rend, ranges, total = self._vector_ranges(
            sock, write, req_id, count, rview, rpos, rend, out
        )
        if write and length != descriptors + total:
            reason = f"WRITEV frame of {length} bytes carries {count} ranges of {total} bytes"
            self._refuse(sock, out, reason, req_id)
        ok = wire.HEADER.pack(
            wire.MAGIC, wire.WIRE_VERSION, wire.Op.OK, 0, req_id, 0, 0 if write else total
        )
        ranges = merge_adjacent(ranges)
        if not write:
            out.append(ok)
            for region, offset, n in ranges:
                if isinstance(region, DeviceRegion):
                    out.append(self._device_copy(sock, region, True, offset, n, req_id, out).view)
                else:
                    out.append(region.view[offset : offset + n])
            return rpos, rend, total
        for region, offset, n in ranges:
            device: DeviceRegion | None = None
            if isinstance(region, DeviceRegion):
                device = region
                staged = self._device_copy(sock, device, False, offset, n, req_id, out)
                view = staged.view
            else:
                view = region.view[offset : offset + n]
            rpos = take(sock, view, rview, rpos, rend, self._grace, self._limits)
            if device is not None:
                self._device_copy(sock, device, False, offset, n, req_id, out, staged)
        out.append(ok)
        return rpos, rend, total

    def _refuse(
        self, sock: socket.socket, out: list[bytes | memoryview], reason: str, req_id: int
    ) -> NoReturn:
        """Answer what is gathered, then ERR for ``req_id``; the connection closes."""
        if out:
            sendmsg_all(sock, out)  # consumes the list
        self.counters.add(protocol_errors=1)
        send_error(sock, reason, req_id)
        raise Refused(reason)

    def _serve_call(
        self,
        sock: socket.socket,
        call: CallHandler,
        arena: CallArena,
        method: int,
        req_id: int,
        length: int,
        rview: memoryview,
        rpos: int,
        rend: int,
        out: list[bytes | memoryview],
    ) -> tuple[int, int]:
        """Read a CALL payload, run the handler, send its reply (flushing what is gathered).

        A failing call gets an ERR reply for its own request and the connection goes on; an
        oversize payload is a protocol error (the frame cannot be skipped safely).
        """
        if length > self._max_frame:
            if out:
                sendmsg_all(sock, out)
            reason = f"call payload {length} exceeds the limit of {self._max_frame} bytes"
            self.counters.add(protocol_errors=1)
            send_error(sock, reason, req_id)
            raise Refused(reason)
        pview = arena.take(length)
        rpos = take(sock, pview, rview, rpos, rend, self._grace, self._limits)
        try:
            reply = call(method, pview)
        except (KvferryError, ValueError) as e:
            reply = None
            message = str(e) or type(e).__name__
        except Exception as e:  # an isolation boundary: a bug in a call answers, never kills
            self.counters.add(errors=1)
            log.exception("call %d failed", method)
            reply = None
            message = f"internal error in call {method}: {type(e).__name__}"
        if reply is None:
            body = message.encode()[: wire.MAX_ERROR_BYTES]
            out.append(wire.encode(wire.Op.ERR, req_id=req_id, length=len(body)))
            out.append(body)
            sendmsg_all(sock, out)
            out.clear()
            return rpos, rend
        size = sum(len(p) for p in reply.parts)
        out.append(wire.encode(wire.Op.OK, region=method, req_id=req_id, length=size))
        out.extend(reply.parts)
        try:
            sendmsg_all(sock, out)
        finally:
            out.clear()
            if reply.after is not None:
                reply.after()
        return rpos, rend
