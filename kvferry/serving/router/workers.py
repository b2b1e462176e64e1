"""The router's side of its workers: their health, the start-up check, and the KV event
subscriptions that keep the router's :class:`~kvferry.serving.router.prefix_index.PrefixIndex`
true (the rules are here; the subscriptions run in :mod:`kvferry.serving.router.events`).

One :class:`Worker` per ``--worker`` URL, all held by a :class:`WorkerPool`, which runs on the
router's event loop:

- **Start-up check** (:meth:`WorkerPool.start`): ``GET /kv/stats`` of every worker (a kvferry
  mock answers it; vLLM answers 404 and ``/v1/models`` is read instead). A worker whose block
  size or model (the block hash salt) differs from the router's is a
  :class:`~kvferry.errors.ConfigError` that names both values; a worker that cannot be reached
  starts as down. When ``router.model`` is empty the router takes the first worker's model.
- **Health**: a worker is marked down (:meth:`WorkerPool.mark_down`) when it refuses a
  connection (a request's or its event stream's), or when a request failed on it in a way the
  request may have caused (a 5xx, a broken or timed-out connection) and a ``GET /health`` check
  right after fails too (:meth:`WorkerPool.suspect`). A worker that cannot be reached loses its
  blocks in the index (a restarted worker has an empty cache); one that still answers, slowly
  or with errors, keeps them. It gets no requests until a ``GET /health`` probe, every
  ``router.health_interval`` seconds, and the start-up check pass again.
- **KV events** (with ``router.kv_events``): one long-lived ``GET /kv/events`` per worker,
  read by an :class:`~kvferry.serving.router.prefix_index.EventMirror`. A stream that ends is
  resumed with ``?since=<last id>``; an ``error`` event or a gap in the ids restarts it from a
  fresh snapshot. A worker that answers 404 and publishes no vLLM events either falls back to the
  approximate mode (``kv_source`` "approx"): the router remembers its own routing decisions for
  ``router.approx_ttl`` seconds. Events whose block size differs from the router's mark the
  worker down with that reason. A vLLM worker named in ``router.vllm_events`` is read from
  vLLM's ZeroMQ publisher instead (:mod:`kvferry.serving.router.vllm_events`), by a subscriber that
  is restarted after any failure; a missing pyzmq or msgspec leaves it in approximate mode.
  A worker not named there that answers 404 is asked for vLLM's ``/kv_event_sources``: a
  publisher found there is followed the same way (approximate mode when there is none, or
  none the router can reach; the log says which).

Every failure here is an isolation boundary for one worker: it is logged and counted, and the
other workers keep serving. No HTTP server here: :mod:`kvferry.serving.router.server` owns that.
(:class:`SseParser` and :func:`describe_error` live in :mod:`kvferry.serving.router.events` and
are re-exported here.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from kvferry.config.models import RouterConfig, parse_vllm_events
from kvferry.errors import ConfigError, PeerClosed
from kvferry.serving.router.events import EventFollower, SseParser, describe_error
from kvferry.serving.router.prefix_index import EventMirror, PrefixIndex
from kvferry.serving.router.vllm_events import VllmEventMirror

__all__ = ["KvSource", "SseParser", "Worker", "WorkerPool", "WorkerStats", "describe_error"]

log = logging.getLogger("kvferry.serving.router.server")

KvSource = Literal["events", "approx", "connecting"]
"""Where a worker's cached blocks come from: its KV events, the router's own decisions, or
(events wanted, not synced yet) the router's decisions until the first snapshot."""


@dataclass
class WorkerStats:
    """Counters of one worker, as the router saw its requests pass."""

    requests: int = 0
    """Requests sent to it (a retried request counts on each worker it was sent to)."""
    prompt_blocks: int = 0
    """Full prompt blocks of those requests."""
    hit_blocks: int = 0
    """Leading prompt blocks the router predicted it held (its expected prefix-cache hits)."""
    errors: int = 0
    """Requests to it that failed (refused, reset, 5xx, broken stream)."""
    retries: int = 0
    """Requests that failed on it and were sent to another worker."""
    checks: int = 0
    """/health checks after a request failed on it in a way the request may have caused."""

    @property
    def hit_rate(self) -> float:
        """Predicted block-weighted hit rate: hit blocks / prompt blocks (0 before any)."""
        return self.hit_blocks / self.prompt_blocks if self.prompt_blocks else 0.0


