"""The tcp transport: slices pipelined over ``workers`` connections per peer.

Data path. Requests are cut into slices (``plan_slices``) and dealt round-robin over the peer's
connections. A connection keeps up to ``max_inflight`` slices in flight: request headers (and
WRITE payloads) go out in one ``sendmsg`` per burst, gathered straight from the registered local
buffer; READ payloads are received with ``recv_into`` straight into it. No payload byte is copied
in user space and no buffer is allocated per slice. On the wire, slices are coalesced where that
saves per-frame work: a run of small ones goes as one READV/WRITEV frame, and adjacent slices of
one request queued together on one connection go as one READ/WRITE frame of up to 1 MiB (within
the frame limit both sides announced; with one connection a 1 MiB request is one frame instead
of 16 of 64 KiB, 1.5x the bandwidth here).

Who drives I/O. There is no worker thread: the thread that waits on a batch drives the sockets
(leader/follower). Waking a sleeping thread costs 60-70 us on a small VM, more than a whole 4 KiB
round trip, so the leader busy-polls for ``grace_period_ns`` before it blocks in ``poll``. Other
waiters sleep on their batch's event and take over the lead when it is free. ``post`` pushes bytes
out at once when no leader is active, and wakes the leader (an eventfd in its poll set) otherwise.

Connections. The first one is made when the channel opens (a bad address or token fails there).
Any other (the ``workers`` beyond the first, and every reconnect) is made by a short-lived
connector thread, so neither ``post`` nor a status poll ever waits on a peer that does not
answer; the leader installs the connection on its next pass (the connector wakes it).

Faults. A connection that closes, errors or makes no progress for half of ``transfer_timeout`` is
torn down; its unfinished slices are retried on a fresh connection up to ``retry_count`` times.
A request still unfinished ``transfer_timeout`` after it was posted fails with TransferTimeout,
and every connection carrying its slices is torn down so no late byte lands in a buffer its owner
already gave up on. An ERR reply (the target refused a range) fails that request without retry.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from kvferry.errors import (
    KvferryError,
    PeerClosed,
    ProtocolError,
    RemoteError,
    TransferTimeout,
)
from kvferry.transfer import handshake, wire
from kvferry.transfer.batch import Batch, OpCode, RequestState, TransferState, finish_slices
from kvferry.transfer.segment import PeerInfo
from kvferry.transfer.slicing import count_slices, plan_slices
from kvferry.transfer.transports.base import Channel, Transport, WorkItem

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
_MERGE_BYTES = 1 << 20  # adjacent slices of one request on one connection go as one frame
_VECTOR_ENTRY = wire.VECTOR_ENTRY


class _Slice:
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


class _Conn:
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
        self.sendq: deque[_Slice] = deque()
        self.inflight: deque[_Slice] = deque()
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

    def _merge_run(self, first: _Slice, max_inflight: int) -> int:
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

    def _vectorable(self, s: _Slice) -> bool:
        # small slices only; those to a peer's GPU region too (the server stages each stretch
        # of adjacent ranges of a vector with one device copy)
        return s.length <= _SMALL_READ

    def _gather_vector(self, first: _Slice, max_inflight: int) -> int:
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

    def pump_recv(self) -> list[tuple[_Slice, KvferryError | None]]:
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

    def _recv_general(self) -> list[tuple[_Slice, KvferryError | None]]:
        done: list[tuple[_Slice, KvferryError | None]] = []
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

    def _recv_alone(self, head: _Slice) -> list[tuple[_Slice, KvferryError | None]]:
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

    def _on_header(self, done: list[tuple[_Slice, KvferryError | None]]) -> None:
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

    def _finish_head(self, done: list[tuple[_Slice, KvferryError | None]]) -> None:
        """The head's plain READ or WRITE frame completed: it, and the slices merged into it."""
        inflight = self.inflight
        for _ in range(inflight[0].run or 1):
            done.append((inflight.popleft(), None))

    def _fail_head(
        self, done: list[tuple[_Slice, KvferryError | None]], error: KvferryError
    ) -> None:
        """An ERR reply: it answers the head slice, or every slice of the head's READV or merged
        frame."""
        head = self.inflight[0]
        for _ in range(max(1, head.group, head.run)):
            done.append((self.inflight.popleft(), error))

    def take_all(self) -> list[_Slice]:
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


