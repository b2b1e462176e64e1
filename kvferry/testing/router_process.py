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
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from kvferry.testing.mock_engine import MockServerProcess, Reply

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

    SERVE_KIND: ClassVar[str] = "router"
    READY: ClassVar[str] = READY

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
