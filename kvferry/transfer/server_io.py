"""The blocking-socket primitives of the target server's connection threads (no state here).

``kvferry.transfer.server.TargetServer`` serves each connection from its own thread with a
blocking socket; this module holds what those threads do to the socket: receive a handshake by a
total deadline (``recv_by``), fill a buffer with a spin-then-block wait that tells a stalled
frame from an idle connection (``fill``, ``take``), send gathered replies (``sendmsg_all``), send
an ERR reply and drain what the peer still sends (``send_error``, ``linger``), the CALL payload
arena, and the reasons a range is refused. Every wait is bounded: a function that would wait
past the connection's limits raises :class:`ServeTimeout`.

It must not keep per-connection state beyond what a caller hands it (``Limits``, ``CallArena``),
and the hot-path helpers (``fill``, ``try_fill``, ``sendmsg_all``) must stay free of per-call
allocations: the server's data loop calls them once per burst.
"""

from __future__ import annotations

import mmap
import socket
import struct
import time
from typing import Any

from kvferry.errors import PeerClosed, ProtocolError
from kvferry.transfer import wire
from kvferry.transfer.memory import DeviceRegion, MemoryRegion

__all__ = [
    "CallArena",
    "Limits",
    "Refused",
    "ServeTimeout",
    "fill",
    "linger",
    "merge_adjacent",
    "peer_text",
    "recv_by",
    "refusal",
    "send_error",
    "sendmsg_all",
    "take",
    "timeval",
    "try_fill",
]

_DONTWAIT = socket.MSG_DONTWAIT


class Refused(ProtocolError):
    """A request was refused and already answered with an ERR reply."""


class ServeTimeout(TimeoutError):
    """A connection ran out of time: handshake deadline, idle or stall timeout."""


def peer_text(peer: tuple[Any, ...]) -> str:
    return f"{peer[0]}:{peer[1]}" if len(peer) >= 2 else str(peer)


def recv_by(sock: socket.socket, n: int, deadline: float) -> bytearray:
    """Exactly ``n`` bytes, all of them before ``deadline`` (monotonic seconds), however the
    peer paces them.

    Raises:
        ServeTimeout: the deadline passed first.
        PeerClosed: the peer closed first.
    """
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServeTimeout("handshake not completed within listen.handshake_timeout")
        sock.settimeout(left)
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError:
            raise ServeTimeout("handshake not completed within listen.handshake_timeout") from None
        if k == 0:
            raise PeerClosed("peer closed the connection")
        got += k
    return buf


class Limits:
    """A connection's timeouts after the handshake: the kernel's read timeout (``tick``) and
    the two waits it measures, a stall mid-frame and an idle wait between frames (0: none)."""

    __slots__ = ("idle", "stall", "tick")

    def __init__(self, tick: float, stall: float, idle: float) -> None:
        self.tick = tick
        self.stall = stall
        self.idle = idle


def timeval(seconds: float) -> bytes:
    whole = int(seconds)
    micros = max(round((seconds - whole) * 1e6), 0 if whole else 1)
    return struct.pack("ll", whole, micros)


_SMALL_PAYLOAD = 64 << 10
_ARENA_BYTES = 4 << 20


