"""One tcp connection of the tcp transport: its slices and its send and receive state machines.

A :class:`Conn` owns one non-blocking socket to a peer and moves the slices the channel
(``kvferry.transfer.transports.tcp``) dealt it. Request headers (and WRITE payloads) go out in one
``sendmsg`` per burst, gathered straight from the registered local buffer; READ payloads are
received with ``recv_into`` straight into it. No payload byte is copied in user space and no
buffer is allocated per slice. On the wire, slices are coalesced where that saves per-frame work:
a run of small ones goes as one READV/WRITEV frame, and adjacent slices of one request queued
together on one connection go as one READ/WRITE frame of up to 1 MiB (within the frame limit both
sides announced; with one connection a 1 MiB request is one frame instead of 16 of 64 KiB, 1.5x
the bandwidth here).

This module owns the bytes of one socket only: who drives it, when it is made, retried or torn
down is the channel's business. Only the channel's leader thread calls into a connection.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable

from kvferry.errors import KvferryError, PeerClosed, ProtocolError, RemoteError
from kvferry.transfer import wire
from kvferry.transfer.batch import OpCode, TransferState
from kvferry.transfer.transports.base import WorkItem

__all__ = ["Conn", "Slice"]

_READ = OpCode.READ
_PENDING = TransferState.PENDING
_HDR = wire.HEADER_SIZE
_unpack_from = wire.HEADER.unpack_from
_MAGIC, _VERSION, _ERR, _OK = wire.MAGIC, wire.WIRE_VERSION, wire.Op.ERR, wire.Op.OK
_REPLY_OPS = (wire.Op.OK, wire.Op.ERR)
_MAX_IOV = 512  # well under IOV_MAX (1024): one header + one payload per slice
_BURST_BYTES = 4 << 20  # bytes gathered into one sendmsg burst
_RBUF_BYTES = 64 << 10  # receive buffer for reply headers and small READ payloads
_SMALL_READ = 16 << 10  # larger READ payloads bypass the buffer (received in place)
_MAX_VECTOR = 64  # small READs asked for in one READV frame
_VECTOR_ENTRY = wire.VECTOR_ENTRY


class Slice:
    __slots__ = (
        "attempts",
        "deadline",
        "group",
        "item",
        "length",
        "local_offset",
        "req_id",
        "run",
        "target_offset",
    )

    def __init__(self, item: WorkItem, offset: int, length: int, deadline: float) -> None:
        self.item = item
        self.local_offset = item.local_offset + offset
        self.target_offset = item.target_offset + offset
        self.length = length
        self.attempts = 0
        self.req_id = 0
        self.deadline = deadline
        self.group = 0  # on the first slice of a READV: how many slices it asked for
        self.run = 0  # on the first slice of a merged READ or WRITE: how many slices it covers


class Conn:
    """One socket to the peer with its send and receive state machines."""

    def __init__(
        self,
        sock: socket.socket,
        max_frame: int,
        *,
        vector: frozenset[OpCode] = frozenset(),
        merge_bytes: int = 0,
        device_regions: frozenset[int] = frozenset(),
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        # ops whose runs of small slices go in one frame (READV/WRITEV, where the target serves
        # them)
        self.vector = vector
        # adjacent slices of one request go as one READ or WRITE frame up to this many bytes (0:
        # never); not for a peer's GPU regions, whose slices are sized for its device copies
        self.merge_bytes = merge_bytes
        self.device_regions = device_regions
        self.vec_left = 0  # bytes of a READV reply still to hand out to its slices
        self.vec_got = 0  # bytes of the head slice already handed out
        self.fd = sock.fileno()
        self.max_frame = max_frame
        self.sendq: deque[Slice] = deque()
        self.inflight: deque[Slice] = deque()
        self.out: list[memoryview | bytes] = []  # the burst being sent
        self.rbuf = bytearray(_RBUF_BYTES)
        self.rview = memoryview(self.rbuf)
        self.rpos = 0
        self.rend = 0
        self.err_got = 0
        self.payload: memoryview | None = None  # READ reply payload being received
        self.payload_got = 0
        self.err: bytearray | None = None  # ERR reply message being received
        self.last_progress = time.monotonic()
        self.error: BaseException | None = None  # a receive failure after some completions

    @property
    def busy(self) -> bool:
        return bool(self.inflight or self.sendq or self.out)

    def pump_send(self, max_inflight: int, next_id: Callable[[], int]) -> bool:
        """Send as much as the socket takes without blocking; True if any byte went out."""
        sent_any = False
        while True:
            if not self.out:
                if not self.sendq or len(self.inflight) >= max_inflight:
                    return sent_any
                self._gather(max_inflight, next_id)
            try:
                n = self.sock.sendmsg(self.out)
            except (BlockingIOError, InterruptedError):
                return sent_any
            sent_any = True
            self.last_progress = time.monotonic()
            self._advance(n)
            if self.out:
                return sent_any  # socket buffer full

    def _gather(self, max_inflight: int, next_id: Callable[[], int]) -> None:
        out = self.out
        burst = 0
        sendq, inflight = self.sendq, self.inflight
        while sendq and len(inflight) < max_inflight and len(out) < _MAX_IOV:
            s = sendq.popleft()
            if s.item.request.state is not _PENDING:
                continue  # its request already failed; don't waste the wire
            s.req_id = next_id()
            s.group = s.run = 0
            item = s.item
            if item.op in self.vector and s.length <= _SMALL_READ and sendq and self._vectorable(s):
                burst += self._gather_vector(s, max_inflight)
                if burst >= _BURST_BYTES:
                    break
                continue
            length = s.length
            inflight.append(s)
            if sendq and sendq[0].item is item and self.merge_bytes:
                length = self._merge_run(s, max_inflight)
            if item.op is _READ:
                out.append(
                    wire.encode(wire.Op.READ, item.region_id, s.req_id, s.target_offset, length)
                )
            else:
                out.append(
                    wire.encode(wire.Op.WRITE, item.region_id, s.req_id, s.target_offset, length)
                )
                out.append(item.local.view[s.local_offset : s.local_offset + length])
                burst += length
            if burst >= _BURST_BYTES:
                break

    def _merge_run(self, first: Slice, max_inflight: int) -> int:
        """Move the slices of ``first``'s request that continue it, queued right behind it,
        into flight with it, as one frame of at most ``merge_bytes``: per-frame work (a header
        each way, a syscall each side, a completion) is what a large transfer pays per slice on
        one connection. Returns the frame's length; ``first.run`` is the slices it covers."""
        item = first.item
        if item.region_id in self.device_regions:
            return first.length
        sendq, inflight = self.sendq, self.inflight
        end = first.local_offset + first.length
        total = first.length
        run = 1
        while sendq and len(inflight) < max_inflight:
            s = sendq[0]
            if s.item is not item or s.local_offset != end or total + s.length > self.merge_bytes:
                break
            sendq.popleft()
            s.req_id = first.req_id
            s.group = s.run = 0
            inflight.append(s)
            end += s.length
            total += s.length
            run += 1
        if run > 1:
            first.run = run
        return total

    def _vectorable(self, s: Slice) -> bool:
        # small slices only; those to a peer's GPU region too (the server stages each stretch
        # of adjacent ranges of a vector with one device copy)
        return s.length <= _SMALL_READ

    def _gather_vector(self, first: Slice, max_inflight: int) -> int:
        """Send ``first`` and the small slices of the same op queued right behind it as one
        READV or WRITEV frame (one req_id for all; a lone one goes as a plain READ or WRITE).
        Returns the payload bytes queued to send."""
        op = first.item.op
        group = [first]
        sendq, inflight, out = self.sendq, self.inflight, self.out
        room = min(_MAX_VECTOR, max_inflight - len(inflight), _MAX_IOV - len(out) - 1)
        while sendq and len(group) < room:
            s = sendq[0]
            if s.item.request.state is not _PENDING:
                sendq.popleft()  # its request already failed
                continue
            if s.item.op is not op or not self._vectorable(s):
                break
            sendq.popleft()
            s.req_id = first.req_id
            s.group = 0
            group.append(s)
        item = first.item
        views = (
            []
            if op is _READ
            else [s.item.local.view[s.local_offset : s.local_offset + s.length] for s in group]
        )
        inflight.extend(group)
        if len(group) == 1:
            code = wire.Op.READ if op is _READ else wire.Op.WRITE
            out.append(
                wire.encode(code, item.region_id, first.req_id, first.target_offset, first.length)
            )
            out.extend(views)
            return 0 if op is _READ else first.length
        first.group = len(group)
        pack = _VECTOR_ENTRY.pack
        desc = b"".join([pack(s.item.region_id, s.target_offset, s.length) for s in group])
        if op is _READ:
            out.append(wire.encode(wire.Op.READV, 0, first.req_id, len(group), len(desc)) + desc)
            return 0
        total = sum(s.length for s in group)
        out.append(
            wire.encode(wire.Op.WRITEV, 0, first.req_id, len(group), len(desc) + total) + desc
        )
        out.extend(views)
        return total

    def _advance(self, n: int) -> None:
        out = self.out
        i = 0
        while i < len(out) and n >= len(out[i]):
            n -= len(out[i])
            i += 1
        del out[:i]
        if n:
            out[0] = memoryview(out[0])[n:]

    def pump_recv(self) -> list[tuple[Slice, KvferryError | None]]:
        """Receive replies without blocking; return finished slices (with an error or None).

        Replies are read in bulk into a small receive buffer, so a burst of small READ replies
        costs one syscall; a READ payload larger than ``_SMALL_READ`` is received straight into
        the caller's buffer after its header (no copy).

        A failure that follows completions in the same call is kept in ``error`` instead of
        raised, so the slices already popped are returned (and completed) rather than lost.

        Raises:
            PeerClosed: the peer closed the connection.
            ProtocolError: the peer sent a reply that does not match what is in flight.
        """
        inflight = self.inflight
        if (
            len(inflight) == 1
            and self.rpos == self.rend
            and self.payload is None
            and self.err is None
            and not self.vec_left
        ):
            return self._recv_alone(inflight[0])
        return self._recv_general()

    def _recv_general(self) -> list[tuple[Slice, KvferryError | None]]:
        done: list[tuple[Slice, KvferryError | None]] = []
        sock = self.sock
        while self.inflight:
            try:
                if self.payload is not None:
                    view = self.payload
                    k = sock.recv_into(view[self.payload_got :])
                    if k == 0:
                        raise PeerClosed("peer closed the connection mid-payload")
                    self.payload_got += k
                    if self.payload_got == len(view):
                        self.payload = None
                        self._finish_head(done)
                elif self.err is not None:
                    err = self.err
                    take = min(len(err) - self.err_got, self.rend - self.rpos)
                    if take:
                        err[self.err_got : self.err_got + take] = self.rview[
                            self.rpos : self.rpos + take
                        ]
                        self.rpos += take
                        self.err_got += take
                    if self.err_got == len(err):
                        self.err = None
                        message = bytes(err).decode(errors="replace")
                        self._fail_head(done, RemoteError(message))
                        continue
                    self._fill(len(err) - self.err_got)
                elif self.vec_left:
                    if self.rend == self.rpos:
                        self._fill(0)
                    head = self.inflight[0]
                    got = self.vec_got
                    take = min(head.length - got, self.rend - self.rpos)
                    at = head.local_offset + got
                    head.item.local.view[at : at + take] = self.rview[self.rpos : self.rpos + take]
                    self.rpos += take
                    self.vec_left -= take
                    if got + take == head.length:
                        self.vec_got = 0
                        done.append((self.inflight.popleft(), None))
                    else:
                        self.vec_got = got + take
                    continue
                elif self.rend - self.rpos >= _HDR:
                    self._on_header(done)
                    continue
                else:
                    head = self.inflight[0]
                    large = head.item.op is _READ and head.length > _SMALL_READ
                    self._fill(_HDR - (self.rend - self.rpos) if large else 0)
            except (BlockingIOError, InterruptedError):
                break
            except (OSError, KvferryError) as e:
                if not done:
                    raise
                self.error = e
                break
            self.last_progress = time.monotonic()
        return done

    def _recv_alone(self, head: Slice) -> list[tuple[Slice, KvferryError | None]]:
        """The reply to the one slice in flight, when it comes whole in one read (a lone small
        request's round trip): checked and taken without the general machinery. Anything else
        (a partial reply, ERR, a malformed one) is left in the buffer for the general path."""
        item = head.item
        want = 0 if item.op is not _READ else head.length
        if want > _SMALL_READ or head.run or head.group:
            return self._recv_general()
        try:
            k = self.sock.recv_into(self.rview, _RBUF_BYTES)
        except (BlockingIOError, InterruptedError):
            return []
        if k == 0:
            raise PeerClosed("peer closed the connection")
        self.last_progress = time.monotonic()
        magic, version, op, _, req_id, _, length = _unpack_from(self.rbuf, 0)
        if (
            k == _HDR + want
            and length == want
            and req_id == head.req_id
            and op == _OK
            and magic == _MAGIC
            and version == _VERSION
        ):
            if want:
                at = head.local_offset
                item.local.view[at : at + want] = self.rview[_HDR:k]
            self.rpos = self.rend = 0
            return [(self.inflight.popleft(), None)]
        self.rpos, self.rend = 0, k
        return self._recv_general()

    def _fill(self, exact: int) -> None:
        """One read into the receive buffer: ``exact`` bytes at most if > 0, else all it holds.

        Raises:
            BlockingIOError: nothing to read now.
            PeerClosed: the peer closed the connection.
        """
        rpos, rend = self.rpos, self.rend
        if rpos:
            left = rend - rpos
            if left:
                self.rbuf[:left] = self.rview[rpos:rend]
            self.rpos, self.rend = 0, left
            rend = left
        room = len(self.rbuf) - rend
        k = self.sock.recv_into(self.rview[rend:], min(exact, room) if exact else room)
        if k == 0:
            raise PeerClosed("peer closed the connection")
        self.rend = rend + k

    def _on_header(self, done: list[tuple[Slice, KvferryError | None]]) -> None:
        rpos = self.rpos
        magic, version, op, _, req_id, _, h_length = _unpack_from(self.rbuf, rpos)
        if magic != _MAGIC or version != _VERSION or op not in _REPLY_OPS:
            # the precise reason
            wire.decode(self.rview[rpos : rpos + _HDR], reply=True, max_length=self.max_frame)
        if h_length > self.max_frame:
            raise ProtocolError(f"frame length {h_length} exceeds {self.max_frame} bytes")
        rpos += _HDR
        self.rpos = rpos
        head = self.inflight[0]
        if req_id != head.req_id:
            raise ProtocolError(f"reply for request {req_id}, expected {head.req_id}")
        if op == _ERR:
            if h_length > wire.MAX_ERROR_BYTES:
                raise ProtocolError(f"error reply of {h_length} bytes is too long")
            if h_length == 0:
                self._fail_head(done, RemoteError("target refused the request"))
            else:
                self.err = bytearray(h_length)
                self.err_got = 0
            return
        item = head.item
        if head.group:
            if item.op is not _READ:  # a WRITEV's acknowledgement answers all its slices
                if h_length != 0:
                    raise ProtocolError("WRITEV acknowledgement carries a payload")
                for _ in range(head.group):
                    done.append((self.inflight.popleft(), None))
                return
            # a READV's reply: its bytes go to its slices in order (pump_recv)
            want = sum(self.inflight[i].length for i in range(head.group))
            if h_length != want:
                raise ProtocolError(f"READV reply of {h_length} bytes, asked for {want}")
            self.vec_left = h_length
            self.vec_got = 0
            return
        if item.op is _READ:
            length = head.length
            if head.run:  # a merged READ: its slices are adjacent in the local buffer
                inflight = self.inflight
                length = sum(inflight[i].length for i in range(head.run))
            if h_length != length:
                raise ProtocolError(f"READ reply of {h_length} bytes, asked for {length}")
            view = item.local.view[head.local_offset : head.local_offset + length]
            have = min(length, self.rend - rpos)
            if have:
                view[:have] = self.rview[rpos : rpos + have]
                self.rpos = rpos + have
            if have == length:
                self._finish_head(done)
            else:
                self.payload = view
                self.payload_got = have
        else:
            if h_length != 0:
                raise ProtocolError("WRITE acknowledgement carries a payload")
            self._finish_head(done)

    def _finish_head(self, done: list[tuple[Slice, KvferryError | None]]) -> None:
        """The head's plain READ or WRITE frame completed: it, and the slices merged into it."""
        inflight = self.inflight
        for _ in range(inflight[0].run or 1):
            done.append((inflight.popleft(), None))

    def _fail_head(
        self, done: list[tuple[Slice, KvferryError | None]], error: KvferryError
    ) -> None:
        """An ERR reply: it answers the head slice, or every slice of the head's READV or merged
        frame."""
        head = self.inflight[0]
        for _ in range(max(1, head.group, head.run)):
            done.append((self.inflight.popleft(), error))

    def take_all(self) -> list[Slice]:
        """Remove and return every unfinished slice (for retry after a fault)."""
        slices = list(self.inflight) + list(self.sendq)
        self.inflight.clear()
        self.sendq.clear()
        self.out.clear()
        self.payload = None
        self.err = None
        self.vec_left = self.vec_got = 0
        return slices

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
