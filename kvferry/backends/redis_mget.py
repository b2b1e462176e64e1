"""A reader for one ``MGET`` reply, straight off a Redis connection's socket into the caller's
buffers: the redis tier's batch-get fast path.

Owns the RESP2/RESP3 parsing of the reply to ``MGET`` (an array of bulk strings or nils, or an
error reply) and nothing else: no connection handling, no commands, no Redis client. redis-py
with hiredis would copy each value three times (socket buffer -> hiredis -> ``bytes`` -> the
caller's buffer); this reads a value's bytes once, into its buffer, except for what arrives in
the same ``recv`` as a header (:data:`SCRATCH_BYTES` of scratch per thread).

:class:`~kvferry.backends.redis.RedisTier` uses it on a single Redis (not a cluster) and turns
its two exceptions into StorageError: :class:`ErrorReply` (the stream is still in sync) and
:class:`ReplyFormatError` (the stream is lost; the connection must be dropped).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

__all__ = [
    "DIRECT_MIN",
    "HEADER_READ",
    "MAX_LINE",
    "SCRATCH_BYTES",
    "ErrorReply",
    "MgetReader",
    "ReplyFormatError",
]

# Direct MGET reads: a scratch buffer for reply headers and small values; a value remainder of
# at least DIRECT_MIN bytes is received straight into the caller's buffer. After such a value the
# next header is read in HEADER_READ-byte gulps, so that little of the next value lands in the
# scratch buffer (where it would cost a copy).
SCRATCH_BYTES = 256 * 1024
DIRECT_MIN = 16 * 1024
HEADER_READ = 64
MAX_LINE = 4096  # a header or error line longer than this is not an MGET reply


class ReplyFormatError(Exception):
    """The server's reply did not parse as the RESP answer to MGET (the stream is lost)."""


class ErrorReply(Exception):
    """The server answered with an error reply (the stream is still in sync)."""


class MgetReader:
    """Parses one RESP2/RESP3 ``MGET`` reply from a socket into the callers' buffers.

    Each value is received into its buffer by ``recv_into`` (by ``recvmsg_into`` with a small
    scratch tail where the socket has it, so that the next value's header arrives in the same
    call), so the bytes are copied once, by the kernel. One per call; ``scratch`` (at least
    ``2 * MAX_LINE`` bytes) is the calling thread's own.
    """

    def __init__(self, sock: socket.socket, scratch: bytearray) -> None:
        self.sock = sock
        self.buf = scratch
        self.view = memoryview(scratch)
        self.pos = 0
        self.end = 0
        # recvmsg_into on plain TCP/unix sockets only (an SSL socket has no scatter read)
        self.scatter = type(sock) is socket.socket
        self.large = False  # the last value was large: read the next header in small gulps

    def _fill(self, limit: int) -> None:
        """Receive at most ``limit`` more bytes into the scratch buffer."""
        if self.pos == self.end:
            self.pos = self.end = 0
        elif self.end + limit > len(self.buf):
            kept = self.end - self.pos
            self.buf[:kept] = self.view[self.pos : self.end]
            self.pos, self.end = 0, kept
        limit = min(limit, len(self.buf) - self.end)
        n = self.sock.recv_into(self.view[self.end : self.end + limit])
        if n == 0:
            raise ConnectionResetError("the server closed the connection mid-reply")
        self.end += n

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.pos, self.end)
            if i >= 0:
                out = bytes(self.view[self.pos : i])
                self.pos = i + 2
                return out
            if self.end - self.pos > MAX_LINE:
                raise ReplyFormatError("reply header line too long")
            self._fill(HEADER_READ if self.large else len(self.buf))

    def payload(self, out: memoryview | None, n: int) -> None:
        """Read an ``n``-byte bulk payload and its CRLF into ``out[:n]`` (None: discard it)."""
        big = n >= DIRECT_MIN
        have = min(self.end - self.pos, n)
        if out is not None:
            out[:have] = self.view[self.pos : self.pos + have]
        self.pos += have
        got = have
        while got < n:
            rest = n - got
            if out is not None and rest >= DIRECT_MIN:
                # the scratch buffer is empty here: everything in it went into out
                if self.scatter:
                    self.pos = self.end = 0
                    k = self.sock.recvmsg_into([out[got:n], self.view[:HEADER_READ]])[0]
                    if k > rest:
                        self.end = k - rest
                else:
                    k = self.sock.recv_into(out[got:n])
                if k == 0:
                    raise ConnectionResetError("the server closed the connection mid-reply")
                got += min(k, rest)
            else:
                # the tail of a big value: take no more than it, the next value may be big
                self._fill(rest + 2 if big else len(self.buf))
                take = min(self.end - self.pos, rest)
                if out is not None:
                    out[got : got + take] = self.view[self.pos : self.pos + take]
                self.pos += take
                got += take
        self.large = big
        while self.end - self.pos < 2:
            self._fill(HEADER_READ)
        if self.buf[self.pos : self.pos + 2] != b"\r\n":
            raise ReplyFormatError("bulk string not followed by CRLF")
        self.pos += 2

    def read(
        self, outs: Sequence[memoryview], limit: int
    ) -> tuple[list[int | None], list[int], int]:
        """Read the reply; returns the sizes, the indexes whose buffer was too small, and how
        many values were larger than ``limit`` (not blocks: read as misses). Refused values are
        drained and dropped, so the connection stays usable."""
        head = self.line()
        if head[:1] == b"-":
            raise ErrorReply(head[1:].decode(errors="replace"))
        if head[:1] != b"*" or head[1:] != str(len(outs)).encode():
            raise ReplyFormatError(f"expected an array of {len(outs)}, got {head[:32]!r}")
        sizes: list[int | None] = []
        too_small: list[int] = []
        foreign = 0
        for i, out in enumerate(outs):
            h = self.line()
            if h[:1] == b"_" or h == b"$-1":  # RESP3 null, RESP2 null bulk
                sizes.append(None)
                continue
            if h[:1] != b"$":
                raise ReplyFormatError(f"expected a bulk string, got {h[:32]!r}")
            try:
                n = int(h[1:])
            except ValueError as e:
                raise ReplyFormatError(f"bad bulk length {h[:32]!r}") from e
            if n < 0:
                raise ReplyFormatError(f"bad bulk length {h[:32]!r}")
            if n > limit:
                foreign += 1
                self.payload(None, n)
                sizes.append(None)
                continue
            if n > out.nbytes:
                too_small.append(i)
                self.payload(None, n)
            else:
                self.payload(out, n)
            sizes.append(n)
        return sizes, too_small, foreign
