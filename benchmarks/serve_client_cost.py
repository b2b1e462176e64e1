"""Client cost of ``kvferry bench serve``: requests/s it sustains and the TTFT it adds.

Against ``kvferry.testing.zero_server`` (answers at once): requests/s at concurrency 64 with 1
and 2 client processes, and at concurrency 1 the TTFT p50/p99 next to a blocking-socket client
that sends the same bytes on one keep-alive connection (the floor); then against
``kvferry serve mock --speedup-ratio 1000``.

    .venv/bin/python benchmarks/serve_client_cost.py
"""

from __future__ import annotations

import json
import socket
import statistics
import time

from kvferry.bench.endpoint.harness import ServeBenchOptions, run
from kvferry.testing.mock_engine import MockServerProcess
from kvferry.testing.zero_server import ZeroServerProcess

ISL, OSL = 16, 4


def ours(url: str, concurrency: int, count: int, workers: int) -> tuple[float, float, float]:
    options = ServeBenchOptions(
        url=url,
        concurrency=(concurrency,),
        request_count=count,
        warmup_requests=200,
        isl=ISL,
        osl=OSL,
        workers=workers,
    )
    m = run(options).cases[0].metrics
    assert m.error_count == 0, m.errors
    return (
        m.value("request_throughput") or 0.0,
        m.value("time_to_first_token", "p50") or 0.0,
        m.value("time_to_first_token", "p99") or 0.0,
    )


def raw_socket_ttft(host: str, port: int, n: int) -> tuple[float, float]:
    body = json.dumps(
        {
            "model": "kvferry-zero",
            "prompt": " ".join(["w"] * ISL),
            "max_tokens": OSL,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    request = head.encode() + body
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    for i in range(n + 200):
        t0 = time.monotonic_ns()
        s.sendall(request)
        first = None
        buf = b""
        while b"data: [DONE]\n\n" not in buf:
            data = s.recv(65536)
            if first is None and b'"text"' in data:
                first = time.monotonic_ns()
            buf += data
        if i >= 200 and first is not None:
            out.append((first - t0) / 1e6)
    out.sort()
    return statistics.median(out), out[int(0.99 * (len(out) - 1))]


def main() -> None:
    rows: list[tuple[str, float, float, float]] = []
    with ZeroServerProcess.start(processes=1) as z:
        raw50, raw99 = raw_socket_ttft(z.host, z.port, 3000)
        rows.append(("zero server, c=1, 1 worker", *ours(z.url, 1, 3000, 1)))
        rows.append(("raw blocking socket, c=1", float("nan"), raw50, raw99))
        for w in (1, 2):
            rows.append((f"zero server, c=64, {w} worker(s)", *ours(z.url, 64, 30000, w)))
    with MockServerProcess.start("--speedup-ratio", "1000") as mock:
        for w in (1, 2):
            rows.append((f"serve mock x1000, c=64, {w} worker(s)", *ours(mock.url, 64, 10000, w)))
    print(f"{'case':44} {'req/s':>9} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12}")
    for name, rps, p50, p99 in rows:
        print(f"{name:44} {rps:9.0f} {p50:12.3f} {p99:12.3f}")
    print(f"TTFT added by the client at c=1 (p50): {rows[0][2] - raw50:.3f} ms")


if __name__ == "__main__":
    main()
