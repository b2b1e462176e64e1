"""The router's KV event subscriptions: what keeps its prefix index true to each worker's cache.

With ``router.kv_events``, :class:`EventFollower` runs one task per worker of a
:class:`~kvferry.serving.router.workers.WorkerPool` (the pool's module docstring has the rules):
a long-lived ``GET /kv/events`` read by an :class:`~kvferry.serving.router.prefix_index.
EventMirror` and resumed with ``?since=<last id>``, restarted from a snapshot after an ``error``
event or a gap; a worker without ``/kv/events`` is asked for vLLM's ``/kv_event_sources`` and
followed over ZeroMQ (:mod:`kvferry.serving.router.vllm_events`), else left in approximate mode.
:class:`SseParser` splits the event stream (pure). Every failure here is an isolation boundary
for one worker: logged, counted, and the follower goes on; health decisions stay the pool's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import TYPE_CHECKING, Final, Literal

import aiohttp

from kvferry.errors import ConfigError, MissingDependency
from kvferry.serving.router.vllm_events import (
    VllmEventMirror,
    discovered_endpoints,
    follow_vllm_events,
)

if TYPE_CHECKING:
    from kvferry.serving.router.workers import Worker, WorkerPool

__all__ = ["EVENT_READ_TIMEOUT_S", "EventFollower", "SseParser", "describe_error"]

log = logging.getLogger("kvferry.serving.router.server")

EVENT_READ_TIMEOUT_S: Final = 60.0
"""A silent event stream is dead after this long (the mock sends a keepalive every 15 s)."""


def describe_error(error: BaseException) -> str:
    """A short one-line description of a network error."""
    if isinstance(error, aiohttp.ClientConnectorError):
        code = error.os_error.errno
        reason = os.strerror(code) if code else str(error.os_error)
        return f"cannot connect to {error.host}:{error.port}: {reason}"
    if isinstance(error, TimeoutError):
        return "timed out"
    return " ".join((str(error) or type(error).__name__).split())


class SseParser:
    """Splits a ``text/event-stream`` body into the ``data`` of each message (``\\n``-ended
    lines; comments and other fields are skipped). Pure."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scan = 0

    def feed(self, chunk: bytes) -> list[str]:
        """Add received bytes; returns the data of every message they completed, in order."""
        self._buf += chunk
        out: list[str] = []
        start = 0
        while True:
            # Resume the search where the last one stopped (a snapshot may arrive in many
            # chunks), one byte back in case "\n\n" straddles two chunks.
            end = self._buf.find(b"\n\n", max(start, self._scan - 1))
            if end < 0:
                break
            message = bytes(self._buf[start:end])
            start = end + 2
            self._scan = start
            data = [
                line[5:].removeprefix(b" ") for line in message.split(b"\n") if line[:5] == b"data:"
            ]
            if data:
                out.append(b"\n".join(data).decode())
        if start:
            del self._buf[:start]
        self._scan = len(self._buf)
        return out


