"""Reference measurements taken in the same run as a benchmark, so results read as ratios.

``socket_stream``: a plain Python TCP stream of fixed-size messages over loopback between two
processes (sendall from / recv_into preallocated buffers): the practical limit of the wire for
Python code on this machine. ``memcpy``: numpy copies between two touched buffers: the limit of
a same-host shared-memory transfer.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from multiprocessing.connection import Connection

import numpy as np

__all__ = ["memcpy", "socket_stream"]


def _receiver(port_out: Connection, message_size: int) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port_out.send(server.getsockname()[1])
    conn, _ = server.accept()
    buf = bytearray(message_size)
    view = memoryview(buf)
    total = 0
    first = 0.0
    while True:
        k = conn.recv_into(view)
        if k == 0:
            break
        if not total:
            first = time.perf_counter()
        total += k
    port_out.send((total, time.perf_counter() - first))
    conn.close()
    server.close()


def socket_stream(message_size: int = 1 << 20, duration: float = 2.0) -> dict[str, float]:
    """GB/s of a loopback TCP stream of ``message_size`` messages between two processes."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child, message_size), daemon=True)
    proc.start()
    try:
        port = parent.recv()
        sock = socket.create_connection(("127.0.0.1", port))
        payload = memoryview(np.ones(message_size, dtype=np.uint8).data)
        deadline = time.perf_counter() + duration
        sent = 0
        while time.perf_counter() < deadline:
            sock.sendall(payload)
            sent += message_size
        sock.close()
        total, seconds = parent.recv()
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    return {
        "message_size": message_size,
        "bytes": total,
        "seconds": seconds,
        "gbps": total / 1e9 / seconds if seconds else 0.0,
    }


def memcpy(size: int = 16 << 20, duration: float = 1.0) -> dict[str, float]:
    """GB/s of copying ``size`` bytes between two touched buffers in this process."""
    src = np.ones(size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    np.copyto(dst, src)  # touch
    n = 0
    start = time.perf_counter()
    while True:
        np.copyto(dst, src)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= duration:
            break
    return {"size": size, "copies": n, "seconds": elapsed, "gbps": size * n / 1e9 / elapsed}