class CallArena:
    """Where one connection receives its CALL payloads (a handler may keep no view of its
    payload past the call: the next one reuses the memory).

    Beyond 64 KiB a payload goes into an anonymous mapping, whose pages are committed as bytes
    arrive: a peer that announces a large payload and stalls holds what it sent, not what it
    announced (a bytearray zeroes, and so commits, all of it up front). Up to 4 MiB the mapping
    is kept and reused by the connection's next calls, so a steady stream of batch PUTs pays
    its page faults once, not per call (a fresh 2 MiB mapping per PUT halved their rate);
    larger payloads get a mapping of their own, freed with the call.
    """

    __slots__ = ("_map",)

    def __init__(self) -> None:
        self._map: mmap.mmap | None = None

    def take(self, length: int) -> memoryview:
        if length <= _SMALL_PAYLOAD:
            return memoryview(bytearray(length))
        if length > _ARENA_BYTES:
            return memoryview(_anonymous(length))
        if self._map is None or len(self._map) < length:
            grown = max(length, 2 * len(self._map)) if self._map is not None else length
            # The old mapping goes with its last view (a handler that broke the rule).
            self._map = _anonymous(min(_ARENA_BYTES, -(-grown // mmap.PAGESIZE) * mmap.PAGESIZE))
        return memoryview(self._map)[:length]


def _anonymous(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def merge_adjacent(
    ranges: list[tuple[MemoryRegion | DeviceRegion, int, int]],
) -> list[tuple[MemoryRegion | DeviceRegion, int, int]]:
    """``ranges`` with each run of adjacent ranges of one region (in order) made one range: the
    bytes and their order on the wire are the same."""
    merged = [ranges[0]]
    for region, offset, n in ranges[1:]:
        last, start, length = merged[-1]
        if region is last and start + length == offset:
            merged[-1] = (last, start, length + n)
        else:
            merged.append((region, offset, n))
    return merged


def refusal(
    region_id: int, region: MemoryRegion | DeviceRegion | None, offset: int, length: int
) -> str:
    """Why a range is refused: its region is not granted, the range lies outside it, or (a
    range inside it) the region is read-only to peers and the request writes."""
    if region is None:
        return f"region {region_id} is not granted to this peer"
    if length > 0 and offset + length <= region.size:
        return f"region {region_id} is read-only to peers; writing into it is refused"
    return (
        f"range [{offset}, {offset + length}) is outside region {region_id} of {region.size} bytes"
    )


def take(
    sock: socket.socket,
    view: memoryview,
    rview: memoryview,
    rpos: int,
    rend: int,
    grace: float,
    limits: Limits | None = None,
) -> int:
    """Fill ``view`` with the next bytes of the stream: what the receive buffer already holds
    (``rview[rpos:rend]``), then the socket. Returns the new ``rpos``."""
    n = len(view)
    have = min(n, rend - rpos)
    if have:
        view[:have] = rview[rpos : rpos + have]
        rpos += have
    if have < n:
        fill(sock, view, have, n, grace, limits)
    return rpos


def try_fill(sock: socket.socket, view: memoryview, end: int) -> int:
    """One non-blocking read of whatever is there into ``view[end:]``; the new fill level."""
    try:
        k = sock.recv_into(view[end:], len(view) - end, _DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return end
    if k == 0:
        raise PeerClosed("peer closed the connection")
    return end + k


def fill(
    sock: socket.socket,
    view: memoryview,
    end: int,
    need: int,
    grace: float,
    limits: Limits | None = None,
    idle: bool = False,
) -> int:
    """Read into ``view[end:]`` until at least ``need`` bytes are there: spin, then block.

    ``limits``: the connection's timeouts (its blocking reads time out every ``limits.tick``
    seconds); ``idle``: this is the wait for the next frame, which may last ``limits.idle``
    until its first byte, where a wait inside a frame may last ``limits.stall``.

    Raises:
        ServeTimeout: the wait ran past its limit.
        PeerClosed: the peer closed the connection.
    """
    if grace > 0:
        spin_until = time.monotonic() + grace
        while end < need:
            before = end
            end = try_fill(sock, view, end)
            if end == before and time.monotonic() >= spin_until:
                break
    waiting_since: float | None = None
    start = end
    while end < need:
        try:
            k = sock.recv_into(view[end:], len(view) - end)
        except BlockingIOError:  # SO_RCVTIMEO: no byte for limits.tick seconds
            if limits is None:
                raise ServeTimeout("no progress within the socket's timeout") from None
            now = time.monotonic()
            if waiting_since is None:
                waiting_since = now - limits.tick
            if idle and end == start:
                if limits.idle and now - waiting_since >= limits.idle - 1e-3:
                    raise ServeTimeout("idle past listen.idle_timeout") from None
            elif now - waiting_since >= limits.stall - 1e-3:
                raise ServeTimeout("a frame made no progress for listen.stall_timeout") from None
            continue
        if k == 0:
            raise PeerClosed("peer closed the connection")
        end += k
        waiting_since = None
    return end


_IOV_MAX = 512  # Linux refuses more than 1024 buffers per sendmsg; stay well under


def sendmsg_all(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """Send every part (consumes the list). A peer that reads nothing for the socket's send
    timeout (``listen.stall_timeout``, SO_SNDTIMEO) gets the connection closed."""
    while parts:
        try:
            n = sock.sendmsg(parts[:_IOV_MAX] if len(parts) > _IOV_MAX else parts)
        except BlockingIOError:
            raise ServeTimeout("the peer read no reply bytes for listen.stall_timeout") from None
        i = 0
        while i < len(parts) and n >= len(parts[i]):
            n -= len(parts[i])
            i += 1
        del parts[:i]
        if n:
            parts[0] = memoryview(parts[0])[n:]


_LINGER_S = 1.0
_LINGER_BYTES = 64 << 20


def linger(sock: socket.socket) -> None:
    """After an ERR reply: half-close, then discard what the peer still sends (bounded).

    Closing a socket with unread bytes resets the connection, and a peer still sending pipelined
    WRITE payloads would then see ECONNRESET (and retry) instead of the ERR reply that says why.
    """
    buf = bytearray(1 << 16)
    left = _LINGER_BYTES
    deadline = time.monotonic() + _LINGER_S
    try:
        sock.shutdown(socket.SHUT_WR)
        while left > 0:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return
            sock.settimeout(timeout)
            k = sock.recv_into(buf)
            if k == 0:
                return
            left -= k
    except OSError:
        pass


def send_error(sock: socket.socket, message: str, req_id: int = 0) -> None:
    body = message.encode()[: wire.MAX_ERROR_BYTES]
    try:
        sock.settimeout(1.0)
        sock.sendall(wire.encode(wire.Op.ERR, req_id=req_id, length=len(body)) + body)
    except OSError:
        pass
