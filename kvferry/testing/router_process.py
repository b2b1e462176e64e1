"""``kvferry serve router`` in its own process, for tests and the router benchmark.

:class:`RouterProcess` starts ``python -m kvferry serve router --port 0 --quiet ...``, waits
for its ``kvferry-router-ready HOST:PORT`` line, and offers the plain-HTTP helpers of
:class:`~kvferry.testing.mock_engine.MockServerProcess` (JSON requests, streamed completions,
``/metrics``), plus :meth:`~RouterProcess.stats` and :meth:`~RouterProcess.routed`, which says
which worker answered. Workers are started by the caller (usually ``MockServerProcess``). The
process's stderr goes to a temporary file (``stderr()``). ``KVFERRY_*`` variables of the
calling environment are dropped by default. This module asserts nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvferry.testing.mock_engine import MockServerProcess, Reply
from kvferry.testing.ready import read_ready_line

__all__ = ["READY", "RoutedReply", "RouterProcess"]

READY = "kvferry-router-ready"
WORKER_HEADER = "X-Kvferry-Worker"


@dataclass(frozen=True)
class RoutedReply(Reply):
    """An HTTP reply of the router and the worker that answered ("" if none did)."""

    worker: str = ""


@dataclass
class RouterProcess(MockServerProcess):
    """A running ``kvferry serve router`` process on 127.0.0.1.

    ``kv_stats`` and ``events`` of the base class do not apply (the router has neither
    endpoint); everything else does.
    """

    @classmethod
    def start(
        cls,
        *args: str,
        token: str | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
    ) -> RouterProcess:
        """Launch ``kvferry serve router --port 0 --quiet *args`` and wait for its ready line.

        Args:
            args: ``serve router`` flags, ``"--worker", url`` at least once.
            token: passed as ``--auth-token`` and sent by the helpers.
            env: the child's environment; the caller's minus ``KVFERRY_*`` if None.
            startup_timeout: seconds to wait for the ready line.

        Raises:
            RuntimeError: the router exited or did not print its ready line in time; the
                message has its stderr.
        """
        argv = [sys.executable, "-m", "kvferry", "serve", "router", "--port", "0", "--quiet"]
        if token is not None:
            argv += ["--auth-token", token]
        argv += list(args)
        if env is None:
            env = {k: v for k, v in os.environ.items() if not k.startswith("KVFERRY_")}
        log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the router
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=dict(env)
        )
        try:
            line = read_ready_line(proc, startup_timeout, log, "kvferry serve router", READY)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()
            log.close()
            raise
        host, _, port = line.split()[1].rpartition(":")
        return cls(host=host, port=int(port), token=token, proc=proc, log=log)

    @classmethod
    def over(
        cls, workers: Sequence[MockServerProcess | str], *args: str, **kwargs: Any
    ) -> RouterProcess:
        """:meth:`start` with one ``--worker`` per worker (a process or a URL)."""
        flags: list[str] = []
        for w in workers:
            flags += ["--worker", w if isinstance(w, str) else w.url]
        return cls.start(*flags, *args, **kwargs)

    def __enter__(self) -> RouterProcess:
        return self

    def stats(self) -> dict[str, Any]:
        """``GET /router/stats``."""
        reply = self.get("/router/stats")
        if reply.status != 200:
            raise RuntimeError(f"/router/stats failed with {reply.status}: {reply.text}")
        stats: dict[str, Any] = reply.body
        return stats

    def worker_stats(self) -> dict[str, dict[str, Any]]:
        """The ``workers`` of ``/router/stats``, by URL."""
        return {w["url"]: w for w in self.stats()["workers"]}

    def routed(
        self, path: str, body: object, *, token: str | None = None, timeout: float = 60.0
    ) -> RoutedReply:
        """POST ``body`` as JSON; the reply and the ``X-Kvferry-Worker`` that answered.
        Error statuses are returned, not raised."""
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers=self._headers(token),
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, payload, worker = r.status, r.read(), r.headers.get(WORKER_HEADER, "")
        except urllib.error.HTTPError as e:
            status, payload, worker = e.code, e.read(), e.headers.get(WORKER_HEADER, "")
            e.close()
        text = payload.decode(errors="replace")
        try:
            decoded: Any = json.loads(text)
        except ValueError:
            decoded = None
        return RoutedReply(status, decoded, text, worker or "")
