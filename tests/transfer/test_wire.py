"""The wire codec (kvferry/transfer/wire.py): frame headers, range checks, handshake JSON."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvferry.errors import ProtocolError
from kvferry.transfer import wire
from kvferry.transfer.wire import HEADER_SIZE, MAGIC, WIRE_VERSION, Op

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
REQUESTS = [Op.HELLO, Op.READ, Op.WRITE]
REPLIES = [Op.OK, Op.ERR]


def raw(
    magic: bytes = MAGIC, version: int = WIRE_VERSION, op: int = Op.READ, length: int = 0
) -> bytes:
    return struct.pack("<2sBBIQQQ", magic, version, op, 7, 9, 11, length)


def test_header_is_32_bytes_little_endian() -> None:
    frame = wire.encode(Op.READ, region=1, req_id=2, offset=3, length=4)
    assert len(frame) == HEADER_SIZE == 32
    assert frame[:2] == b"KF"
    assert frame[2] == WIRE_VERSION
    assert frame[3] == 2
    assert frame[4:8] == (1).to_bytes(4, "little")
    assert frame[8:16] == (2).to_bytes(8, "little")


@settings(max_examples=200, deadline=None)
@given(
    op=st.sampled_from(REQUESTS + REPLIES),
    region=U32,
    req_id=U64,
    offset=U64,
    length=U64,
)
def test_roundtrip(op: Op, region: int, req_id: int, offset: int, length: int) -> None:
    frame = wire.encode(op, region, req_id, offset, length)
    h = wire.decode(frame, reply=op in REPLIES, max_length=2**64 - 1)
    assert h == wire.Header(op, region, req_id, offset, length)
    assert isinstance(h.op, Op)
    # the same bytes through a memoryview and a bytearray
    assert wire.decode(memoryview(frame), reply=op in REPLIES, max_length=2**64 - 1) == h
    assert wire.decode(bytearray(frame), reply=op in REPLIES, max_length=2**64 - 1) == h


@pytest.mark.parametrize(
    ("frame", "reply", "message"),
    [
        (raw(magic=b"KG"), False, "bad magic"),
        (raw(magic=b"\x00\x00"), True, "bad magic"),
        (raw(version=0), False, "unsupported wire version 0"),
        (raw(version=WIRE_VERSION + 1), True, "unsupported wire version"),
        (raw(op=0), False, "unexpected op 0x0"),
        (raw(op=0x7F), False, "unexpected op"),
        (raw(op=Op.OK), False, "unexpected op 0x81 in a request"),  # reply op sent as request
        (raw(op=Op.ERR), False, "in a request"),
        (raw(op=Op.READ), True, "unexpected op 0x2 in a reply"),  # request op as a reply
        (raw(op=Op.HELLO), True, "in a reply"),
        (raw(length=1025), False, "exceeds the limit of 1024"),
        (raw(op=Op.OK, length=2**64 - 1), True, "exceeds the limit"),
        (raw()[:31], False, "must be 32 bytes"),
        (raw() + b"\x00", False, "must be 32 bytes"),
        (b"", True, "must be 32 bytes"),
    ],
)
def test_bad_headers_raise_protocol_error(frame: bytes, reply: bool, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        wire.decode(frame, reply=reply, max_length=1024)


def test_length_at_the_limit_is_accepted() -> None:
    assert wire.decode(raw(length=1024), reply=False, max_length=1024).length == 1024


@settings(max_examples=2000, deadline=None)
@given(buf=st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE), reply=st.booleans())
def test_decode_of_any_32_bytes_raises_only_protocol_error(buf: bytes, reply: bool) -> None:
    try:
        h = wire.decode(buf, reply=reply, max_length=64 << 20)
    except ProtocolError:
        return
    # whatever is accepted is a well-formed header of the right direction
    assert buf[:2] == MAGIC and buf[2] == WIRE_VERSION
    assert h.op in (REPLIES if reply else REQUESTS)
    assert h.length <= 64 << 20


@settings(max_examples=300, deadline=None)
@given(
    magic=st.binary(min_size=2, max_size=2),
    version=st.integers(0, 255),
    op=st.integers(0, 255),
    length=U64,
)
def test_decode_of_mutated_headers_raises_only_protocol_error(
    magic: bytes, version: int, op: int, length: int
) -> None:
    # biased towards near-valid frames, which random bytes almost never produce
    buf = struct.pack("<2sBBIQQQ", magic, version, op, 1, 2, 3, length)
    try:
        wire.decode(buf, reply=False, max_length=1 << 20)
    except ProtocolError:
        return
    assert (magic, version) == (MAGIC, WIRE_VERSION)
    assert op in REQUESTS and length <= 1 << 20


@settings(max_examples=300, deadline=None)
@given(buf=st.binary(max_size=HEADER_SIZE * 3))
def test_decode_of_any_length_raises_only_protocol_error(buf: bytes) -> None:
    try:
        wire.decode(buf, reply=True, max_length=1 << 30)
    except ProtocolError:
        return  # the one exception decode may raise; anything else fails the test
    assert len(buf) == HEADER_SIZE


@pytest.mark.parametrize(
    ("region", "offset", "length", "message"),
    [
        (2, 0, 1, "region 2 is not granted"),
        (1, 0, 0, "length must be positive"),
        (1, 0, -5, "length must be positive"),
        (1, 4096, 1, r"range \[4096, 4097\) is outside region 1 of 4096 bytes"),
        (1, 4000, 97, "is outside"),
        (1, 2**64 - 1, 1, "is outside"),
    ],
)
def test_check_range_refuses(region: int, offset: int, length: int, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        wire.check_range({1: 4096}, region, offset, length)


@pytest.mark.parametrize(("offset", "length"), [(0, 4096), (4095, 1), (0, 1), (100, 3996)])
def test_check_range_accepts(offset: int, length: int) -> None:
    wire.check_range({1: 4096}, 1, offset, length)  # raises on failure


def test_json_roundtrip_is_compact_and_sorted() -> None:
    doc = {"version": 1, "token": "s3cret", "a": [1, 2]}
    payload = wire.encode_json(doc)
    assert payload == b'{"a":[1,2],"token":"s3cret","version":1}'
    assert wire.decode_json(payload) == doc
    assert wire.decode_json(memoryview(payload)) == doc


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"x"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"[" * 100_000, "not JSON"),  # nesting past the recursion limit
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "not JSON"),
    ],
)
def test_bad_json_raises_protocol_error(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        wire.decode_json(payload)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=256))
def test_decode_json_of_any_bytes_raises_only_protocol_error(payload: bytes) -> None:
    try:
        doc = wire.decode_json(payload)
    except ProtocolError:
        return
    assert isinstance(doc, dict)