class EventFollower:
    """Follows the KV events of a pool's workers into the pool's index (module docstring).

    Args:
        pool: the workers, their index, session and health (``mark_down``).
    """

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    async def follow(self, worker: Worker) -> None:
        """Mirror ``worker``'s KV events for as long as the router runs: vLLM's ZeroMQ
        publisher when ``router.vllm_events`` names one, else its ``/kv/events``."""
        if worker.vllm:
            await self._follow_vllm(worker)
        else:
            await self._follow(worker)

    async def _follow(self, worker: Worker) -> None:
        """Mirror ``worker``'s /kv/events for as long as the router runs (module docstring)."""
        backoff = 0.05
        while True:
            await worker.up.wait()
            outcome = "ended"
            try:
                outcome = await self._read_events(worker)
            except ConfigError as e:  # another block size
                log.error("%s", e)
                self.pool.mark_down(worker, str(e))
            except (ValueError, UnicodeDecodeError) as e:  # malformed event: start over
                log.warning("worker %s sent a malformed KV event (%s); resyncing", worker.url, e)
                worker.mirror.last_id = None
                worker.mirror.resyncs += 1
            except aiohttp.ClientConnectorError as e:
                self.pool.mark_down(worker, f"event stream: {describe_error(e)}")
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                log.info("worker %s event stream broke (%s)", worker.url, describe_error(e))
            if outcome == "approx":
                return
            if outcome == "vllm":  # a vLLM server: its ZeroMQ publisher from now on
                await self._follow_vllm(worker)
                return
            if outcome == "synced":
                backoff = 0.05
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.pool.config.health_interval)

    async def _follow_vllm(self, worker: Worker) -> None:
        """Mirror a vLLM worker's ZeroMQ KV events (:mod:`kvferry.serving.router.vllm_events`) for
        as long as the router runs; restarts the subscriber after a failure."""
        assert worker.vllm is not None
        mirror, endpoint, replay = worker.vllm
        backoff = 0.05

        def applied() -> None:
            worker.kv_source = "events"

        while True:
            try:
                await follow_vllm_events(
                    mirror,
                    endpoint,
                    replay,
                    model=lambda: self.pool.model,
                    on_applied=applied,
                    timeout_s=self.pool.config.connect_timeout,
                )
            except MissingDependency as e:
                log.error("worker %s: %s; approximate mode", worker.url, e)
                worker.kv_source = "approx"
                return
            except ConfigError as e:  # another block size
                log.error("%s", e)
                self.pool.mark_down(worker, str(e))
                await worker.up.wait()
            except Exception as e:
                log.warning("worker %s: vLLM KV event subscriber failed (%s)", worker.url, e)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.pool.config.health_interval)

    async def _read_events(self, worker: Worker) -> Literal["approx", "vllm", "synced", "ended"]:
        """One /kv/events connection: "approx" when the worker has no event stream, "vllm"
        when it has none but is a vLLM server whose ZeroMQ publisher was found (its
        ``worker.vllm`` is set), "synced" when events were applied, "ended" when nothing was
        (reconnect either way)."""
        mirror = worker.mirror
        since = mirror.last_id
        path = "/kv/events" if since is None else f"/kv/events?since={since}"
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.pool.config.connect_timeout,
            sock_read=EVENT_READ_TIMEOUT_S,
        )
        synced = False
        async with self.pool.session.get(
            worker.url + path, headers=self.pool.headers, timeout=timeout
        ) as r:
            if r.status in (401, 403):
                log.error(
                    "worker %s refused the router's /kv/events (%d): using approximate "
                    "mode; give its token with --worker-auth-token",
                    worker.url,
                    r.status,
                )
                worker.kv_source = "approx"
                return "approx"
            if r.status == 404:
                no_events = True
            elif r.status != 200:
                log.info("worker %s /kv/events answered %d", worker.url, r.status)
                return "ended"
            else:
                no_events = False
                parser = SseParser()
                async for chunk in r.content.iter_any():
                    for data in parser.feed(chunk):
                        event = json.loads(data)
                        if not isinstance(event, dict):
                            raise ValueError(
                                f"a KV event must be a JSON object, got {data[:100]!r}"
                            )
                        if not worker.healthy:
                            # Marked down while streaming: its blocks were dropped, start over.
                            return "ended"
                        if mirror.apply(event) == "resync":
                            log.info(
                                "worker %s: KV event stream out of order (%s); resyncing",
                                worker.url,
                                event.get("type"),
                            )
                            return "ended"
                        if not synced:
                            synced = True
                            worker.kv_source = "events"
        if no_events:
            return await self._discover_vllm(worker)
        return "synced" if synced else "ended"

    async def _discover_vllm(self, worker: Worker) -> Literal["approx", "vllm"]:
        """A worker without /kv/events: ask it for vLLM's ``/kv_event_sources`` and, when it
        names a publisher the router can reach, follow that (:func:`discovered_endpoints`);
        else approximate mode, saying why."""
        try:
            status, body = await self.pool.get(worker, "/kv_event_sources")
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            status, body = 0, describe_error(e)
        if status != 200:
            log.info(
                "worker %s has no /kv/events and no vLLM /kv_event_sources (%s): approximate mode",
                worker.url,
                status or body,
            )
            worker.kv_source = "approx"
            return "approx"
        try:
            endpoint, replay = discovered_endpoints(body, worker.url)
        except ValueError as e:
            log.warning("worker %s: %s; approximate mode", worker.url, e)
            worker.kv_source = "approx"
            return "approx"
        log.info(
            "worker %s: following vLLM's KV events at %s (replay %s), from /kv_event_sources",
            worker.url,
            endpoint,
            replay or "none",
        )
        worker.vllm = (
            VllmEventMirror(self.pool.index, worker.url, self.pool.config.block_size),
            endpoint,
            replay,
        )
        return "vllm"
