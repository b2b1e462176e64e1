"""RSS a store server gains from two cheap requests (issue 20, item 3): a GET of 20,000 absent
keys with 64 KiB slots, and 16 connections that announce a 64 MiB CALL and send 100 bytes of it.

Run it from the checkout to measure, with that checkout first on the path (``python -m`` takes
the working directory first):

    cd <checkout> && PYTHONPATH=$PWD python benchmarks/server_memory_attacks.py
"""

from __future__ import annotations

import subprocess
import sys
import time

from kvferry.backends.server import protocol as p
from kvferry.testing.tier_kit import key
from kvferry.transfer import handshake, wire


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    cmd = [sys.executable, "-m", "kvferry", "serve", "store", "--port", "0", "--quiet"]
    cmd += ["--tiers", "cpu", "--capacity", "8MiB", "--slot-size", "64KiB"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    try:
        host, port = proc.stdout.readline().split()[1].rsplit(":", 1)
        address = (host, int(port))
        before = rss_mib(proc.pid)
        sock, _ = handshake.connect(address, token=None, timeout=5)
        payload = p.encode_keys([key(i, 48) for i in range(20_000)])
        head = wire.encode(wire.Op.CALL, region=p.Method.GET, req_id=1, length=len(payload))
        sock.sendall(head + payload)
        reply = wire.decode(
            handshake.recv_exact(sock, wire.HEADER_SIZE), reply=True, max_length=1 << 30
        )
        handshake.recv_exact(sock, reply.length)
        print(f"GET of 20,000 absent keys: +{rss_mib(proc.pid) - before:.1f} MiB RSS")
        before = rss_mib(proc.pid)
        stalled = []
        for _ in range(16):
            s, _ = handshake.connect(address, token=None, timeout=5)
            s.sendall(wire.encode(wire.Op.CALL, region=p.Method.PUT, req_id=1, length=64 << 20))
            s.sendall(b"x" * 100)
            stalled.append(s)
        time.sleep(1)
        print(f"16 stalled 64 MiB CALL headers: +{rss_mib(proc.pid) - before:.1f} MiB RSS")
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
