"""``kvferry serve mock`` in its own process, and small standard-library HTTP clients for it.

:class:`MockServerProcess` starts ``python -m kvferry serve mock --port 0 --quiet ...``, waits
for its ``kvferry-mock-ready HOST:PORT`` line and offers plain-HTTP helpers (JSON requests,
streamed completions, a /kv/events reader), so router and endpoint-bench tests can run many
simulated workers without importing aiohttp or the engine in the test process. The process's
stderr goes to a temporary file (``stderr()``), never to a pipe nobody drains.

``KVFERRY_*`` variables of the calling environment are dropped by default, so a stray
``KVFERRY_MOCK_PORT`` cannot change a test's server; pass ``env`` to choose. This module owns
launching and talking to a mock server; it asserts nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any, ClassVar, Self

from kvferry.testing.ready import read_ready_line, reap

__all__ = ["KvEventReader", "MockServerProcess", "Reply"]

READY = "kvferry-mock-ready"


@dataclass(frozen=True)
class Reply:
    """An HTTP reply: status and the decoded JSON body (None when the body is not JSON)."""

    status: int
    body: Any
    text: str


@dataclass
class MockServerProcess:
    """A running ``kvferry serve mock`` process on 127.0.0.1.

    Attributes:
        host, port: where it serves.
        token: the auth token it was started with (sent by the helpers), or None.
    """

    SERVE_KIND: ClassVar[str] = "mock"
    """The ``kvferry serve`` subcommand :meth:`start` runs (a subclass names its own)."""
    READY: ClassVar[str] = READY

    host: str
    port: int
    token: str | None
    proc: subprocess.Popen[bytes] = field(repr=False)
    log: IO[bytes] = field(repr=False)

    @classmethod
    def start(
        cls,
        *args: str,
        token: str | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
    ) -> Self:
        """Launch ``kvferry serve <SERVE_KIND> --port 0 --quiet *args`` and wait for its ready
        line.

        Args:
            args: more ``serve mock`` flags (``"--num-blocks", "64"``, ``"--set", "k=v"``).
            token: passed as ``--auth-token`` and sent by the helpers.
            env: the child's environment; the caller's minus ``KVFERRY_*`` if None.
            startup_timeout: seconds to wait for the ready line.

        Raises:
            RuntimeError: the server exited or did not print its ready line in time; the
                message has its stderr.
        """
        argv = [sys.executable, "-m", "kvferry", "serve", cls.SERVE_KIND, "--port", "0", "--quiet"]
        if token is not None:
            argv += ["--auth-token", token]
        argv += list(args)
        if env is None:
            env = {k: v for k, v in os.environ.items() if not k.startswith("KVFERRY_")}
        log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=dict(env)
        )
        try:
            what = f"kvferry serve {cls.SERVE_KIND}"
            line = read_ready_line(proc, startup_timeout, log, what, cls.READY)
        except BaseException:
            reap(proc)
            log.close()
            raise
        host, _, port = line.split()[1].rpartition(":")
        return cls(host=host, port=int(port), token=token, proc=proc, log=log)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        """What the server logged so far."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    # --- HTTP helpers ---

    def _headers(self, token: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        token = self.token if token is None else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        raw: bytes | None = None,
        token: str | None = None,
        timeout: float = 60.0,
    ) -> Reply:
        """One HTTP request; error statuses are returned, not raised.

        Args:
            body: JSON-encoded as the request body unless None.
            raw: the exact request body bytes (wins over ``body``).
            token: the bearer token to send; this server's if None, none if "".
        """
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers=self._headers(token)
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, payload = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
            e.close()
        text = payload.decode(errors="replace")
        try:
            decoded: Any = json.loads(text)
        except ValueError:
            decoded = None
        return Reply(status, decoded, text)

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: object, **kwargs: Any) -> Reply:
        return self.request("POST", path, body, **kwargs)

    def stream(
        self, path: str, body: Mapping[str, object], *, token: str | None = None
    ) -> list[Any]:
        """POST a streaming request and return its SSE ``data:`` payloads in order: decoded
        JSON objects, and the string ``"[DONE]"`` for the end marker.

        Raises:
            urllib.error.HTTPError: the server answered with an error status.
        """
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps({**body, "stream": True}).encode(),
            method="POST",
            headers=self._headers(token),
        )
        out: list[Any] = []
        with urllib.request.urlopen(req, timeout=60) as r:
            for raw in r:
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: ") :]
                out.append("[DONE]" if payload == "[DONE]" else json.loads(payload))
        return out

    def complete(self, prompt: str | Sequence[int], max_tokens: int = 1, **extra: Any) -> Any:
        """A non-streaming /v1/completions request; returns the response JSON.

        Raises:
            RuntimeError: the server answered with an error status.
        """
        body = {"prompt": prompt if isinstance(prompt, str) else list(prompt), **extra}
        body["max_tokens"] = max_tokens
        reply = self.post("/v1/completions", body)
        if reply.status != 200:
            raise RuntimeError(f"completion failed with {reply.status}: {reply.text}")
        return reply.body

    def kv_stats(self) -> dict[str, Any]:
        """``GET /kv/stats``."""
        reply = self.get("/kv/stats")
        if reply.status != 200:
            raise RuntimeError(f"/kv/stats failed with {reply.status}: {reply.text}")
        stats: dict[str, Any] = reply.body
        return stats

    def metrics(self) -> dict[str, float]:
        """``GET /metrics`` as ``{"name{labels}": value}`` (comments dropped)."""
        reply = self.get("/metrics")
        out: dict[str, float] = {}
        for line in reply.text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def events(self, since: int | None = None, *, timeout: float = 10.0) -> KvEventReader:
        """Subscribe to ``/kv/events`` (a snapshot first, or the events after ``since``)."""
        path = "/kv/events" if since is None else f"/kv/events?since={since}"
        return KvEventReader(self.host, self.port, path, token=self.token, timeout=timeout)

    # --- ending ---

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait for a clean exit, and return the exit status (SIGKILL after
        ``timeout``)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                reap(self.proc)
        rc = self.proc.wait()
        self._close_files()
        return rc

    def kill(self) -> None:
        """SIGKILL and reap; idempotent."""
        reap(self.proc)
        self._close_files()

    def _close_files(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()

    def __enter__(self) -> MockServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


class KvEventReader:
    """A ``/kv/events`` subscription read over a plain socket (HTTP/1.0, so the body is the raw
    SSE stream): :meth:`next` returns the next event's JSON.

    Raises:
        RuntimeError: the server refused the subscription (the message has its reply).
    """

    def __init__(
        self, host: str, port: int, path: str, *, token: str | None, timeout: float
    ) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = b""
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        request = f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n{auth}\r\n"
        self._sock.sendall(request.encode())
        head = self._read_until(b"\r\n\r\n", timeout)
        status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if " 200 " not in status_line + " ":
            rest = self._buf.decode(errors="replace")
            self.close()
            raise RuntimeError(f"/kv/events refused: {status_line} {rest}")

    def _read_until(self, marker: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {marker!r} from /kv/events within {timeout:g}s")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise EOFError("the /kv/events stream ended")
            self._buf += chunk
        head, _, self._buf = self._buf.partition(marker)
        return head

    def next(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next event's JSON object (keepalive comments skipped).

        Raises:
            TimeoutError: none arrived within ``timeout`` (nothing is lost: call again).
            EOFError: the server ended the stream.
        """
        deadline = time.monotonic() + timeout
        while True:
            message = self._read_until(b"\n\n", max(0.0, deadline - time.monotonic()))
            for line in message.decode().split("\n"):
                if line.startswith("data: "):
                    event: dict[str, Any] = json.loads(line[len("data: ") :])
                    return event

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> KvEventReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