WorkerRole = Literal["both", "prefill", "decode"]


class Worker:
    """One worker as the router sees it.

    Attributes:
        url: base URL (``http://host:port``), also its name in the index and in metrics.
        healthy: False while marked down.
        down_reason: why it is down ("" when healthy).
        kv_source: where its cached blocks come from (:data:`KvSource`).
        mirror: its KV event mirror.
        stats: its counters.
    """

    def __init__(
        self,
        url: str,
        mirror: EventMirror,
        kv_source: KvSource,
        vllm: tuple[VllmEventMirror, str, str | None] | None = None,
    ) -> None:
        self.url = url
        self.role: WorkerRole = "both"
        """P/D: "prefill" or "decode" (router.prefill_workers / decode_workers), else "both"."""
        self.healthy = False
        self.down_reason = "not checked yet"
        self.kv_source: KvSource = kv_source
        self.mirror = mirror
        self.vllm = vllm
        """A vLLM worker's event mirror, publisher and replay endpoints (router.vllm_events);
        its events replace /kv/events."""
        self.stats = WorkerStats()
        self.up = asyncio.Event()
        """Set while healthy: the event follower waits on it."""

    @property
    def events_applied(self) -> int:
        """KV events (vLLM: event batches) applied."""
        return self.vllm[0].batches if self.vllm else self.mirror.events

    @property
    def resyncs(self) -> int:
        """Times its events had to start over or were missed (vLLM: gaps and resets)."""
        return self.vllm[0].gaps + self.vllm[0].resets if self.vllm else self.mirror.resyncs

    @property
    def last_event_id(self) -> int | None:
        """Id (vLLM: batch number) of the last event applied."""
        if self.vllm:
            seq = self.vllm[0].next_seq
            return None if seq is None else seq - 1
        return self.mirror.last_id

    @property
    def event_blocks(self) -> int | None:
        """vLLM blocks its events announced and the router keyed (None for other workers)."""
        return self.vllm[0].mapped_blocks if self.vllm else None

    @property
    def skipped_blocks(self) -> int:
        """vLLM blocks stored that the router could not key (0 for other workers)."""
        return self.vllm[0].skipped_blocks if self.vllm else 0


