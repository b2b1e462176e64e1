"""Faults against real target processes: kill, stall, auth, hostile frames, a live-server fuzzer.

Targets run in their own process (``target_process``); hostile clients are raw sockets speaking
kvferry's wire format (kvferry/transfer/wire.py) by hand. Bounds on waits are hang detectors with a
wide margin, not performance checks.
"""

from __future__ import annotations

import random
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pytest

from kvferry import (
    AuthError,
    BatchStatus,
    KvferryConfig,
    OpCode,
    PeerClosed,
    TransferEngine,
    TransferError,
    TransferRequest,
    TransferState,
    TransferTimeout,
)
from kvferry.testing import TargetProcess
from kvferry.transfer import wire
from kvferry.transfer.wire import HEADER_SIZE, MAGIC, WIRE_VERSION, Op

StartTarget = Callable[..., TargetProcess]
MiB = 1 << 20
TRANSFER_TIMEOUT = 2.0
MARGIN = 5.0  # generous: the box is small and shared; a hang still shows up as a failure
HEADER = struct.Struct("<2sBBIQQQ")
T = TypeVar("T")


def fault_engine(**transfer: object) -> TransferEngine:
    cfg = {"transport": "tcp", "transfer_timeout": TRANSFER_TIMEOUT, "retry_count": 2}
    return TransferEngine(KvferryConfig(transfer={**cfg, **transfer}))


def big_read_batch(
    ini: TransferEngine, target: TargetProcess, blocks: str = "large"
) -> list[TransferRequest]:
    """16 reads of the whole 8 MiB region: 128 MiB, far more than socket buffers hold; or
    ("small") 8192 reads of 4 KiB, which go as READV frames of 64."""
    local = ini.allocate(8 * MiB)
    h = ini.open_segment(target.name)
    if blocks == "small":
        return [
            TransferRequest(OpCode.READ, local, (i % 2048) * 4096, h, (i * 7 % 2048) * 4096, 4096)
            for i in range(8192)
        ]
    return [TransferRequest(OpCode.READ, local, 0, h, 0, 8 * MiB) for _ in range(16)]


def read_all(ini: TransferEngine, target: TargetProcess) -> np.ndarray[Any, Any]:
    """Read the target's first region with a fresh handle; returns a copy of the bytes."""
    local = ini.allocate(8 * MiB)
    h = ini.open_segment(target.name, refresh=True)
    ini.transfer_sync([TransferRequest(OpCode.READ, local, 0, h, 0, 8 * MiB)], timeout=30)
    return local.array.copy()


def run_bounded(fn: Callable[[], T], limit: float) -> T:
    """Run ``fn`` in a thread; fail the test if it does not return within ``limit`` seconds."""
    result: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            result.append(fn())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still running after {limit:g}s: it hangs"
    if errors:
        raise errors[0]
    return result[0]


# -- kill and stall ----------------------------------------------------------------------------
@pytest.mark.parametrize("blocks", ["large", "small"])
def test_sigkill_mid_batch_fails_the_batch_and_nothing_hangs(
    target_process: StartTarget, blocks: str
) -> None:
    target = target_process()
    ini = fault_engine()
    try:
        requests = big_read_batch(ini, target, blocks)
        batch = ini.allocate_batch(len(requests))
        ini.submit(batch, requests)
        target.signal(signal.SIGKILL)
        status = run_bounded(
            lambda: ini.wait(batch, timeout=TRANSFER_TIMEOUT + MARGIN),
            TRANSFER_TIMEOUT + MARGIN + 5,
        )
        assert status.state is TransferState.FAILED
        failed = [r for r in status.requests if r.state is TransferState.FAILED]
        assert failed, "a killed target cannot have served the whole batch"
        assert all(isinstance(r.error, TransferError) for r in failed)
        assert any(isinstance(r.error, PeerClosed) for r in failed)
        assert ini.metrics()["tcp"]["errors"] == len(failed)
        ini.free_batch(batch)
        # the handle is dead for good now: a new transfer fails fast, it does not hang
        h = requests[0].target
        with pytest.raises(TransferError):
            run_bounded(
                lambda: ini.transfer_sync(
                    [TransferRequest(OpCode.READ, requests[0].local, 0, h, 0, 4096)],
                    timeout=TRANSFER_TIMEOUT + MARGIN,
                ),
                TRANSFER_TIMEOUT + MARGIN + 5,
            )
    finally:
        run_bounded(ini.close, 10)


