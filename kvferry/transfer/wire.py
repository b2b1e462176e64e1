"""kvferry's versioned binary wire codec for the transfer engine (no sockets here).

Every frame starts with a fixed 32-byte little-endian header::

    magic  2s   b"KF"
    version u8  WIRE_VERSION
    op     u8   one of Op
    region u32  target memory region id (data ops), 0 otherwise
    req_id u64  initiator-chosen id, echoed in the reply (replies come back in request order)
    offset u64  byte offset inside the region (data ops)
    length u64  payload bytes that follow (HELLO, WRITE, replies) or bytes asked for (READ)

A connection starts with HELLO (JSON payload: version, auth token); the target answers OK with a
JSON description of its regions, or ERR and closes. Then READ asks for ``length`` bytes at
``region/offset`` (reply: OK + the bytes) and WRITE carries ``length`` bytes to store there
(reply: OK, no payload). ERR replies carry a short UTF-8 message and the target closes the
connection after sending one for a malformed frame.

READV (a target that lists "readv" in its handshake ``ops``) asks for several ranges in one frame:
``offset`` is their count N (1..MAX_VECTOR), ``length`` is N * 20, and N descriptors ``<IQQ>``
(region, offset, length) follow. The reply is one OK whose payload is the ranges' bytes one after
another, or one ERR for the whole frame (then the target closes, as for a refused READ). It saves
a header and a round of per-frame work per small block. WRITEV (op "writev") is its mirror:
``length`` is N * 20 plus the ranges' bytes, which follow the descriptors one after another; the
reply is one OK without payload, or one ERR for the whole frame.

CALL carries a control request for a service mounted on the listener (the store server): ``region``
is the method number, the payload its arguments; the reply is OK with the result payload, or ERR
with a message when the call failed (the connection stays open: the frame itself was sound).

Decoding validates everything a peer controls; the server additionally checks ranges against the
regions it granted (``check_range``).
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

from kvferry.errors import ProtocolError

MAGIC = b"KF"
WIRE_VERSION = 1
HEADER = struct.Struct("<2sBBIQQQ")
HEADER_SIZE = HEADER.size  # 32
MAX_HELLO_BYTES = 64 * 1024
MAX_ERROR_BYTES = 4096


class Op(enum.IntEnum):
    """Frame operations; replies have the high bit set."""

    HELLO = 1
    READ = 2
    WRITE = 3
    CALL = 4
    READV = 5
    WRITEV = 6
    OK = 0x81
    ERR = 0x82


_REQUEST_OPS = frozenset((Op.HELLO, Op.READ, Op.WRITE, Op.CALL, Op.READV, Op.WRITEV))

VECTOR_ENTRY = struct.Struct("<IQQ")  # region, offset, length of one READV range
MAX_VECTOR = 1024  # ranges in one READV frame
_REPLY_OPS = frozenset((Op.OK, Op.ERR))


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded frame header."""

    op: Op
    region: int
    req_id: int
    offset: int
    length: int


def encode(op: Op, region: int = 0, req_id: int = 0, offset: int = 0, length: int = 0) -> bytes:
    """Pack a frame header."""
    return HEADER.pack(MAGIC, WIRE_VERSION, op, region, req_id, offset, length)


def decode(buf: bytes | bytearray | memoryview, *, reply: bool, max_length: int) -> Header:
    """Unpack and validate a frame header.

    Args:
        buf: exactly HEADER_SIZE bytes.
        reply: True when decoding a reply (on the initiator), False for a request (on a target).
        max_length: the largest ``length`` accepted.

    Raises:
        ProtocolError: bad magic, version, op, or an oversize length.
    """
    if len(buf) != HEADER_SIZE:
        raise ProtocolError(f"header must be {HEADER_SIZE} bytes, got {len(buf)}")
    magic, version, op, region, req_id, offset, length = HEADER.unpack(buf)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: not a kvferry peer")
    if version != WIRE_VERSION:
        raise ProtocolError(f"unsupported wire version {version}; this side speaks {WIRE_VERSION}")
    allowed = _REPLY_OPS if reply else _REQUEST_OPS
    if op not in allowed:
        raise ProtocolError(f"unexpected op {op:#x} in a {'reply' if reply else 'request'}")
    if length > max_length:
        raise ProtocolError(f"frame length {length} exceeds the limit of {max_length} bytes")
    return Header(Op(op), region, req_id, offset, length)


def check_range(region_sizes: dict[int, int], region: int, offset: int, length: int) -> None:
    """Check that ``[offset, offset+length)`` lies inside granted region ``region``.

    Raises:
        ProtocolError: unknown region, empty or out-of-bounds range.
    """
    size = region_sizes.get(region)
    if size is None:
        raise ProtocolError(f"region {region} is not granted to this peer")
    if length <= 0:
        raise ProtocolError("length must be positive")
    if offset + length > size:
        raise ProtocolError(
            f"range [{offset}, {offset + length}) is outside region {region} of {size} bytes"
        )


def encode_json(obj: dict[str, Any]) -> bytes:
    """Serialise a handshake document."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def decode_json(payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse a handshake document.

    Raises:
        ProtocolError: not UTF-8 JSON of an object.
    """
    try:
        doc = json.loads(bytes(payload).decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # deep nesting
        raise ProtocolError(f"handshake payload is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ProtocolError("handshake payload must be a JSON object")
    return doc