class WorkerPool:
    """The router's workers: health, start-up check, event subscriptions (module docstring).

    Args:
        config: the ``router`` section (``workers`` must not be empty).
        index: the prefix index the event mirrors keep true.

    Raises:
        ConfigError: ``config.workers`` is empty.
    """

    def __init__(self, config: RouterConfig, index: PrefixIndex) -> None:
        if not config.all_workers:
            raise ConfigError(
                "router.workers is empty: give at least one worker URL with --worker "
                "http://HOST:PORT (repeatable)"
            )
        self.config = config
        self.index = index
        self.model = config.model
        """The model salting the block hashes: router.model, or the first worker's."""
        source: KvSource = "connecting" if config.kv_events else "approx"
        vllm = {
            url: (pub, replay) for url, pub, replay in map(parse_vllm_events, config.vllm_events)
        }
        self.workers = []
        for url in config.all_workers:
            mirror = EventMirror(index, url, config.block_size)
            zmq_source = None
            if url in vllm:
                vmirror = VllmEventMirror(index, url, config.block_size)
                zmq_source = (vmirror, *vllm[url])
            worker = Worker(url, mirror, source, zmq_source)
            if url in config.prefill_workers:
                worker.role = "prefill"
            elif url in config.decode_workers:
                worker.role = "decode"
            self.workers.append(worker)
        token = config.worker_auth_token
        self.headers: dict[str, str] = (
            {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}
        )
        self._session: aiohttp.ClientSession | None = None
        self.events = EventFollower(self)
        """Follows the workers' KV events (:mod:`kvferry.serving.router.events`)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._checks: dict[Worker, asyncio.Task[None]] = {}

    # --- lifecycle ---

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Check every worker, then start the health probe and the event followers.

        Raises:
            ConfigError: a reachable worker's block size or model differs from the router's,
                or it refuses the router's token; the message names every such worker.
        """
        self._session = session
        problems = await asyncio.gather(*(self._first_check(w) for w in self.workers))
        errors = [p for p in problems if p]
        if errors:
            raise ConfigError("; ".join(errors))
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="kvferry-router-probe"))
        if self.config.kv_events:
            for w in self.workers:
                follow = self.events.follow(w)
                task = asyncio.create_task(follow, name=f"kvferry-router-events {w.url}")
                self._tasks.append(task)

    async def close(self) -> None:
        """Stop the probe, the checks and the event followers; idempotent."""
        tasks, self._tasks = self._tasks + list(self._checks.values()), []
        self._checks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def healthy(self) -> list[Worker]:
        return [w for w in self.workers if w.healthy]

    def by_url(self, url: str) -> Worker:
        """Raises KeyError for an unknown URL."""
        for w in self.workers:
            if w.url == url:
                return w
        raise KeyError(url)

    def mark_down(self, worker: Worker, reason: str, *, keep_blocks: bool = False) -> None:
        """Take ``worker`` out of routing until a probe brings it back. Its blocks are dropped
        (a worker that went away comes back with an empty cache) unless ``keep_blocks`` (it
        still answers, slowly or with errors: its cache is likely intact); either way its
        event stream restarts from a snapshot, which replaces them."""
        if worker.healthy:
            log.warning("worker %s is down: %s", worker.url, reason)
        worker.healthy = False
        worker.down_reason = reason
        worker.up.clear()
        if not keep_blocks:
            self.index.clear(worker.url)
        worker.mirror.last_id = None
        if worker.vllm:
            worker.vllm[0].reset()

    def suspect(self, worker: Worker, reason: str) -> None:
        """A request failed on ``worker`` in a way the request itself may have caused (a 5xx,
        a broken or timed-out connection): check its ``/health`` now, in the background, and
        mark it down only if that fails too (keeping its blocks unless it cannot be reached).
        A check already running for it covers this one."""
        if not worker.healthy or worker in self._checks:
            return
        task = asyncio.create_task(self._check(worker, reason), name=f"kvferry-check {worker.url}")
        self._checks[worker] = task
        task.add_done_callback(lambda _: self._checks.pop(worker, None))

    async def _check(self, worker: Worker, reason: str) -> None:
        try:
            status, _ = await self.get(worker, "/health")
        except aiohttp.ClientConnectorError as e:
            self.mark_down(worker, f"{reason}; then its /health: {describe_error(e)}")
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self.mark_down(
                worker, f"{reason}; then its /health: {describe_error(e)}", keep_blocks=True
            )
        else:
            if status != 200:
                reason = f"{reason}; then its /health answered {status}"
                self.mark_down(worker, reason, keep_blocks=True)
            else:
                log.info("worker %s stays up: %s, but its /health is fine", worker.url, reason)
        finally:
            worker.stats.checks += 1

    def _mark_up(self, worker: Worker) -> None:
        if not worker.healthy:
            log.info("worker %s is up", worker.url)
        worker.healthy = True
        worker.down_reason = ""
        worker.up.set()

    # --- checks ---

    @property
    def session(self) -> aiohttp.ClientSession:
        """The router's client session (set by :meth:`start`)."""
        if self._session is None:
            raise RuntimeError("the worker pool is not started")
        return self._session

    async def get(self, worker: Worker, path: str) -> tuple[int, Any]:
        """GET ``path`` of ``worker``: status and decoded JSON (None if not JSON)."""
        timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout * 2)
        async with self.session.get(worker.url + path, headers=self.headers, timeout=timeout) as r:
            raw = await r.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            return r.status, body

    async def check(self, worker: Worker) -> None:
        """The start-up check of one worker (module docstring).

        Raises:
            ConfigError: the worker's block size or model differs from the router's, or it
                refuses the router's token.
            PeerClosed: it answered 5xx.
            aiohttp.ClientError, OSError, TimeoutError: it cannot be reached.
        """
        status, body = await self.get(worker, "/kv/stats")
        if status in (401, 403):
            raise ConfigError(
                f"worker {worker.url} answered {status} to the router: give the token it "
                "requires with --worker-auth-token (router.worker_auth_token)"
            )
        if status >= 500:
            raise PeerClosed(f"/kv/stats answered {status}")
        if status == 200 and isinstance(body, dict):
            size = body.get("block_size")
            if isinstance(size, int) and size != self.config.block_size:
                raise ConfigError(
                    f"worker {worker.url} has block_size {size} (its /kv/stats), the router "
                    f"has router.block_size {self.config.block_size}; they must be equal "
                    f"(--block-size {size})"
                )
            self._check_tokenizer(worker, body.get("tokenizer"), body.get("vocab_size"))
            model = body.get("model")
            if isinstance(model, str) and model:
                self._check_model(worker, model, strict=True)
            return
        # Not a kvferry mock (vLLM): its model names the hash salt only if none is set.
        status, body = await self.get(worker, "/v1/models")
        if status in (401, 403):
            raise ConfigError(
                f"worker {worker.url} answered {status} to the router: give the token it "
                "requires with --worker-auth-token (router.worker_auth_token)"
            )
        if status == 200 and isinstance(body, dict):
            data = body.get("data")
            if isinstance(data, list) and data and isinstance(data[0], dict):
                model = data[0].get("id")
                if isinstance(model, str) and model:
                    self._check_model(worker, model, strict=False)

    def _check_tokenizer(self, worker: Worker, kind: object, vocab: object) -> None:
        """A mock worker must count tokens as the router does, or no prompt block would match
        (older mocks report no tokenizer: nothing to check)."""
        mine = "hf" if self.config.tokenizer else "words"
        if kind in ("words", "hf") and kind != mine:
            if kind == "hf":
                theirs, ours = "a Hugging Face tokenizer", "the word tokenizer"
                fix = "give the router the same file with --tokenizer (router.tokenizer)"
            else:
                theirs = "the word tokenizer"
                ours = f"router.tokenizer {self.config.tokenizer!r}"
                fix = "drop the router's --tokenizer (router.tokenizer)"
            raise ConfigError(
                f"worker {worker.url} tokenizes with {theirs} (its /kv/stats), the router with "
                f"{ours}; {fix}"
            )
        if kind == "words" and isinstance(vocab, int) and vocab != self.config.vocab_size:
            raise ConfigError(
                f"worker {worker.url} has vocab_size {vocab} (its /kv/stats), the router has "
                f"router.vocab_size {self.config.vocab_size}; they must be equal "
                f"(--set router.vocab_size={vocab})"
            )

    def _check_model(self, worker: Worker, model: str, *, strict: bool) -> None:
        if not self.model:
            self.model = model
            log.info("router hashes blocks for model %r (from %s)", model, worker.url)
        elif strict and model != self.model:
            raise ConfigError(
                f"worker {worker.url} serves model {model!r}, whose name salts its block "
                f"hashes; the router has router.model {self.model!r}; give --model {model!r} "
                "or route workers of one model"
            )

    async def _first_check(self, worker: Worker) -> str:
        """The start-up check; returns a config problem, "" otherwise (a worker that cannot
        be reached starts down)."""
        try:
            await self.check(worker)
        except ConfigError as e:
            return str(e)
        except (PeerClosed, aiohttp.ClientError, OSError, TimeoutError) as e:
            self.mark_down(worker, f"start-up check failed: {describe_error(e)}")
            log.warning("worker %s is down: %s", worker.url, worker.down_reason)
            return ""
        self._mark_up(worker)
        return ""

    async def probe(self, worker: Worker) -> bool:
        """``GET /health`` and the start-up check of a worker that is down; True if it is
        up again."""
        try:
            status, _ = await self.get(worker, "/health")
            if status != 200:
                worker.down_reason = f"/health answered {status}"
                return False
            await self.check(worker)
        except ConfigError as e:
            if worker.down_reason != str(e):
                log.error("worker %s refused: %s", worker.url, e)
            worker.down_reason = str(e)
            return False
        except (PeerClosed, aiohttp.ClientError, OSError, TimeoutError) as e:
            worker.down_reason = f"health probe failed: {describe_error(e)}"
            return False
        self._mark_up(worker)
        return True

    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.health_interval)
            down = [w for w in self.workers if not w.healthy]
            if down:
                await asyncio.gather(*(self.probe(w) for w in down))
            self.index.prune(loop.time())
