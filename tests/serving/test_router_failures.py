"""How the router tells a bad request from a bad worker, for real: a router process over real
workers.

A request that fails on a worker (a 5xx, a connection that breaks) may be the request's fault,
not the worker's: the router sends it to one more worker and asks the first one's ``/health``
before it marks it down; a failure every worker reproduces marks none down; a worker that is
merely slow keeps its KV index. The attack of issue 20 is replayed against real mock workers;
for a worker that answers 5xx (no kvferry worker does on purpose), :class:`BuggyWorker` is a
small real HTTP server in this process that answers like a mock, except that a prompt holding
``POISON`` gets a 500 and its ``/health`` can be slowed or failed. Only bounds on waiting are
timed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web

from kvferry.testing.mock_engine import MockServerProcess
from kvferry.testing.ready import wait_for
from kvferry.testing.router_process import RouterProcess

POISON = "POISON"


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


class BuggyWorker:
    """A worker with a bug: answers 500 to any prompt holding ``POISON`` (when ``poisoned``),
    others like a mock; ``/health`` answers ``health_status`` after ``health_delay`` seconds."""

    def __init__(self, *, poisoned: bool = True) -> None:
        self.poisoned = poisoned
        self.health_status = 200
        self.health_delay = 0.0
        self.completions = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),))
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the buggy worker did not start")

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/kv/stats", self._kv_stats)
        app.router.add_post("/v1/completions", self._complete)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site.port}"
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    async def _health(self, _: web.Request) -> web.Response:
        await asyncio.sleep(self.health_delay)
        return web.json_response({"status": "ok"}, status=self.health_status)

    async def _kv_stats(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"model": "kvferry-mock", "block_size": 16, "tokenizer": "words", "vocab_size": 128256}
        )

    async def _complete(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        if self.poisoned and POISON in str(body.get("prompt")):
            return web.json_response({"error": {"message": "internal error: the bug"}}, status=500)
        self.completions += 1
        return web.json_response({"object": "text_completion", "choices": [{"text": " ok"}]})

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def buggy() -> Iterator[Callable[..., BuggyWorker]]:
    made: list[BuggyWorker] = []

    def make(**kwargs: Any) -> BuggyWorker:
        made.append(BuggyWorker(**kwargs))
        return made[-1]

    yield make
    for w in made:
        w.close()


def approx_router(*workers: str) -> RouterProcess:
    """Approximate mode (its index is its own routing), round-robin, probes of down workers
    rare (they would bring a worker back), and a 1 s /health check (connect_timeout x 2)."""
    return RouterProcess.over(
        list(workers),
        "--no-kv-events",
        "--router-mode",
        "round-robin",
        "--set",
        "router.health_interval=60",
        "--set",
        "router.connect_timeout=0.5",
    )


def test_one_bad_request_a_second_leaves_every_real_worker_up() -> None:
    """Issue 20's attack: a lone surrogate among good requests. Each bad one is the worker's
    400, passed through; no worker goes down and the router keeps its index."""
    with (
        MockServerProcess.start("--speedup-ratio", "1000") as a,
        MockServerProcess.start("--speedup-ratio", "1000") as b,
        RouterProcess.over([a, b]) as router,
    ):
        wait_for(
            lambda: all(w["kv_source"] == "events" for w in router.stats()["workers"]),
            "the router follows both workers' events",
        )
        served = set()
        for i in range(6):
            bad = router.request("POST", "/v1/completions", raw=b'{"prompt": "a \\ud800 b"}')
            assert bad.status == 400 and "not valid Unicode" in bad.text
            good = router.routed(
                "/v1/completions", {"prompt": words(f"g{i}x", 40), "max_tokens": 1}
            )
            assert good.status == 200, good.text
            served.add(good.worker)
        workers = router.worker_stats()
        assert all(w["healthy"] and w["errors"] == 0 for w in workers.values()), workers
        wait_for(
            lambda: all(router.worker_stats()[url]["indexed_blocks"] > 0 for url in served),
            "the router's index holds the blocks of every worker that served",
        )


def test_a_5xx_every_worker_reproduces_marks_none_down(
    buggy: Callable[..., BuggyWorker],
) -> None:
    a, b = buggy(), buggy()
    with approx_router(a.url, b.url) as router:
        for i in range(3):
            reply = router.routed("/v1/completions", {"prompt": f"{POISON} {words('p', 40)}"})
            assert reply.status == 500 and reply.worker in (a.url, b.url)
            assert "the bug" in reply.body["error"]["message"]
            good = router.routed("/v1/completions", {"prompt": words(f"g{i}x", 40)})
            assert good.status == 200
        stats = router.stats()
        assert stats["unrouted"] == 0
        for w in stats["workers"]:
            assert w["healthy"] and w["errors"] == 3 and w["indexed_blocks"] > 0, w


def test_a_5xx_one_worker_gives_is_checked_before_it_is_marked_down(
    buggy: Callable[..., BuggyWorker],
) -> None:
    a, b = buggy(), buggy(poisoned=False)
    with approx_router(a.url, b.url) as router:

        def poison_until_a_fails(n: int) -> None:
            while router.worker_stats()[a.url]["errors"] < n:
                reply = router.routed("/v1/completions", {"prompt": f"{POISON} {words('q', 40)}"})
                assert reply.status == 200 and reply.worker == b.url  # retried on b

        # a's /health is fine: the request was to blame, a stays up and keeps its blocks.
        poison_until_a_fails(1)
        wait_for(lambda: router.worker_stats()[a.url]["checks"] == 1, "a was checked")
        before = router.worker_stats()[a.url]
        assert before["healthy"] and before["indexed_blocks"] > 0

        # a's /health is merely slow (3 s > the 1 s check): down, but its index is kept.
        a.health_delay = 3.0
        poison_until_a_fails(2)
        wait_for(lambda: not router.worker_stats()[a.url]["healthy"], "a is marked down", 5)
        down = router.worker_stats()[a.url]
        assert "timed out" in down["down_reason"] and down["indexed_blocks"] > 0
        assert router.routed("/v1/completions", {"prompt": "x y"}).worker == b.url
