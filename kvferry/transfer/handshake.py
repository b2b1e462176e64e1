"""The p2p handshake: connect to a target, present the token, learn its regions.

Used by the engine to open a segment and by the tcp transport for every connection it makes.
"""

from __future__ import annotations

import socket
from typing import Any

from kvferry.errors import AuthError, PeerClosed, ProtocolError
from kvferry.transfer import wire
from kvferry.transfer.segment import PeerInfo, RegionInfo


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Read exactly n bytes from a blocking socket.

    Raises:
        PeerClosed: the peer closed the connection first.
    """
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise PeerClosed(f"peer closed the connection after {got} of {n} bytes")
        got += k
    return buf


def hello_document(token: str | None) -> dict[str, Any]:
    return {"version": wire.WIRE_VERSION, "token": token or ""}


def connect(
    address: tuple[str, int], *, token: str | None, timeout: float, name: str | None = None
) -> tuple[socket.socket, PeerInfo]:
    """Open a TCP connection to a target and complete the handshake.

    Returns:
        The connected blocking socket (TCP_NODELAY set) and the target's description.

    Raises:
        PeerClosed: the target cannot be reached or hung up.
        AuthError: the target refused our token.
        ProtocolError: the target answered something that is not a kvferry handshake.
    """
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as e:
        raise PeerClosed(f"cannot connect to {address[0]}:{address[1]}: {e}") from e
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = wire.encode_json(hello_document(token))
        sock.sendall(wire.encode(wire.Op.HELLO, length=len(payload)) + payload)
        header = wire.decode(
            recv_exact(sock, wire.HEADER_SIZE), reply=True, max_length=wire.MAX_HELLO_BYTES
        )
        body = recv_exact(sock, header.length)
        if header.op is wire.Op.ERR:
            message = bytes(body).decode(errors="replace")
            if "token" in message:
                raise AuthError(f"{address[0]}:{address[1]} refused the handshake: {message}")
            raise ProtocolError(f"{address[0]}:{address[1]} refused the handshake: {message}")
        peer = parse_peer(wire.decode_json(body), address, name)
        sock.settimeout(None)
        return sock, peer
    except (OSError, TimeoutError) as e:
        sock.close()
        raise PeerClosed(f"handshake with {address[0]}:{address[1]} failed: {e}") from e
    except BaseException:
        sock.close()
        raise


def parse_peer(doc: dict[str, Any], address: tuple[str, int], name: str | None) -> PeerInfo:
    """Validate a target's handshake reply.

    Raises:
        ProtocolError: a field is missing or malformed.
    """
    try:
        version = doc["version"]
        regions = doc["regions"]
        instance, boot_id, pid = doc["instance"], doc["boot_id"], doc["pid"]
    except KeyError as e:
        raise ProtocolError(f"handshake reply lacks {e}") from e
    if version != wire.WIRE_VERSION:
        raise ProtocolError(f"target speaks wire version {version}, we speak {wire.WIRE_VERSION}")
    if not isinstance(regions, list) or not isinstance(pid, int):
        raise ProtocolError("handshake reply has malformed regions or pid")
    ops = doc.get("ops", [])
    if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
        raise ProtocolError(f"handshake reply has malformed ops {ops!r}")
    max_frame = doc.get("max_frame")
    if max_frame is not None and (
        not isinstance(max_frame, int) or isinstance(max_frame, bool) or max_frame < 4096
    ):
        raise ProtocolError(f"handshake reply has a malformed max_frame {max_frame!r}")
    service = doc.get("service", {})
    if not isinstance(service, dict):
        raise ProtocolError(f"handshake reply has a malformed service {service!r}")
    return PeerInfo(
        name=name or f"{address[0]}:{address[1]}",
        address=address,
        instance=str(instance),
        boot_id=str(boot_id),
        pid=pid,
        regions=tuple(RegionInfo.from_json(r) for r in regions),
        ops=frozenset(ops),
        max_frame=max_frame,
        service=service,
    )
