"""The tcp transport: slices pipelined over ``workers`` connections per peer.

Data path. Requests are cut into slices (``plan_slices``) and dealt round-robin over the peer's
connections. A connection keeps up to ``max_inflight`` slices in flight and moves their bytes
without a user-space copy, coalescing small or adjacent slices into fewer frames: that is one
connection's state machine, in ``kvferry.transfer.transports.tcp_conn``. This module owns the
channel: the lead, the connections' lifecycle and the faults.

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
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from kvferry.errors import KvferryError, PeerClosed, ProtocolError, TransferTimeout
from kvferry.transfer import handshake, wire
from kvferry.transfer.batch import Batch, OpCode, RequestState, finish_slices
from kvferry.transfer.segment import PeerInfo
from kvferry.transfer.slicing import count_slices, plan_slices
from kvferry.transfer.transports.base import Channel, Transport, WorkItem
from kvferry.transfer.transports.tcp_conn import Conn, Slice

__all__ = ["TcpChannel", "TcpTransport"]

_READ = OpCode.READ
_HDR = wire.HEADER_SIZE
_MERGE_BYTES = 1 << 20  # adjacent slices of one request on one connection go as one frame


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
        self._inbox: deque[Slice] = deque()
        self._conns: list[Conn | None] = [None] * self._workers
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
        self._arrived: deque[tuple[int, Conn | None, KvferryError | None]] = deque()
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
                inbox.append(Slice(item, 0, item.length, deadline))
                continue
            size = self._device_slice if device and item.region_id in device else self._slice_size
            for offset, length in plan_slices(item.length, size, self._fragment_ratio):
                inbox.append(Slice(item, offset, length, deadline))
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

    def _send_alone(self, conn: Conn, s: Slice) -> None:
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

    def _connect(self, timeout: float | None = None) -> Conn:
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
        return Conn(
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
        live: list[Conn] = []
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
            made: Conn | None = None
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

    def _finish(self, finished: list[tuple[Slice, KvferryError | None]]) -> None:
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

    def _retry_or_fail(self, slices: list[Slice], error: KvferryError) -> None:
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
