"""The tcp transport (kvferry/transfer/transports/tcp.py) against real target processes."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import numpy as np
import pytest

from kvferry import (
    BatchStatus,
    KvferryConfig,
    MemoryRegion,
    OpCode,
    PeerClosed,
    RemoteError,
    SegmentError,
    SegmentHandle,
    TransferEngine,
    TransferRequest,
    TransferState,
)
from kvferry.testing import TargetProcess, TransportKit, check_transport
from kvferry.transfer import wire

StartTarget = Callable[..., TargetProcess]
MiB = 1 << 20


def tcp_engine(**transfer: object) -> TransferEngine:
    return TransferEngine(KvferryConfig(transfer={"transport": "tcp", **transfer}))


def own_target(
    eng: TransferEngine, size: int, rng: np.random.Generator
) -> tuple[MemoryRegion, MemoryRegion, SegmentHandle]:
    """A region of random bytes that ``eng`` serves, a local buffer of the same size, and the
    handle of ``eng``'s own listener (tcp to itself)."""
    target = eng.allocate(size)
    target.array[:] = rng.integers(0, 256, size, dtype=np.uint8)
    return target, eng.allocate(size), eng.open_segment(eng.listen())


def test_reads_what_the_target_process_holds(target_process: StartTarget) -> None:
    target = target_process(registered_size=3 * MiB + 5)
    with tcp_engine() as ini:
        local = ini.allocate(8 * MiB)
        h = ini.open_segment(target.name)
        assert h.transport == "tcp"
        assert [r.region_id for r in h.regions] == [target.region_id(0), target.region_id(1)]
        assert h.size == 8 * MiB
        ini.transfer_sync([TransferRequest(OpCode.READ, local, 0, h, 0, 8 * MiB)], timeout=30)
        assert np.array_equal(local.array, target.expected(0))
        n = 3 * MiB + 5
        ini.transfer_sync(
            [TransferRequest(OpCode.READ, local, 0, h, 0, n, target.region_id(1))], timeout=30
        )
        assert np.array_equal(local.array[:n], target.expected(1))
        assert ini.metrics()["tcp"]["bytes_read"] == 8 * MiB + n


def test_kit(target_process: StartTarget) -> None:
    target = target_process()
    with tcp_engine() as ini:
        h = ini.open_segment(target.name)
        check_transport(ini, h, ini.allocate(8 * MiB), h.size)
        assert ini.metrics()["tcp"]["errors"] == 0


def test_kit_registered_target_region_and_registered_local_buffer(
    target_process: StartTarget,
) -> None:
    target = target_process(registered_size=4 * MiB)
    with tcp_engine() as ini:
        local = ini.register(np.zeros(4 * MiB, dtype=np.uint8))  # a plain buffer, not shm
        h = ini.open_segment(target.name)
        check_transport(ini, h, local, 4 * MiB, target_region=target.region_id(1))


@pytest.mark.parametrize(
    "transfer",
    [
        {"slice_size": "4KiB", "fragment_ratio": 4, "workers": 1, "max_inflight": 3},
        {"slice_size": "16KiB", "fragment_ratio": 16, "workers": 3, "max_inflight": 1},
        {"slice_size": "256KiB", "workers": 2, "grace_period_ns": 0},
    ],
    ids=["small-slices-1-worker", "3-workers-no-pipelining", "big-slices-no-spin"],
)
def test_kit_under_other_tuning(target_process: StartTarget, transfer: dict[str, object]) -> None:
    target = target_process()
    with tcp_engine(**transfer) as ini:
        h = ini.open_segment(target.name)
        kit = TransportKit(ini, h, ini.allocate(8 * MiB), h.size)
        kit.check_slicing_sizes()
        kit.check_concurrent_batches()
        kit.check_request_status()


def test_kit_over_tcp_to_own_engine() -> None:
    with TransferEngine(KvferryConfig(transfer={"transport": "tcp"}, listen={"port": 0})) as eng:
        target = eng.allocate(4 * MiB)
        local = eng.allocate(4 * MiB)
        h = eng.open_segment(eng.listen())
        assert h.transport == "tcp"
        check_transport(eng, h, local, target.size, target_region=target.region_id)
        served = eng.metrics()["server"]
        assert served["bytes_read"] != 0 and served["bytes_written"] != 0