@pytest.mark.parametrize(
    ("when", "blocks"), [("before-submit", "large"), ("mid-batch", "large"), ("mid-batch", "small")]
)
def test_sigstop_fails_with_transfer_timeout_then_recovers(
    target_process: StartTarget, when: str, blocks: str
) -> None:
    target = target_process()
    ini = fault_engine()  # connect_timeout stays 5s: it must not stretch transfer_timeout
    try:
        requests = big_read_batch(ini, target, blocks)
        batch = ini.allocate_batch(len(requests))

        def submit_and_wait() -> BatchStatus:
            if when == "before-submit":
                target.signal(signal.SIGSTOP)
            ini.submit(batch, requests)
            if when == "mid-batch":
                target.signal(signal.SIGSTOP)
            return ini.wait(batch, timeout=TRANSFER_TIMEOUT + MARGIN)

        status = run_bounded(submit_and_wait, TRANSFER_TIMEOUT + MARGIN + 5)
        assert status.state is TransferState.FAILED
        failed = [r for r in status.requests if r.state is TransferState.FAILED]
        assert failed
        errors = {type(r.error) for r in failed}
        assert errors == {TransferTimeout}, [str(r.error) for r in failed[:3]]
        target.signal(signal.SIGCONT)
        # the same engine reconnects to the resumed target and reads the right bytes
        assert np.array_equal(read_all(ini, target), target.expected(0))
    finally:
        target.signal(signal.SIGCONT)
        run_bounded(ini.close, 10)


def test_submit_never_waits_on_a_peer_that_does_not_answer(target_process: StartTarget) -> None:
    """Connections beyond the first are made by connector threads: a submit that needs one to a
    stopped target returns at once (the old way, it waited out connect_timeout in the handshake),
    and the batch completes, with the right bytes, once the target runs again."""
    target = target_process()
    ini = fault_engine(workers=2, transfer_timeout=60.0, connect_timeout=30.0)
    try:
        local = ini.allocate(1 * MiB)
        h = ini.open_segment(target.name)  # connection 1 of 2 made here
        requests = [
            TransferRequest(OpCode.READ, local, i * 64 * 1024, h, i * 64 * 1024, 64 * 1024)
            for i in range(8)
        ]
        batch = ini.allocate_batch(len(requests))
        target.signal(signal.SIGSTOP)
        run_bounded(lambda: ini.submit(batch, requests), MARGIN)  # a hang detector: 30 s before
        assert ini.status(batch).state is TransferState.PENDING
        target.signal(signal.SIGCONT)
        status = run_bounded(lambda: ini.wait(batch, timeout=30), 40)
        assert status.state is TransferState.COMPLETED, [str(r.error) for r in status.requests]
        assert np.array_equal(local.array[: 8 * 64 * 1024], target.expected(0)[: 8 * 64 * 1024])
    finally:
        target.signal(signal.SIGCONT)
        run_bounded(ini.close, 10)


# -- auth --------------------------------------------------------------------------------------
def test_auth_token_is_required_and_checked(target_process: StartTarget) -> None:
    target = target_process(token="s3cret-token")
    with fault_engine() as anonymous, pytest.raises(AuthError, match="token"):
        anonymous.open_segment(target.name)
    wrong = TransferEngine(KvferryConfig(listen={"auth_token": "guess"}))
    with wrong, pytest.raises(AuthError):
        wrong.open_segment(target.name)
    right = TransferEngine(
        KvferryConfig(transfer={"transport": "tcp"}, listen={"auth_token": "s3cret-token"})
    )
    with right:
        assert np.array_equal(read_all(right, target), target.expected(0))
    # a raw HELLO without the token gets an ERR reply, then the connection is closed
    with RawClient(target) as raw:
        raw.send(frame(Op.HELLO, length=len(b'{"version":1}')) + b'{"version":1}')
        h, body = raw.reply()
        assert h.op is Op.ERR and b"token" in body
        assert raw.closed()


