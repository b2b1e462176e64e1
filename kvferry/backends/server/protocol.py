"""The store server's calls: method numbers and the binary codecs of their payloads.

Calls ride in CALL frames of the transfer engine's wire protocol (``kvferry.transfer.wire``), so
they share its listener, handshake, token and framing. All integers are little-endian. A key list
is ``u32 n`` then ``n`` 16-byte keys. Every decoder checks counts and lengths against the payload
it was given and raises :class:`~kvferry.errors.ProtocolError` with what was wrong.

========  ===========================================  ========================================
method    request                                       reply
========  ===========================================  ========================================
LOOKUP    keys                                          u32 leading blocks present
CONTAINS  keys                                          n bytes, 1 = present
GET       keys                                          u8 flags, n x u32 length (MISS), [checks
                                                        if flags & SUMS], the bytes
PUT       keys, n x u32 length, the bytes               n bytes PutStatus code
DELETE    keys                                          u32 removed
LOCATE    keys                                          u64 lease, u32 region, u8 flags, n x (u64
                                                        offset, u32 length or MISS), [checks
                                                        if flags & SUMS]; blocks pinned
RELEASE   u64 lease                                     empty
RESERVE   keys, n x u32 size                            u64 lease, u32 region, n x (u8 status,
                                                        u64 offset, u8 declare)
COMMIT    u64 lease, n bytes ok, n x u64 checksum       n bytes PutStatus code
                  (0 where not asked to declare)
STATS     empty                                         JSON of StoreStats.to_json()
KEYS      empty                                         keys
CHECK     keys                                          u32 blocks dropped
========  ===========================================  ========================================

Integrity: a checksum is :func:`~kvferry.backends.base.block_checksum` (xxh3-64 seeded with the
key). The only writer that can change a slot behind the server's back is a same-host client
whose reservation ran out while it was still copying in; the cpu tier guards every slot that was
once so abandoned (``CpuTier``, ``cpu.checksum``). For blocks in guarded slots the server sends
*checks* (n x u8: 1 = check this block, then n x u64 checksums; flags & SUMS says they follow,
and they are left out when no block of the reply needs one): the client checks the bytes it
received or copied out of the shared pool, a mismatch is a miss, and CHECK asks the server to
re-check those blocks itself and drop the ones that fail (it trusts its own hashing, not the
client's word). RESERVE says, per slot, whether the writer must *declare* its checksum: COMMIT
then publishes that block only if the slot holds exactly those bytes (else REJECTED).

The protocol's version is ``PROTOCOL_VERSION``, announced in the handshake (``service``
``store_protocol``); a client refuses a server that speaks another.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence

from kvferry.backends.base import Key, PutStatus
from kvferry.errors import ProtocolError
from kvferry.index.keys import KEY_BYTES

PROTOCOL_VERSION = 2
MISS = 0xFFFFFFFF
MAX_KEYS = 1 << 20
"""Most keys one call may carry."""
SUMS = 1
"""Reply flag: per-block checksums follow."""

U8 = struct.Struct("<B")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
LEASE_REGION = struct.Struct("<QI")
LOCATE_HEAD = struct.Struct("<QIB")
LOC = struct.Struct("<QI")
RES = struct.Struct("<BQB")

STATUS_CODE = {
    PutStatus.STORED: 0,
    PutStatus.EXISTS: 1,
    PutStatus.NO_SPACE: 2,
    PutStatus.REJECTED: 3,
}
CODE_STATUS = {v: k for k, v in STATUS_CODE.items()}


class Method(enum.IntEnum):
    LOOKUP = 1
    CONTAINS = 2
    GET = 3
    PUT = 4
    DELETE = 5
    LOCATE = 6
    RELEASE = 7
    RESERVE = 8
    COMMIT = 9
    STATS = 10
    KEYS = 11
    CHECK = 12


def encode_keys(keys: Sequence[Key]) -> bytes:
    for k in keys:
        if len(k) != KEY_BYTES:
            raise ValueError(f"a key must be {KEY_BYTES} bytes, got {len(k)}")
    return U32.pack(len(keys)) + b"".join(keys)


def decode_keys(buf: memoryview, pos: int = 0) -> tuple[list[Key], int]:
    """Keys at ``buf[pos:]``; returns them and the position after them."""
    if len(buf) - pos < 4:
        raise ProtocolError("payload too short for a key count")
    (n,) = U32.unpack_from(buf, pos)
    if n > MAX_KEYS:
        raise ProtocolError(f"{n} keys in one call; at most {MAX_KEYS}")
    pos += 4
    end = pos + n * KEY_BYTES
    if end > len(buf):
        raise ProtocolError(f"payload holds fewer than the {n} keys it announces")
    raw = bytes(buf[pos:end])
    return [raw[i : i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)], end


def decode_u32s(buf: memoryview, pos: int, n: int, what: str) -> tuple[list[int], int]:
    end = pos + 4 * n
    if end > len(buf):
        raise ProtocolError(f"payload too short for {n} {what}")
    return list(struct.unpack_from(f"<{n}I", buf, pos)), end


def encode_u32s(values: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def decode_u64s(buf: memoryview, pos: int, n: int, what: str) -> tuple[list[int], int]:
    end = pos + 8 * n
    if end > len(buf):
        raise ProtocolError(f"payload too short for {n} {what}")
    return list(struct.unpack_from(f"<{n}Q", buf, pos)), end


def encode_u64s(values: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


def encode_checks(sums: Sequence[int | None]) -> bytes:
    """Checks: n x u8 (1 = check this block) then n x u64 checksums (0 where unchecked)."""
    return bytes(s is not None for s in sums) + encode_u64s([s or 0 for s in sums])


def decode_checks(buf: memoryview, pos: int, n: int) -> tuple[list[int | None], int]:
    end = pos + 9 * n
    if end > len(buf):
        raise ProtocolError(f"payload too short for {n} checks")
    flags = bytes(buf[pos : pos + n])
    sums = struct.unpack_from(f"<{n}Q", buf, pos + n)
    return [s if f else None for f, s in zip(flags, sums)], end


def encode_statuses(status: Sequence[PutStatus]) -> bytes:
    return bytes(STATUS_CODE[s] for s in status)


def decode_statuses(buf: bytes | bytearray | memoryview, n: int) -> list[PutStatus]:
    if len(buf) != n:
        raise ProtocolError(f"expected {n} status codes, got {len(buf)} bytes")
    try:
        return [CODE_STATUS[c] for c in bytes(buf)]
    except KeyError as e:
        raise ProtocolError(f"unknown put status code {e}") from None


def expect_end(buf: memoryview, pos: int) -> None:
    if pos != len(buf):
        raise ProtocolError(f"{len(buf) - pos} unexpected bytes at the end of the payload")