@pytest.mark.parametrize("op", [OpCode.READ, OpCode.WRITE])
def test_refused_range_fails_the_request_without_retry_and_the_channel_recovers(
    op: OpCode,
) -> None:
    cfg = KvferryConfig(transfer={"transport": "tcp"}, listen={"port": 0})
    with TransferEngine(cfg) as eng:
        target = eng.allocate(MiB)
        doomed = eng.allocate(4 * MiB)
        local = eng.allocate(4 * MiB)
        h = eng.open_segment(eng.listen())
        eng.unregister(doomed)  # the handle still lists it; the server no longer serves it
        batch = eng.allocate_batch(1)
        # 4 MiB: many slices, so WRITE payloads are still streaming when the refusal comes
        eng.submit(batch, [TransferRequest(op, local, 0, h, 0, 4 * MiB, doomed.region_id)])
        status = eng.wait(batch, timeout=10)
        assert status.state is TransferState.FAILED
        error = status.requests[0].error
        assert isinstance(error, RemoteError), repr(error)
        assert "not granted" in str(error)
        assert eng.metrics()["tcp"]["retries"] == 0
        assert eng.metrics()["server"]["protocol_errors"] != 0
        # the server closed that connection; the next request reconnects and succeeds
        target.array[:4096] = 9
        eng.transfer_sync([TransferRequest(OpCode.READ, local, 0, h, 0, 4096)], timeout=10)
        assert (local.array[:4096] == 9).all()