# -- raw clients -------------------------------------------------------------------------------
def frame(
    op: int,
    region: int = 0,
    req_id: int = 0,
    offset: int = 0,
    length: int = 0,
    magic: bytes = MAGIC,
    version: int = WIRE_VERSION,
) -> bytes:
    return HEADER.pack(magic, version, op, region, req_id, offset, length)


def readv_frame(req_id: int, ranges: list[tuple[int, int, int]]) -> bytes:
    """A READV asking for ``(region, offset, length)`` ranges."""
    body = b"".join(wire.VECTOR_ENTRY.pack(*r) for r in ranges)
    return frame(Op.READV, 0, req_id, len(ranges), len(body)) + body


def writev_frame(req_id: int, ranges: list[tuple[int, int, int]], data: list[bytes]) -> bytes:
    """A WRITEV of ``data`` (the payload; need not match the ranges) to ``ranges``."""
    body = b"".join(wire.VECTOR_ENTRY.pack(*r) for r in ranges)
    payload = b"".join(data)
    return frame(Op.WRITEV, 0, req_id, len(ranges), len(body) + len(payload)) + body + payload


def hello_frame(token: str | None = None) -> bytes:
    body = wire.encode_json({"version": WIRE_VERSION, "token": token or ""})
    return frame(Op.HELLO, length=len(body)) + body


