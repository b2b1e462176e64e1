"""What every kvferry HTTP server (``serve mock``, ``serve router``) does about slow, huge and
malformed clients (:mod:`kvferry.serving.http_front`), for real: server processes on free ports,
attacked over real sockets.

Each test runs against both servers (the router in front of one mock worker). The servers are
started with short limits (header deadline 3 s, idle timeout 4 s, body timeout 1 s, at most 8
waiting connections per address); bounds on how long something took are the only timing
asserted.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from kvferry.testing.mock_engine import MockServerProcess
from kvferry.testing.ready import wait_for
from kvferry.testing.router_process import RouterProcess
from kvferry.testing.slowloris import Trickle

TOKEN = "front-secret"
HEADER_TIMEOUT = 3.0
IDLE_TIMEOUT = 4.0
PER_ADDRESS = 8


def limits(section: str) -> list[str]:
    flags = []
    for key, value in (
        ("header_timeout", HEADER_TIMEOUT),
        ("idle_timeout", IDLE_TIMEOUT),  # aiohttp's clock from connecting, too: over 3 s
        ("body_timeout", 1),
        ("max_pending_connections", 24),
        ("max_pending_per_address", PER_ADDRESS),
        ("max_body_size", "64KiB"),
        ("max_prompt_chars", 1000),
    ):
        flags += ["--set", f"{section}.{key}={value}"]
    return flags


@pytest.fixture(scope="module", params=["mock", "router"])
def front(request: pytest.FixtureRequest) -> Iterator[MockServerProcess]:
    """A mock server, or a router over one, each with a token and the short limits."""
    with MockServerProcess.start("--speedup-ratio", "1000", *limits("mock"), token=TOKEN) as worker:
        if request.param == "mock":
            yield worker
            return
        with RouterProcess.over(
            [worker], "--worker-auth-token", TOKEN, *limits("router"), token=TOKEN
        ) as router:
            yield router


def kind(front: MockServerProcess) -> str:
    return "router" if isinstance(front, RouterProcess) else "mock"


def read_response(sock: socket.socket) -> bytes:
    """One HTTP response (headers and a Content-Length body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed mid-response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


# --- slow clients ----------------------------------------------------------------------------


def test_trickling_clients_neither_lock_out_a_good_one_nor_stay(front: MockServerProcess) -> None:
    """40 connections from two addresses each trickle a header byte every 0.2 s: the good client
    (with the token) is served throughout, each address soon holds at most 8 waiting
    connections (the longest waiting go first), and the rest are closed at the deadline."""
    with (
        Trickle(front.host, front.port, 20, source="127.0.0.1") as a,
        Trickle(front.host, front.port, 20, source="127.0.0.2") as b,
    ):
        assert front.get("/v1/models").status == 200
        wait_for(
            lambda: a.open() <= PER_ADDRESS and b.open() <= PER_ADDRESS,
            f"each address holds at most {PER_ADDRESS} waiting connections",
            timeout=HEADER_TIMEOUT - 0.5,
        )
        assert front.get("/v1/models").status == 200
        assert a.open() + b.open() >= PER_ADDRESS  # the bound closed them, not the deadline
        assert a.wait_closed(HEADER_TIMEOUT + 2) and b.wait_closed(2)
        assert max([*a.closed.values(), *b.closed.values()]) < HEADER_TIMEOUT + 1.5
    closed = front.metrics()
    name = f"kvferry_{kind(front)}_http_connections_closed_total"
    evicted = closed[f'{name}{{reason="too_many_waiting"}}']
    timed_out = closed[f'{name}{{reason="header_timeout"}}']
    assert evicted >= 2 * (20 - PER_ADDRESS) and evicted + timed_out == 40


def test_idle_keep_alive_connections_are_closed(front: MockServerProcess) -> None:
    with socket.create_connection((front.host, front.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        s.settimeout(IDLE_TIMEOUT + 5)
        assert s.recv(100) == b""  # closed by the server after idle_timeout
        assert time.monotonic() - start < IDLE_TIMEOUT + 2


def test_a_body_slower_than_body_timeout_gets_408(front: MockServerProcess) -> None:
    with socket.create_connection((front.host, front.port), timeout=5) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 100\r\n\r\n{"
        )
        reply = read_response(s)
    assert reply.startswith(b"HTTP/1.1 408")
    message = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["message"]
    assert f"{kind(front)}.body_timeout" in message


# --- bad clients -----------------------------------------------------------------------------


def test_malformed_http_is_a_400_and_one_log_line_never_a_traceback(
    front: MockServerProcess,
) -> None:
    for garbage in (b"GARBAGE\x00 / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"):
        for _ in range(15):
            with socket.create_connection((front.host, front.port), timeout=5) as s:
                s.sendall(garbage)
                assert s.recv(100).startswith(b"HTTP/1.0 400")
    assert front.get("/health").status == 200
    err = front.stderr()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "malformed HTTP request" in line]
    assert 1 <= len(lines) <= 2, err  # one line per minute, the rest counted
    metrics = front.metrics()
    assert (
        metrics[f'kvferry_{kind(front)}_http_responses_total{{path="malformed",status="400"}}']
        == 30
    )


def test_bodies_and_prompts_over_the_limits_name_the_key(front: MockServerProcess) -> None:
    section = kind(front)
    big = json.dumps({"prompt": "a " * 40_000}).encode()
    reply = front.request("POST", "/v1/completions", raw=big)
    assert reply.status == 413
    assert f"{section}.max_body_size" in reply.body["error"]["message"]
    reply = front.post("/v1/completions", {"prompt": "ab " * 400, "max_tokens": 1})
    assert reply.status == 400
    assert f"{section}.max_prompt_chars" in reply.body["error"]["message"]
    messages = [{"role": "user", "content": "x" * 600}, {"role": "user", "content": "y" * 600}]
    reply = front.post("/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    assert reply.status == 400
    assert f"{section}.max_prompt_chars" in reply.body["error"]["message"]
    assert front.post("/v1/completions", {"prompt": "ab " * 300, "max_tokens": 1}).status == 200


def test_json_nested_too_deeply_is_a_400(front: MockServerProcess) -> None:
    for raw in (b"[" * 50_000, b'{"a": ' * 10_000):
        reply = front.request("POST", "/v1/completions", raw=raw)
        assert reply.status == 400, reply.text
        assert "nested too deeply" in reply.body["error"]["message"]
    assert "Traceback" not in front.stderr()