class TcpChannel(Channel):
    transport = "tcp"

    def __init__(self, transport: TcpTransport, peer: PeerInfo) -> None:
        super().__init__(transport.counters)
        cfg = transport.config
        self.peer = peer
        self._token = transport.token
        self._workers = cfg.workers
        self._max_inflight = cfg.max_inflight
        self._slice_size = cfg.slice_size
        self._fragment_ratio = cfg.fragment_ratio
        # GPU regions of the peer: every slice there is a device copy at the target, so their
        # slices are coarser (transfer.device_slice_size)
        self._device_regions = frozenset(
            r.region_id for r in peer.regions if not r.location.startswith("cpu")
        )
        self._device_slice = max(cfg.slice_size, cfg.device_slice_size)
        # one slice below this on any region (device slices are at least as large)
        self.single_below = self._slice_size + max(1, self._slice_size // self._fragment_ratio)
        self._vector = cfg.vectored_io
        self._retry_count = cfg.retry_count
        self._timeout = cfg.transfer_timeout
        self._stall = cfg.transfer_timeout / 2
        self._connect_timeout = cfg.connect_timeout
        self._grace = cfg.grace_period_ns / 1e9
        self._max_frame = cfg.max_frame_size
        self._lead = threading.Lock()
        self._inbox: deque[_Slice] = deque()
        self._conns: list[_Conn | None] = [None] * self._workers
        self._rr = 0
        self._req_id = 0
        self._next_check = 0.0  # when the leader next looks for late requests and stalls
        self._leading = False
        self._blocked = False
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False
        self._reconnect_at = [0.0] * self._workers
        self._connecting = [False] * self._workers  # a connector thread is at work for the slot
        # (slot, connection or None, error) from connector threads, for the leader to install
        self._arrived: deque[tuple[int, _Conn | None, KvferryError | None]] = deque()
        self._state = threading.Lock()  # _closed and the eventfd against connector threads
        # Fail fast: the first connection is made now so a bad address or token surfaces at open.
        self._conns[0] = self._connect()

    # -- public -----------------------------------------------------------------------------
    def slice_count(self, length: int, region_id: int | None = None) -> int:
        if region_id in self._device_regions:
            return count_slices(length, self._device_slice, self._fragment_ratio)
        return count_slices(length, self._slice_size, self._fragment_ratio)

    def post(self, items: Sequence[WorkItem]) -> None:
        if self._closed:
            for item in items:
                item.request.fail(PeerClosed(f"channel to {self.peer.name} is closed"))
            return
        deadline = time.monotonic() + self._timeout
        inbox = self._inbox
        single = self.single_below
        device = self._device_regions
        for item in items:
            if item.length < single:  # one slice: the common KV-block case, no plan needed
                inbox.append(_Slice(item, 0, item.length, deadline))
                continue
            size = self._device_slice if device and item.region_id in device else self._slice_size
            for offset, length in plan_slices(item.length, size, self._fragment_ratio):
                inbox.append(_Slice(item, offset, length, deadline))
        if self._lead.acquire(blocking=False):
            try:
                self._leading = True
                conn = self._conns[0]
                if len(inbox) == 1 and conn is not None and not conn.busy and not self._arrived:
                    self._send_alone(conn, inbox.popleft())
                else:
                    self._dispatch()
                    self._pump_all()
            finally:
                self._leading = False
                self._lead.release()
        elif self._blocked:
            os.eventfd_write(self._wake_fd, 1)

    def progress(self, batch: Batch, deadline: float) -> None:
        is_done = batch.is_done
        while not is_done():
            if self._lead.acquire(blocking=False):
                try:
                    self._leading = True
                    self._drive(is_done, deadline)
                finally:
                    self._leading = False
                    self._lead.release()
            else:
                batch.wait_done(0.0005)
            if time.monotonic() >= deadline:
                return

    def poll(self) -> None:
        if self._lead.acquire(blocking=False):
            try:
                self._dispatch()
                self._pump_all()
                self._check_time(time.monotonic())
            finally:
                self._lead.release()

    def close(self) -> None:
        with self._lead:
            with self._state:
                if self._closed:
                    return
                self._closed = True
            slices = list(self._inbox)
            self._inbox.clear()
            for i, conn in enumerate(self._conns):
                if conn is not None:
                    slices.extend(conn.take_all())
                    conn.close()
                    self._conns[i] = None
            while self._arrived:
                conn = self._arrived.popleft()[1]
                if conn is not None:
                    conn.close()
            for s in slices:
                s.item.request.fail(PeerClosed(f"channel to {self.peer.name} was closed"))
            with self._state:
                os.close(self._wake_fd)

    # -- leader-only below (caller holds self._lead) ----------------------------------------
    def _next_id(self) -> int:
        self._req_id += 1
        return self._req_id

    def _send_alone(self, conn: _Conn, s: _Slice) -> None:
        """Put the one slice of an idle channel straight on the wire: a lone small request (a
        KV block fetched on demand) pays for no dealing or gathering. The reply is left to the
        waiter, as it cannot be back yet."""
        item = s.item
        s.req_id = req_id = self._next_id()
        s.group = s.run = 0
        conn.inflight.append(s)
        parts: list[memoryview | bytes]
        if item.op is _READ:
            parts = [wire.encode(wire.Op.READ, item.region_id, req_id, s.target_offset, s.length)]
            size = _HDR
        else:
            at = s.local_offset
            parts = [
                wire.encode(wire.Op.WRITE, item.region_id, req_id, s.target_offset, s.length),
                item.local.view[at : at + s.length],
            ]
            size = _HDR + s.length
        try:
            n = conn.sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._drop(0, PeerClosed(f"{self.peer.name}: {e}"))
            return
        conn.last_progress = time.monotonic()
        if n < size:  # the socket took part of it: the leader sends the rest
            conn.out = parts
            conn._advance(n)

    def _connect(self, timeout: float | None = None) -> _Conn:
        sock, peer = handshake.connect(
            self.peer.address,
            token=self._token,
            timeout=self._connect_timeout if timeout is None else timeout,
            name=self.peer.name,
        )
        vector = frozenset(
            op
            for op, name in ((OpCode.READ, "readv"), (OpCode.WRITE, "writev"))
            if self._vector and name in peer.ops
        )
        merge = 0
        if peer.max_frame is not None:
            merge = min(_MERGE_BYTES, self._max_frame, peer.max_frame)
        return _Conn(
            sock,
            self._max_frame,
            vector=vector,
            merge_bytes=merge,
            device_regions=self._device_regions,
        )

    def _dispatch(self) -> None:
        """Deal inbox slices round-robin over connections; install the connections connector
        threads made, and start one for each missing connection while slices wait."""
        if not self._arrived and not self._inbox:
            return
        now = time.monotonic()
        failure: KvferryError | None = None
        while self._arrived:
            i, made, error = self._arrived.popleft()
            self._connecting[i] = False
            if made is not None:
                self._conns[i] = made
            else:
                self._reconnect_at[i] = now + 0.01
                failure = error
        inbox = self._inbox
        if not inbox:
            return
        live: list[_Conn] = []
        first_deadline: float | None = None
        for i in range(self._workers):
            conn = self._conns[i]
            if conn is None and not self._connecting[i] and now >= self._reconnect_at[i]:
                # A stalled peer accepts TCP connections but never answers the handshake: never
                # try past the earliest deadline of the waiting slices.
                if first_deadline is None:
                    first_deadline = min(s.deadline for s in inbox)
                budget = min(self._connect_timeout, first_deadline - now)
                if budget > 0:  # else too late: _check_time fails them with TransferTimeout
                    self._connect_in_background(i, budget)
            if conn is not None:
                live.append(conn)
        if not live:
            if failure is not None and not any(self._connecting):
                # Every connection attempt failed: each waiting slice spends one retry.
                slices = list(inbox)
                inbox.clear()
                self._retry_or_fail(slices, failure)
            return  # otherwise connections are on their way or backing off; slices wait
        n = len(live)
        rr = self._rr
        while inbox:
            live[rr % n].sendq.append(inbox.popleft())
            rr += 1
        self._rr = rr

    def _connect_in_background(self, index: int, budget: float) -> None:
        """Connect slot ``index`` in a connector thread; the result lands in ``_arrived``."""
        self._connecting[index] = True

        def connect() -> None:
            made: _Conn | None = None
            error: KvferryError | None = None
            try:
                made = self._connect(budget)
            except KvferryError as e:
                error = e
            except Exception as e:  # never leave the slot marked "connecting" for good
                error = PeerClosed(f"connecting to {self.peer.name} failed: {e!r}")
            with self._state:
                if self._closed:
                    if made is not None:
                        made.close()
                    return
                self._arrived.append((index, made, error))
                if self._blocked:
                    os.eventfd_write(self._wake_fd, 1)

        threading.Thread(
            target=connect, name=f"kvferry-connect {self.peer.name}", daemon=True
        ).start()

    def _pump_all(self) -> bool:
        progressed = False
        for i, conn in enumerate(self._conns):
            if conn is None or not conn.busy:
                continue
            try:
                if conn.sendq or conn.out:
                    progressed |= conn.pump_send(self._max_inflight, self._next_id)
                if conn.inflight:
                    finished = conn.pump_recv()
                    if finished:
                        progressed = True
                        self._finish(finished)
                    if conn.error is not None:
                        raise conn.error
                    if conn.sendq and not conn.out:
                        progressed |= conn.pump_send(self._max_inflight, self._next_id)
            except (OSError, KvferryError) as e:
                error = e if isinstance(e, KvferryError) else PeerClosed(f"{self.peer.name}: {e}")
                if isinstance(e, ProtocolError):
                    self.counters.add(protocol_errors=1)
                self._drop(i, error)
                progressed = True
        return progressed

    def _finish(self, finished: list[tuple[_Slice, KvferryError | None]]) -> None:
        if len(finished) == 1 and finished[0][1] is None:
            # one reply (a lone request's round trip): no grouping to amortise
            item = finished[0][0].item
            request = item.request
            if request.slice_done(finished[0][0].length):
                self.counters.add_request(
                    read=item.op is _READ,
                    nbytes=item.length,
                    slices=request.slices,
                    latency_ns=time.perf_counter_ns() - request.started_ns,
                )
            return
        ok: list[tuple[RequestState, int]] = []
        items: list[WorkItem] = []
        for s, error in finished:
            item = s.item
            if error is None:
                ok.append((item.request, s.length))
                items.append(item)
            elif item.request.fail(error):
                self.counters.add(errors=1)
        completed = finish_slices(ok)
        if not completed:
            return
        # counted per finished call, under one lock round
        read_bytes = written_bytes = slices = 0
        now = time.perf_counter_ns()
        latencies: list[int] = []
        for at in completed:
            item = items[at]
            if item.op is _READ:
                read_bytes += item.length
            else:
                written_bytes += item.length
            slices += item.request.slices
            latencies.append(now - item.request.started_ns)
        self.counters.add_requests(
            read_bytes=read_bytes,
            written_bytes=written_bytes,
            slices=slices,
            latencies_ns=latencies,
        )

    def _drop(self, index: int, error: KvferryError) -> None:
        conn = self._conns[index]
        if conn is None:
            return
        self._conns[index] = None
        conn.close()
        self._retry_or_fail(conn.take_all(), error)

    def _retry_or_fail(self, slices: list[_Slice], error: KvferryError) -> None:
        now = time.monotonic()
        retried = 0
        for s in slices:
            request = s.item.request
            if not request.pending:
                continue
            s.attempts += 1
            if now >= s.deadline:
                late = TransferTimeout(
                    f"no completion from {self.peer.name} within {self._timeout:g}s ({error})"
                )
                if request.fail(late):
                    self.counters.add(errors=1)
            elif s.attempts > self._retry_count:
                if request.fail(error):
                    self.counters.add(errors=1)
            else:
                retried += 1
                self._inbox.append(s)
        if retried:
            self.counters.add(retries=retried)

    def _check_time(self, now: float) -> None:
        for i, conn in enumerate(self._conns):
            if conn is None or not conn.busy:
                continue
            expired = [s for s in conn.inflight if now >= s.deadline and s.item.request.pending]
            expired += [s for s in conn.sendq if now >= s.deadline and s.item.request.pending]
            if expired:
                # Fail the late requests, and tear the connection down so none of their bytes can
                # still land in a buffer the caller may already be reusing.
                for s in expired:
                    if s.item.request.fail(
                        TransferTimeout(
                            f"no completion from {self.peer.name} within {self._timeout:g}s"
                        )
                    ):
                        self.counters.add(errors=1)
                self._drop(i, TransferTimeout(f"{self.peer.name} timed out"))
            elif now - conn.last_progress > self._stall and (conn.inflight or conn.out):
                self._drop(i, PeerClosed(f"{self.peer.name} stalled for {self._stall:g}s"))
        for s in [s for s in self._inbox if now >= s.deadline]:
            self._inbox.remove(s)
            if s.item.request.fail(TransferTimeout(f"could not reach {self.peer.name} in time")):
                self.counters.add(errors=1)

    def _drive(self, until: Callable[[], bool], deadline: float) -> None:
        grace = self._grace
        spin_until = time.monotonic() + grace
        while True:
            self._dispatch()
            progressed = self._pump_all()
            if until():
                return
            now = time.monotonic()
            if now >= self._next_check:  # per channel: a run of short waits checks too
                self._check_time(now)
                self._next_check = now + 0.05
                if until():
                    return
            if now >= deadline:
                return
            if progressed:
                spin_until = now + grace
                continue
            if now < spin_until:
                continue  # busy-poll: non-blocking syscalls release the GIL for others
            self._block(min(deadline, now + 0.05))
            spin_until = time.monotonic() + grace

    def _block(self, until: float) -> None:
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        for conn in self._conns:
            if conn is None:
                continue
            events = 0
            if conn.inflight:
                events |= select.POLLIN
            if conn.out or (conn.sendq and len(conn.inflight) < self._max_inflight):
                events |= select.POLLOUT
            if events:
                poller.register(conn.fd, events)
        # Publish "blocked" before the last checks: a poster or a connector thread either sees
        # it and writes the eventfd, or what it brought is seen here.
        self._blocked = True
        try:
            if self._arrived:
                return
            if self._inbox and not any(self._connecting):
                time.sleep(0.001)  # reconnects backing off: come back soon
                return
            timeout_ms = max(0, int((until - time.monotonic()) * 1000) + 1)
            for fd, _ in poller.poll(timeout_ms):
                if fd == self._wake_fd:
                    try:
                        os.eventfd_read(self._wake_fd)
                    except BlockingIOError:
                        pass
        finally:
            self._blocked = False


class TcpTransport(Transport):
    name = "tcp"

    @property
    def token(self) -> str | None:
        token = self.ctx.listen.auth_token
        return token.get_secret_value() if token is not None else None

    def reachable(self, peer: PeerInfo) -> bool:
        return True

    def open(self, peer: PeerInfo) -> Channel:
        return TcpChannel(self, peer)