class RawClient:
    """A hand-driven connection to a target, with a timeout on every receive."""

    def __init__(self, target: TargetProcess, timeout: float = 10.0) -> None:
        host, port = target.name.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def reply(self) -> tuple[wire.Header, bytes]:
        h = wire.decode(self.recv_exact(HEADER_SIZE), reply=True, max_length=64 * MiB)
        return h, self.recv_exact(h.length)

    def handshake(self, token: str | None = None) -> dict[str, Any]:
        self.send(hello_frame(token))
        h, body = self.reply()
        assert h.op is Op.OK, body
        return wire.decode_json(body)

    def closed(self) -> bool:
        """True once the target closed the connection (EOF or reset) with nothing more to say."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


@dataclass
class BadFrame:
    what: str
    data: bytes
    message: str
    echoes_req_id: bool = True


def test_out_of_bounds_frames_get_err_and_close_and_change_nothing(
    target_process: StartTarget,
) -> None:
    target = target_process()
    size = target.regions[0]["size"]
    rid = target.region_id(0)
    expected = target.expected(0)
    bad = [
        BadFrame("read past the end", frame(Op.READ, rid, 41, size - 10, 20), "outside"),
        BadFrame("read at the end", frame(Op.READ, rid, 42, size, 1), "outside"),
        BadFrame("write past the end", frame(Op.WRITE, rid, 43, size - 1, 2), "outside"),
        BadFrame("write huge offset", frame(Op.WRITE, rid, 44, 2**64 - 1, 1), "outside"),
        BadFrame("write unknown region", frame(Op.WRITE, 999, 45, 0, 16), "not granted"),
        BadFrame("read zero bytes", frame(Op.READ, rid, 46, 0, 0), "outside"),
        BadFrame("read over max frame", frame(Op.READ, rid, 47, 0, 2**63), "exceeds|outside"),
        BadFrame("hello again", hello_frame(), "HELLO|not allowed", echoes_req_id=False),
        BadFrame("reply op", frame(Op.OK, rid, 48, 0, 1), "unexpected op", echoes_req_id=False),
    ]
    with fault_engine() as good:
        # a well-behaved client connected before the attacks, used again after them
        local = good.allocate(8 * MiB)
        h = good.open_segment(target.name)
        good.transfer_sync([TransferRequest(OpCode.READ, local, 0, h, 0, 4096)], timeout=10)
        for case in bad:
            with RawClient(target) as raw:
                doc = raw.handshake()
                assert [r["id"] for r in doc["regions"]] == [rid]
                # a correct request first: the raw client speaks the protocol right
                raw.send(frame(Op.READ, rid, 7, 100, 64))
                ok, payload = raw.reply()
                assert (ok.op, ok.req_id, payload) == (Op.OK, 7, expected[100:164].tobytes())
                raw.send(case.data)
                err, message = raw.reply()
                assert err.op is Op.ERR, case.what
                if case.echoes_req_id:
                    assert err.req_id == HEADER.unpack(case.data[:HEADER_SIZE])[4], case.what
                assert message, case.what
                assert re.search(case.message, message.decode()), (case.what, message)
                assert raw.closed(), f"{case.what}: the connection stayed open"
        # the good client's connection still works, and no byte of the target changed
        good.transfer_sync([TransferRequest(OpCode.READ, local, 0, h, 0, 8 * MiB)], timeout=30)
        assert np.array_equal(local.array, expected)
    assert "Traceback" not in target.stderr()


# -- live-server fuzzer ------------------------------------------------------------------------
FUZZ_SEED = 0x6B66
FUZZ_FRAMES = 3000
FUZZ_THREADS = 4
FUZZ_TOKEN = "fuzz-token"
ANY = None  # an OK reply whose payload is checked elsewhere (the handshake document)
Reply = tuple[Op, bytes | None, int | None]  # (op, payload or ANY, echoed req_id or 0)


@dataclass
class Conversation:
    """What one raw connection sends, and exactly which replies it must get before EOF."""

    what: list[str]
    data: bytes
    replies: list[Reply]
    frames: int


class Fuzzer:
    """Seeded generator of hostile conversations against one target region."""

    def __init__(self, seed: int, target: TargetProcess) -> None:
        self.rng = random.Random(seed)
        self.rid = target.region_id(0)
        self.size = int(target.regions[0]["size"])
        self.expected = target.expected(0)
        self.req_id = 0

    def _bytes(self, offset: int, n: int) -> bytes:
        return self.expected[offset : offset + n].tobytes()

    def _not_magic(self) -> bytes:
        b = self.rng.randbytes(2)
        return b if b != MAGIC else b"KX"

    def conversation(self) -> Conversation:
        kinds = [self.garbage, self.hello, self.session]
        return self.rng.choices(kinds, weights=[1, 3, 6])[0]()

    def garbage(self) -> Conversation:
        n = self.rng.randint(1, 96)
        data = bytes([self.rng.choice([0, 0x4A, 0xFF])]) + self.rng.randbytes(n - 1)
        # a short one leaves the target waiting for the rest of a header until our EOF
        replies: list[Reply] = [(Op.ERR, b"", 0)] if n >= HEADER_SIZE else []
        return Conversation([f"garbage[{n}]"], data, replies, 1)

    def hello(self) -> Conversation:
        rng = self.rng
        good = wire.encode_json({"version": WIRE_VERSION, "token": FUZZ_TOKEN})
        cases: list[tuple[str, bytes, bool]] = [  # (what, bytes, answered with ERR)
            ("bad magic", frame(Op.HELLO, length=len(good), magic=self._not_magic()) + good, True),
            (
                "bad version",
                frame(Op.HELLO, length=len(good), version=rng.choice([0, 2, 255])) + good,
                True,
            ),
            (
                "first frame not HELLO",
                frame(rng.choice([2, 3, 0x81, 0x82, 0, rng.randint(4, 255)]), length=len(good))
                + good,
                True,
            ),
            ("hello too long", frame(Op.HELLO, length=rng.randint(64 * 1024 + 1, 2**64 - 1)), True),
            ("truncated header", frame(Op.HELLO, length=len(good))[: rng.randint(1, 31)], False),
            (
                "truncated body",
                frame(Op.HELLO, length=len(good)) + good[: rng.randint(0, len(good) - 1)],
                False,
            ),
        ]
        bodies = [
            b"\xff" + rng.randbytes(rng.randint(0, 64)),
            b"[1, 2]",
            b'"version"',
            b"42",
            b"[" * rng.randint(2000, 60000),
            b'{"version": 1' + b"," * rng.randint(1, 9),
            b'{"version": 2, "token": "fuzz-token"}',
            b'{"version": "1", "token": "fuzz-token"}',
            b'{"token": "fuzz-token"}',
            b'{"version": 1}',
            b'{"version": 1, "token": 7}',
            b'{"version": 1, "token": ["fuzz-token"]}',
            b'{"version": 1, "token": "fuzz-tokeN"}',
            b'{"version": 1, "token": "\\ud800"}',
        ]
        for body in bodies:
            cases.append(
                (f"hello body {body[:24]!r}", frame(Op.HELLO, length=len(body)) + body, True)
            )
        what, data, answered = rng.choice(cases)
        return Conversation([what], data, [(Op.ERR, b"", 0)] if answered else [], 1)

    def session(self) -> Conversation:
        rng = self.rng
        what = ["hello"]
        parts = [hello_frame(FUZZ_TOKEN)]
        replies: list[Reply] = [(Op.OK, ANY, 0)]
        for _ in range(rng.randint(0, 12)):
            self.req_id += 1
            n = rng.randint(1, 4096)
            offset = rng.randint(0, self.size - n)
            roll = rng.random()
            if roll < 0.45:
                what.append(f"READ {offset}+{n}")
                parts.append(frame(Op.READ, self.rid, self.req_id, offset, n))
                replies.append((Op.OK, self._bytes(offset, n), self.req_id))
            elif roll < 0.55:
                ranges = [self._range() for _ in range(rng.randint(1, 6))]
                what.append(f"READV {ranges}")
                parts.append(readv_frame(self.req_id, [(self.rid, o, k) for o, k in ranges]))
                payload = b"".join(self._bytes(o, k) for o, k in ranges)
                replies.append((Op.OK, payload, self.req_id))
            elif roll < 0.65:  # carries the bytes already there, like the WRITEs
                ranges = [self._range() for _ in range(rng.randint(1, 6))]
                what.append(f"WRITEV {ranges}")
                data = [self._bytes(o, k) for o, k in ranges]
                parts.append(writev_frame(self.req_id, [(self.rid, o, k) for o, k in ranges], data))
                replies.append((Op.OK, b"", self.req_id))
            else:  # writes carry the bytes already there, so the region never changes
                what.append(f"WRITE {offset}+{n}")
                parts.append(frame(Op.WRITE, self.rid, self.req_id, offset, n))
                parts.append(self._bytes(offset, n))
                replies.append((Op.OK, b"", self.req_id))
        frames = len(parts) - sum(1 for w in what if w.startswith("WRITE"))
        if rng.random() < 0.8:
            name, data, reply = self._bad_data_frame()
            what.append(name)
            parts.append(data)
            frames += 1
            if reply is not None:
                replies.append(reply)
        return Conversation(what, b"".join(parts), replies, frames)

    def _range(self) -> tuple[int, int]:
        n = self.rng.randint(1, 4096)
        return self.rng.randint(0, self.size - n), n

    def _bad_readv(self, q: int) -> tuple[str, bytes]:
        """A READV or WRITEV refused as a whole (WRITEVs carry the bytes already there)."""
        rng, rid, size = self.rng, self.rid, self.size
        good = [(rid, *self._range()) for _ in range(rng.randint(1, 5))]
        op = rng.choice([Op.READV, Op.WRITEV])
        choice = rng.randrange(5)
        if choice == 0:
            count = rng.choice([0, wire.MAX_VECTOR + 1, 2**64 - 1])
            return f"{op.name} of {count} ranges", frame(op, 0, q, count, 20 * (count % 7))
        if choice == 1:
            right = 20 * len(good) + (sum(n for _, _, n in good) if op is Op.WRITEV else 0)
            length = rng.choice([0, right - 1, right + 1, 2**64 - 1])
            desc = b"".join(wire.VECTOR_ENTRY.pack(*r) for r in good)
            return f"{op.name} length {length}", frame(op, 0, q, len(good), length) + desc
        if choice == 2:
            n = rng.randint(1, 1 << 20)
            bad = (rid, rng.randint(size - n + 1, size + (1 << 20)), n)
        elif choice == 3:
            bad = (rng.choice([0, rid + 1, 2**32 - 1]), 0, 16)
        else:
            bad = (rid, rng.randint(0, size), rng.choice([0, 2**63, 2**64 - 1]))
        ranges = good[:]
        ranges.insert(rng.randint(0, len(ranges)), bad)
        if op is Op.READV:
            return f"READV with {bad}", readv_frame(q, ranges)
        data = [self._bytes(o, n) for _, o, n in good]
        return f"WRITEV with {bad}", writev_frame(q, ranges, data)

    def _bad_data_frame(self) -> tuple[str, bytes, Reply | None]:
        rng, rid, size = self.rng, self.rid, self.size
        self.req_id += 1
        q = self.req_id
        op = rng.choice([Op.READ, Op.WRITE])
        err_echo = (Op.ERR, b"", q)
        err = (Op.ERR, b"", 0)
        choice = rng.randrange(12)
        if choice >= 10:  # a READV refused as a whole: nothing of it is sent, ERR echoes it
            name, data = self._bad_readv(q)
            return name, data, err_echo
        if choice == 0:
            return "random header", bytes([0x4B ^ 0xFF]) + rng.randbytes(31), err
        if choice == 1:
            return "bad magic", frame(op, rid, q, 0, 1, magic=self._not_magic()), err
        if choice == 2:
            v = rng.choice([0, 2, rng.randint(3, 255)])
            return f"version {v}", frame(op, rid, q, 0, 1, version=v), err
        if choice == 3:
            bad_op = rng.choice([0, 1, 4, 0x81, 0x82, rng.randint(6, 255)])
            length = rng.choice([0, 1, 2**64 - 1])
            return f"op {bad_op:#x}", frame(bad_op, rid, q, 0, length), err
        if choice == 4:
            n = rng.randint(1, 1 << 20)
            offset = rng.randint(size - n + 1, size + (1 << 20))
            return f"{op.name} out of bounds", frame(op, rid, q, offset, n), err_echo
        if choice == 5:
            other = rng.choice([0, rid + 1, rng.randint(rid + 2, 2**32 - 1)])
            return f"{op.name} region {other}", frame(op, other, q, 0, 16), err_echo
        if choice == 6:
            return f"{op.name} zero length", frame(op, rid, q, rng.randint(0, size), 0), err_echo
        if choice == 7:
            n = rng.choice([2**64 - 1, 2**63, (64 << 20) + 1])
            return f"{op.name} length {n}", frame(op, rid, q, 0, n), err_echo
        if choice == 8:
            return "truncated header", frame(op, rid, q, 0, 16)[: rng.randint(1, 31)], None
        n = rng.randint(2, 4096)
        offset = rng.randint(0, size - n)
        partial = self._bytes(offset, rng.randint(0, n - 1))
        return "truncated WRITE payload", frame(Op.WRITE, rid, q, offset, n) + partial, None


def converse(target: TargetProcess, conv: Conversation) -> list[str]:
    """Send ``conv``, half-close, read until EOF; return what differs from the expectation."""
    host, port = target.name.rsplit(":", 1)
    got = bytearray()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(conv.data)
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(1 << 16):
            got += chunk
    problems: list[str] = []
    view = memoryview(got)
    for i, (op, payload, req_id) in enumerate(conv.replies):
        if len(view) < HEADER_SIZE:
            return [f"reply {i} ({op.name}) missing; {len(view)} stray bytes"]
        h = wire.decode(view[:HEADER_SIZE], reply=True, max_length=64 * MiB)
        body = bytes(view[HEADER_SIZE : HEADER_SIZE + h.length])
        view = view[HEADER_SIZE + h.length :]
        if h.op is not op:
            problems.append(f"reply {i}: {h.op.name} {body[:80]!r}, expected {op.name}")
        elif op is Op.OK and payload is ANY:
            doc = wire.decode_json(body)
            if [r["id"] for r in doc["regions"]] != [target.region_id(0)]:
                problems.append(f"reply {i}: handshake document {doc}")
        elif op is Op.OK and body != payload:
            problems.append(f"reply {i}: wrong payload of {len(body)} bytes")
        elif op is Op.ERR and not body:
            problems.append(f"reply {i}: ERR without a reason")
        if req_id and h.req_id != req_id:
            problems.append(f"reply {i}: req_id {h.req_id}, expected {req_id}")
    if len(view):
        problems.append(f"{len(view)} unexpected bytes after the expected replies")
    return problems


def test_live_server_fuzz(target_process: StartTarget) -> None:
    target = target_process(token=FUZZ_TOKEN)
    failures: list[str] = []
    counts = [0] * FUZZ_THREADS

    def fuzz(index: int) -> None:
        seed = FUZZ_SEED + index
        fuzzer = Fuzzer(seed, target)
        n = 0
        while counts[index] < FUZZ_FRAMES // FUZZ_THREADS and len(failures) < 5:
            conv = fuzzer.conversation()
            try:
                problems = converse(target, conv)
            except OSError as e:  # a reset or a timeout is a failure too
                problems = [f"{type(e).__name__}: {e}"]
            if problems:
                failures.append(f"seed {seed} conversation {n} {conv.what}: {problems}")
            counts[index] += conv.frames
            n += 1

    threads = [threading.Thread(target=fuzz, args=(i,)) for i in range(FUZZ_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "the fuzzer hung"
    assert not failures, "\n".join(failures)
    assert sum(counts) >= FUZZ_FRAMES
    assert target.alive()
    log = target.stderr()
    assert "unexpected error" not in log and "Traceback" not in log, log[-3000:]
    # the target still serves a good client, and not one byte of its memory changed
    cfg = KvferryConfig(transfer={"transport": "tcp"}, listen={"auth_token": FUZZ_TOKEN})
    with TransferEngine(cfg) as good:
        assert np.array_equal(read_all(good, target), target.expected(0))
        local = good.register(np.arange(4096, dtype=np.uint8) ^ 0x5A)
        h = good.open_segment(target.name)
        good.transfer_sync([TransferRequest(OpCode.WRITE, local, 0, h, 4096, 4096)], 10)
        assert np.array_equal(read_all(good, target)[4096:8192], local.array)


def test_replies_pipelined_before_a_refused_frame_are_sent_once(
    target_process: StartTarget,
) -> None:
    # The good READ's reply is still gathered (unsent) when the bad frame behind it in the same
    # burst is refused: it must go out once, before the ERR, and nothing after it.
    target = target_process()
    size = target.regions[0]["size"]
    rid = target.region_id(0)
    expected = target.expected(0)
    with RawClient(target) as raw:
        raw.handshake()
        raw.send(frame(Op.READ, rid, 7, 100, 64) + frame(Op.READ, rid, 8, size, 1))
        ok, payload = raw.reply()
        assert (ok.op, ok.req_id, payload) == (Op.OK, 7, expected[100:164].tobytes())
        err, message = raw.reply()
        assert (err.op, err.req_id) == (Op.ERR, 8), message
        assert raw.closed(), "more bytes followed the ERR reply"


def test_readv_answers_every_range_or_refuses_the_frame(target_process: StartTarget) -> None:
    target = target_process()
    rid = target.region_id(0)
    size = target.regions[0]["size"]
    expected = target.expected(0)
    with RawClient(target) as raw:
        doc = raw.handshake()
        assert "readv" in doc["ops"]
        ranges = [(rid, 5, 100), (rid, size - 7, 7), (rid, 0, 1), (rid, 4096, 16384)]
        raw.send(readv_frame(9, ranges) + frame(Op.READ, rid, 10, 3, 4))
        ok, payload = raw.reply()
        assert (ok.op, ok.req_id) == (Op.OK, 9)
        assert payload == b"".join(expected[o : o + n].tobytes() for _, o, n in ranges)
        ok, payload = raw.reply()  # the connection goes on after a READV
        assert (ok.op, ok.req_id, payload) == (Op.OK, 10, expected[3:7].tobytes())
        # one range out of bounds: no byte of the others, one ERR, the connection closes
        raw.send(readv_frame(11, [(rid, 0, 64), (rid, size - 1, 2), (rid, 64, 64)]))
        err, message = raw.reply()
        assert (err.op, err.req_id) == (Op.ERR, 11)
        assert b"outside" in message
        assert raw.closed()
    assert "Traceback" not in target.stderr()


def test_writev_lands_every_range_or_none(target_process: StartTarget) -> None:
    target = target_process()
    rid = target.region_id(0)
    size = target.regions[0]["size"]
    expected = target.expected(0)
    ranges = [(rid, 5, 100), (rid, size - 7, 7), (rid, 4096, 16384)]
    data = [bytes([i + 1]) * n for i, (_, _, n) in enumerate(ranges)]
    with RawClient(target) as raw:
        assert "writev" in raw.handshake()["ops"]
        raw.send(writev_frame(3, ranges, data) + readv_frame(4, ranges))
        ok, payload = raw.reply()
        assert (ok.op, ok.req_id, payload) == (Op.OK, 3, b"")
        ok, payload = raw.reply()
        assert (ok.op, ok.req_id, payload) == (Op.OK, 4, b"".join(data))
        # a range out of bounds after a good one: nothing of the frame lands
        bad = [(rid, 0, 64), (rid, size - 1, 2)]
        raw.send(writev_frame(5, bad, [b"\xee" * 64, b"\xee" * 2]))
        err, message = raw.reply()
        assert (err.op, err.req_id) == (Op.ERR, 5) and b"outside" in message
        assert raw.closed()
    with RawClient(target) as raw:
        raw.handshake()
        raw.send(frame(Op.READ, rid, 6, 0, 64))
        _, payload = raw.reply()
        assert payload == expected[:5].tobytes() + b"\x01" * 59


# -- slowloris ---------------------------------------------------------------------------------
def test_trickling_handshakes_do_not_lock_out_the_transfer_target() -> None:
    """Connections that each send one byte of a HELLO and then trickle hold no slot past
    listen.handshake_timeout, and never keep an initiator with the token from its segment."""
    listen = {
        "port": 0,
        "auth_token": "tok",
        "max_connections": 8,
        "max_pending": 4,
        "handshake_timeout": 3.0,
    }
    with TransferEngine(KvferryConfig(listen=listen)) as target:
        region = target.allocate(MiB)
        region.array[:] = 7
        name = target.listen()
        host, port = name.rsplit(":", 1)
        tricklers = []
        for _ in range(16):  # twice max_connections
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"K")
            tricklers.append(s)
        time.sleep(1.1)  # slowloris connections are old by the time they matter
        cfg = KvferryConfig(transfer={"transport": "tcp"}, listen={"auth_token": "tok"})
        with TransferEngine(cfg) as ini:
            local = ini.allocate(MiB)
            h = ini.open_segment(name)
            ini.transfer_sync([TransferRequest(OpCode.READ, local, 0, h, 0, MiB)], timeout=10)
            assert (local.array == 7).all()
        counters = target.metrics()["server"]
        assert int(counters["evicted"]) >= 1, "the oldest half-open handshakes made room"
        for s in tricklers:
            s.settimeout(MARGIN)
            try:
                assert s.recv(16) == b"", "closed by the deadline"
            except OSError:
                pass  # reset: closed as well
            s.close()