class HalfAnsweringPeer:
    """A scripted target speaking the wire format by hand.

    On its first data connection it answers only the first ``answer`` READs, then closes (a target
    dying between replies); later connections get every answer. Replies and the close are sent
    back to back, so the initiator reads completions and EOF in one go.
    """

    def __init__(self, size: int, answer: int, expect: int) -> None:
        self.data = np.random.default_rng(11).integers(0, 256, size, dtype=np.uint8)
        self.answer, self.expect = answer, expect
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.name = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.data_connections = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _recv(self, conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    self._serve(conn)
                except OSError:
                    pass

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        h = wire.decode(self._recv(conn, 32), reply=False, max_length=1 << 16)
        self._recv(conn, h.length)
        doc = wire.encode_json(
            {
                "version": wire.WIRE_VERSION,
                "instance": "scripted",
                "boot_id": "another-host",
                "pid": 1,
                "regions": [{"id": 1, "size": self.data.size}],
            }
        )
        conn.sendall(wire.encode(wire.Op.OK, length=len(doc)) + doc)
        try:
            first = self._recv(conn, 32)
        except ConnectionError:
            return  # open_segment's probe connection: handshake only
        self.data_connections += 1
        limit = self.answer if self.data_connections == 1 else None
        headers = [first]
        if limit is not None:
            headers += [self._recv(conn, 32) for _ in range(self.expect - 1)]
        out = b""
        while True:
            for raw in headers:
                r = wire.decode(raw, reply=False, max_length=1 << 20)
                if limit is not None and limit == 0:
                    conn.sendall(out)
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                out += wire.encode(wire.Op.OK, 1, r.req_id, 0, r.length)
                out += self.data[r.offset : r.offset + r.length].tobytes()
                if limit is not None:
                    limit -= 1
            conn.sendall(out)
            out = b""
            try:
                headers = [self._recv(conn, 32)]
            except ConnectionError:
                return

    def close(self) -> None:
        self.listener.close()


def test_completions_read_just_before_a_close_are_not_lost() -> None:
    requests = 8
    peer = HalfAnsweringPeer(size=64 * 1024, answer=requests // 2, expect=requests)
    try:
        cfg = {"transport": "tcp", "workers": 1, "retry_count": 2, "transfer_timeout": 5}
        with TransferEngine(KvferryConfig(transfer=cfg)) as ini:
            local = ini.allocate(64 * 1024)
            h = ini.open_segment(peer.name)
            batch = ini.allocate_batch(requests)
            ini.submit(
                batch,
                [
                    TransferRequest(OpCode.READ, local, i * 1000, h, i * 1000, 1000)
                    for i in range(requests)
                ],
            )
            status = ini.wait(batch, timeout=15)
            assert [r.state for r in status.requests] == [TransferState.COMPLETED] * requests, [
                repr(r.error) for r in status.requests
            ]
            n = requests * 1000
            assert np.array_equal(local.array[:n], peer.data[:n])
            # only the unanswered half went again, on a fresh connection
            assert ini.metrics()["tcp"]["retries"] == requests // 2
            assert peer.data_connections == 2
    finally:
        peer.close()


def test_close_segment_then_submit_is_refused(target_process: StartTarget) -> None:
    target = target_process()
    with tcp_engine() as ini:
        local = ini.allocate(MiB)
        h = ini.open_segment(target.name)
        ini.close_segment(h)
        with pytest.raises(SegmentError, match="not open"):
            ini.submit(ini.allocate_batch(1), [TransferRequest(OpCode.READ, local, 0, h, 0, 1)])
        # reopening gives a fresh, working handle
        h2 = ini.open_segment(target.name)
        assert h2 is not h
        ini.transfer_sync([TransferRequest(OpCode.READ, local, 0, h2, 0, MiB)], timeout=10)
        assert np.array_equal(local.array, target.expected(0)[:MiB])


def test_open_segment_of_a_closed_port_raises_peer_closed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        with tcp_engine(connect_timeout=2) as ini, pytest.raises(PeerClosed, match="connect"):
            ini.open_segment(f"127.0.0.1:{port}")


@pytest.mark.parametrize("vectored", [True, False])
def test_a_burst_of_small_reads_or_writes_goes_as_vector_frames(vectored: bool) -> None:
    cfg = KvferryConfig(transfer={"transport": "tcp", "vectored_io": vectored}, listen={"port": 0})
    rng = np.random.default_rng(5)
    with TransferEngine(cfg) as eng:
        target, local, h = own_target(eng, 4 * MiB, rng)
        # 200 scattered small READs (more than one READV holds), then a mixed burst: small
        # READs around a large READ and WRITEs, which end a run of vectored READs
        blocks = rng.permutation(1024)[:200]
        frames = 0
        for op in (OpCode.READ, OpCode.WRITE):  # READV, then WRITEV
            if op is OpCode.WRITE:
                local.array[: 200 * 4096] = rng.integers(0, 256, 200 * 4096, dtype=np.uint8)
            reqs = [
                TransferRequest(op, local, i * 4096, h, int(b) * 4096, 4096)
                for i, b in enumerate(blocks)
            ]
            eng.transfer_sync(reqs, timeout=30)
            for i, b in enumerate(blocks):
                assert np.array_equal(
                    local.array[i * 4096 : (i + 1) * 4096],
                    target.array[b * 4096 : (b + 1) * 4096],
                ), (op, i)
            served = eng.metrics()["server"]["frames"] - frames
            frames += served
            assert served == (200 if not vectored else 4), (op, served)  # 64 + 64 + 64 + 8
        local.array[:] = 0
        mixed = [
            TransferRequest(OpCode.READ, local, 0, h, 100, 3000),
            TransferRequest(OpCode.READ, local, 4096, h, 9000, 16384),
            TransferRequest(OpCode.READ, local, 65536, h, 1 << 20, 300_000),
            TransferRequest(OpCode.READ, local, 8192 + 16384, h, 7, 1),
            TransferRequest(OpCode.WRITE, local, 2 << 20, h, 3 << 20, 4096),
            TransferRequest(OpCode.READ, local, 40000, h, 2 << 20, 5000),
        ]
        local.array[2 << 20 : (2 << 20) + 4096] = 7
        eng.transfer_sync(mixed, timeout=30)
        for r in mixed:
            lo, to, n = r.local_offset, r.target_offset, r.length
            assert np.array_equal(local.array[lo : lo + n], target.array[to : to + n]), r


@pytest.mark.parametrize(("max_frame", "frames"), [(64 * MiB, 3), (256 * 1024, 12)])
def test_adjacent_slices_of_a_request_go_as_one_frame(max_frame: int, frames: int) -> None:
    """A 3 MiB request of 48 slices of 64 KiB on one connection: READ and WRITE frames of up
    to 1 MiB (or the frame limit, when smaller), bytes exact both ways."""
    cfg = KvferryConfig(
        transfer={
            "transport": "tcp",
            "slice_size": "64KiB",
            "device_slice_size": "64KiB",
            "max_frame_size": max_frame,
        },
        listen={"port": 0},
    )
    rng = np.random.default_rng(9)
    with TransferEngine(cfg) as eng:
        target, local, h = own_target(eng, 8 * MiB, rng)
        assert h.peer.max_frame == max_frame
        before = eng.metrics()["server"]["frames"]
        eng.transfer_sync([TransferRequest(OpCode.READ, local, 5, h, 1000, 3 * MiB)], timeout=30)
        assert np.array_equal(local.array[5 : 5 + 3 * MiB], target.array[1000 : 1000 + 3 * MiB])
        assert eng.metrics()["server"]["frames"] - before == frames
        local.array[: 3 * MiB] = rng.integers(0, 256, 3 * MiB, dtype=np.uint8)
        before = eng.metrics()["server"]["frames"]
        eng.transfer_sync(
            [TransferRequest(OpCode.WRITE, local, 0, h, 4 * MiB, 3 * MiB)], timeout=30
        )
        assert np.array_equal(target.array[4 * MiB : 7 * MiB], local.array[: 3 * MiB])
        assert eng.metrics()["server"]["frames"] - before == frames
        assert eng.metrics()["tcp"]["errors"] == 0


def test_a_peer_that_announces_no_frame_limit_gets_slices_one_frame_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kvferry.transfer.handshake import parse_peer

    describe = TransferEngine._describe

    def older(self: TransferEngine) -> dict[str, object]:
        doc = describe(self)
        del doc["max_frame"]  # as a target from before frame merging answers
        return doc

    monkeypatch.setattr(TransferEngine, "_describe", older)
    cfg = KvferryConfig(transfer={"transport": "tcp", "slice_size": "64KiB"}, listen={"port": 0})
    with TransferEngine(cfg) as eng:
        target = eng.allocate(4 * MiB)
        target.array[:] = 3
        local = eng.allocate(4 * MiB)
        h = eng.open_segment(eng.listen())
        assert h.peer.max_frame is None
        eng.transfer_sync([TransferRequest(OpCode.READ, local, 0, h, 0, MiB)], timeout=30)
        assert eng.metrics()["server"]["frames"] == 16 and np.all(local.array[:MiB] == 3)
    doc = {"version": wire.WIRE_VERSION, "regions": [], "instance": "i", "boot_id": "b", "pid": 1}
    assert parse_peer(doc, ("127.0.0.1", 1), None).max_frame is None
    assert parse_peer({**doc, "max_frame": 4096}, ("127.0.0.1", 1), None).max_frame == 4096
    for bad in (True, 100, "1MiB", 2.5):
        with pytest.raises(Exception, match="malformed max_frame"):
            parse_peer({**doc, "max_frame": bad}, ("127.0.0.1", 1), None)


def test_a_lone_request_the_socket_takes_in_part_is_finished_by_the_waiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lone request goes straight onto the wire from ``submit``; with a send buffer far
    smaller than it, the socket takes a part and the waiter sends the rest. Bytes exact."""
    short: list[int] = []
    sendmsg = socket.socket.sendmsg

    def spy(self: socket.socket, buffers: list[bytes], *args: object) -> int:
        n = sendmsg(self, buffers, *args)  # type: ignore[arg-type]
        if n < sum(len(b) for b in buffers):
            short.append(n)
        return n

    rng = np.random.default_rng(12)
    cfg = KvferryConfig(transfer={"transport": "tcp", "slice_size": "64KiB"}, listen={"port": 0})
    with TransferEngine(cfg) as eng:
        target, local, h = own_target(eng, 4 * MiB, rng)
        conn = h.channel._conns[0]  # type: ignore[attr-defined]
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        monkeypatch.setattr(socket.socket, "sendmsg", spy)
        n = 80 * 1024 - 1  # the largest single slice of 64 KiB slices (fragment ratio 4)
        for k in range(8):
            local.array[:n] = rng.integers(0, 256, n, dtype=np.uint8)
            eng.transfer_sync([TransferRequest(OpCode.WRITE, local, 0, h, k * n, n)], timeout=30)
            assert np.array_equal(target.array[k * n : (k + 1) * n], local.array[:n]), k
            eng.transfer_sync([TransferRequest(OpCode.READ, local, n, h, k * n, n)], timeout=30)
            assert np.array_equal(local.array[n : 2 * n], local.array[:n]), k
        assert short, "the small send buffer never split a lone WRITE: the test proves nothing"
        assert eng.metrics()["tcp"]["errors"] == 0


def test_lone_requests_from_many_threads_at_once() -> None:
    """Threads posting lone 4 KiB READs and WRITEs (while another thread leads, or none does),
    some with a second lone batch in flight: every byte lands where it belongs."""
    rng = np.random.default_rng(13)
    cfg = KvferryConfig(transfer={"transport": "tcp", "workers": 2}, listen={"port": 0})
    with TransferEngine(cfg) as eng:
        target, local, h = own_target(eng, 4 * MiB, rng)
        local.array[:] = rng.integers(0, 256, 4 * MiB, dtype=np.uint8)
        errors: list[BaseException] = []

        def worker(t: int) -> None:
            try:
                base = t * MiB  # each thread owns one MiB of both buffers
                for i in range(150):
                    at = base + (i % 128) * 8192
                    write = TransferRequest(OpCode.WRITE, local, at, h, at, 4096)
                    read = TransferRequest(OpCode.READ, local, at + 4096, h, at, 4096)
                    if i % 3:
                        eng.transfer_sync([write], timeout=30)
                        eng.transfer_sync([read], timeout=30)
                    else:  # two lone batches in flight at once: a WRITE, and a READ elsewhere
                        other = base + ((i + 64) % 128) * 8192
                        a, b = eng.allocate_batch(1), eng.allocate_batch(1)
                        eng.submit(a, [write])
                        eng.submit(
                            b, [TransferRequest(OpCode.READ, local, other + 4096, h, other, 4096)]
                        )
                        assert eng.wait(a, 30).state is TransferState.COMPLETED
                        assert eng.wait(b, 30).state is TransferState.COMPLETED
                        eng.transfer_sync([read], timeout=30)
                    assert np.array_equal(local.array[at : at + 4096], target.array[at : at + 4096])
                    assert np.array_equal(
                        local.array[at + 4096 : at + 8192], local.array[at : at + 4096]
                    ), (t, i)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not any(th.is_alive() for th in threads), "a thread hung"
        assert not errors, errors[0]
        assert eng.metrics()["tcp"]["errors"] == 0


def test_a_finished_batch_is_freed_when_dropped() -> None:
    """Requests do not refer back to their batch: a dropped batch goes at once (reference
    counting), not at the next cyclic collection."""
    import gc
    import weakref

    rng = np.random.default_rng(14)
    cfg = KvferryConfig(transfer={"transport": "tcp"}, listen={"port": 0})
    with TransferEngine(cfg) as eng:
        _, local, h = own_target(eng, MiB, rng)
        gc.disable()
        try:
            for requests in (1, 3):
                batch = eng.allocate_batch(requests)
                eng.submit(
                    batch,
                    [
                        TransferRequest(OpCode.READ, local, i * 4096, h, 0, 4096)
                        for i in range(requests)
                    ],
                )
                assert eng.wait(batch, 30).state is TransferState.COMPLETED
                eng.free_batch(batch)
                gone = weakref.ref(batch)
                del batch
                assert gone() is None, requests
        finally:
            gc.enable()


class ScriptedTarget:
    """A hand-driven target: a real listener that does the handshake like kvferry's and then
    answers each READ as ``answer(conn, header)`` says, for replies no healthy target sends."""

    def __init__(self, answer: Callable[[socket.socket, tuple[int, ...]], None]) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.name = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        from kvferry.transfer.handshake import recv_exact

        try:
            hello = wire.HEADER.unpack(recv_exact(conn, wire.HEADER_SIZE))
            recv_exact(conn, hello[-1])
            doc = {
                "version": wire.WIRE_VERSION,
                "ops": [],
                "max_frame": 64 * MiB,
                "instance": "scripted",
                "boot_id": "elsewhere",
                "pid": 1,
                "regions": [{"id": 1, "size": MiB, "location": "cpu", "shm": None}],
            }
            body = wire.encode_json(doc)
            conn.sendall(wire.encode(wire.Op.OK, length=len(body)) + body)
            while True:
                self.answer(conn, wire.HEADER.unpack(recv_exact(conn, wire.HEADER_SIZE)))
        except (OSError, PeerClosed):
            conn.close()

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            conn.close()


def pattern(offset: int, length: int) -> bytes:
    return bytes((offset + i) % 251 for i in range(length))


@pytest.mark.parametrize("length", [1, 4096, 16 * 1024])
def test_a_lone_reply_that_arrives_in_pieces_is_assembled(length: int) -> None:
    """The reply to a lone READ, cut inside its header and inside its payload, lands whole."""
    import time

    def in_pieces(conn: socket.socket, header: tuple[int, ...]) -> None:
        _, _, _, region, req_id, offset, n = header
        reply = wire.encode(wire.Op.OK, region, req_id, 0, n) + pattern(offset, n)
        middle = wire.HEADER_SIZE + n // 2
        for piece in (reply[:10], reply[10:middle], reply[middle:]):
            time.sleep(0.005)
            conn.sendall(piece)

    served = ScriptedTarget(in_pieces)
    try:
        with tcp_engine() as eng:
            local = eng.allocate(MiB)
            h = eng.open_segment(served.name)
            for offset in (0, 777, 5000):
                eng.transfer_sync(
                    [TransferRequest(OpCode.READ, local, 8, h, offset, length)], timeout=10
                )
                assert bytes(local.view[8 : 8 + length]) == pattern(offset, length)
    finally:
        served.close()


def test_a_lone_reply_for_another_request_or_an_err_fails_the_request() -> None:
    """A reply that names another request is a protocol error (the connection is dropped and
    the request fails, retries off); an ERR reply fails the request with its message."""
    script: list[str] = []  # how the next READ is answered

    def wrong(conn: socket.socket, header: tuple[int, ...]) -> None:
        _, _, _, region, req_id, offset, n = header
        kind = script.pop(0)
        if kind == "err":
            message = b"range refused by the script"
            conn.sendall(wire.encode(wire.Op.ERR, region, req_id, 0, len(message)) + message)
        elif kind == "other id":
            conn.sendall(wire.encode(wire.Op.OK, region, req_id + 7, 0, n) + pattern(offset, n))
        else:
            conn.sendall(wire.encode(wire.Op.OK, region, req_id, 0, n) + pattern(offset, n))

    served = ScriptedTarget(wrong)
    try:
        with tcp_engine(retry_count=0) as eng:
            local = eng.allocate(MiB)
            h = eng.open_segment(served.name)

            def read(answer: str) -> BatchStatus:
                script.append(answer)
                batch = eng.allocate_batch(1)
                eng.submit(batch, [TransferRequest(OpCode.READ, local, 0, h, 64, 4096)])
                return eng.wait(batch, 10)

            status = read("err")
            assert status.state is TransferState.FAILED
            assert "range refused by the script" in str(status.errors[0])
            status = read("other id")
            assert status.state is TransferState.FAILED
            assert "reply for request" in str(status.errors[0])
            # on a fresh connection: the dropped one is not reused
            assert read("ok").state is TransferState.COMPLETED
            assert bytes(local.view[:4096]) == pattern(64, 4096)
            assert eng.metrics()["tcp"]["protocol_errors"] == 1
    finally:
        served.close()


def test_a_lone_request_whose_target_hangs_up_fails_after_its_retries() -> None:
    """The target closes the connection on every request: the lone request is retried on a
    fresh connection, then fails with PeerClosed; nothing hangs."""
    import time

    def hang_up(conn: socket.socket, header: tuple[int, ...]) -> None:
        conn.close()
        raise PeerClosed("scripted hang-up")

    served = ScriptedTarget(hang_up)
    try:
        with tcp_engine(retry_count=2, transfer_timeout=10) as eng:
            local = eng.allocate(MiB)
            h = eng.open_segment(served.name)
            began = time.monotonic()
            batch = eng.allocate_batch(1)
            eng.submit(batch, [TransferRequest(OpCode.READ, local, 0, h, 0, 4096)])
            status = eng.wait(batch, 20)
            assert status.state is TransferState.FAILED
            assert isinstance(status.errors[0], PeerClosed), status.errors[0]
            assert time.monotonic() - began < 10
            assert eng.metrics()["tcp"]["retries"] == 2
    finally:
        served.close()
