"""A zero-delay OpenAI-compatible streaming server, to measure what a benchmark client costs.

``python -m kvferry.testing.zero_server --port 0 [--processes N]`` answers
``POST /v1/completions`` and ``POST /v1/chat/completions`` at once with ``max_tokens`` (or
``max_completion_tokens``, default 16) one-word tokens, streamed as SSE when ``stream`` is true
(all chunks in one write, then the usage chunk when ``stream_options.include_usage``, then
``data: [DONE]``), and ``GET /v1/models`` / ``GET /health``. Usage counts one token per
whitespace-separated prompt word, like ``kvferry serve mock``'s word tokenizer. It prints
``kvferry-zero-ready HOST:PORT`` once it accepts connections and serves until SIGTERM/SIGINT.

It is a raw ``asyncio.Protocol`` HTTP/1.1 server (keep-alive, Content-Length bodies, no
chunked requests), so it costs a few microseconds per request and any time a client measures
against it is the client's and the kernel's. ``--processes N`` forks N servers sharing one
listening socket. Not for anything but benchmarks and tests: it validates almost nothing.
:class:`ZeroServerProcess` starts one from Python.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any, cast

from kvferry.testing.ready import read_ready_line, reap

__all__ = ["READY", "ZeroServerProcess", "main"]

READY = "kvferry-zero-ready"
MODEL = "kvferry-zero"


def _chunk(chat: bool, text: str, finish: str | None) -> bytes:
    obj: dict[str, Any]
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        obj = {"id": "chatcmpl-0", "object": "chat.completion.chunk", "model": MODEL}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        obj = {"id": "cmpl-0", "object": "text_completion", "model": MODEL}
    obj["choices"] = [choice]
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


_TOKEN = {chat: _chunk(chat, " tok", None) for chat in (False, True)}
_LAST = {chat: _chunk(chat, " tok", "length") for chat in (False, True)}


def _response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _answer(method: str, path: str, body: bytes) -> bytes:
    if method == "GET" and path in ("/v1/models", "/health"):
        payload = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
        return _response("200 OK", json.dumps(payload).encode())
    chat = path == "/v1/chat/completions"
    if method != "POST" or not (chat or path == "/v1/completions"):
        return _response("404 Not Found", b'{"error":{"message":"not found","code":404}}')
    try:
        request = json.loads(body)
        n = int(request.get("max_completion_tokens") or request.get("max_tokens") or 16)
        if chat:
            prompt = " ".join(str(m.get("content", "")) for m in request["messages"])
        else:
            prompt = str(request["prompt"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        message = json.dumps({"error": {"message": f"bad request: {e}", "code": 400}})
        return _response("400 Bad Request", message.encode())
    n = max(1, n)
    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n}
    usage["total_tokens"] = usage["prompt_tokens"] + n
    if not request.get("stream"):
        text = " tok" * n
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        choice.update(
            {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        )
        whole: dict[str, Any] = {"id": "cmpl-0", "model": MODEL, "choices": [choice]}
        whole["usage"] = usage
        return _response("200 OK", json.dumps(whole).encode())
    parts = [_TOKEN[chat]] * (n - 1) + [_LAST[chat]]
    options = request.get("stream_options") or {}
    if isinstance(options, dict) and options.get("include_usage"):
        obj = {"id": "cmpl-0", "model": MODEL, "choices": [], "usage": usage}
        parts.append(b"data: " + json.dumps(obj).encode() + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    return _response("200 OK", b"".join(parts), "text/event-stream")


class _Http(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; requests are answered in order as they complete."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buf[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
            if len(self.buf) < end + 4 + length:
                break
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            method, path, *_ = head[0].split(" ")
            out.append(_answer(method, path.split("?")[0], body))
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def _serve(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(_Http, sock=sock)
    async with server:
        await stop.wait()


def _run(sock: socket.socket) -> None:
    try:
        runner = asyncio.Runner(loop_factory=importlib.import_module("uvloop").new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(_serve(sock))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvferry.testing.zero_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1, help="servers sharing the socket")
    args = parser.parse_args(argv)
    sock = socket.create_server((args.host, args.port), backlog=4096)
    sock.setblocking(False)
    children: list[int] = []
    for _ in range(max(1, args.processes) - 1):
        pid = os.fork()
        if pid == 0:
            _run(sock)
            os._exit(0)
        children.append(pid)
    host, port = sock.getsockname()[:2]
    print(f"{READY} {host}:{port}", flush=True)
    try:
        _run(sock)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return 0


@dataclass
class ZeroServerProcess:
    """A running zero-delay server (``python -m kvferry.testing.zero_server``)."""

    host: str
    port: int
    proc: subprocess.Popen[bytes] = field(repr=False)
    log: IO[bytes] = field(repr=False)

    @classmethod
    def start(cls, processes: int = 1, timeout: float = 30.0) -> ZeroServerProcess:
        """Start it on a free port and wait for its ready line.

        Raises:
            RuntimeError: it exited or did not become ready in time (the message has its
                stderr).
        """
        import tempfile

        argv = [sys.executable, "-m", "kvferry.testing.zero_server", "--port", "0"]
        argv += ["--processes", str(processes)]
        log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        try:
            line = read_ready_line(proc, timeout, log, "the zero server", READY)
        except BaseException:
            reap(proc)
            log.close()
            raise
        host, _, port = line.split()[1].rpartition(":")
        return cls(host=host, port=int(port), proc=proc, log=log)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                reap(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()

    def __enter__(self) -> ZeroServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
