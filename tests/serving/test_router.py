"""``kvferry serve router`` for real: a router process in front of real mock worker processes.

What a worker cached is read from the worker itself (``/kv/stats`` hit counts, usage's
``cached_tokens``), never from the router alone; the router's own stats are checked against it.
Prompts are word strings (the word tokenizer: one token per word, so 64 words = 4 blocks of 16),
which also checks that the router tokenizes exactly as the workers do. Every test uses its own
prompt tags, so tests sharing the fleet never share a prefix. No timing is asserted.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from kvferry.cli.main import main
from kvferry.testing.mock_engine import MockServerProcess
from kvferry.testing.ready import wait_for
from kvferry.testing.router_process import RouterProcess

FAST = ("--speedup-ratio", "1000", "--num-blocks", "512", "--max-model-len", "2048")
BLOCK = 16


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def prompt(prefix: str, suffix: str) -> str:
    """64 shared words (4 full blocks) + 8 own words: 4 full blocks, all of them the prefix."""
    return words(prefix, 64) + " " + words(suffix, 8)


def start_mocks(n: int, *args: str) -> list[MockServerProcess]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: MockServerProcess.start(*args), range(n)))


def hits(fleet: list[MockServerProcess]) -> dict[str, tuple[int, int]]:
    """(hit_blocks, lookup_blocks) of each worker, from the worker."""
    out = {}
    for w in fleet:
        s = w.kv_stats()
        out[w.url] = (s["hit_blocks"], s["lookup_blocks"])
    return out


@pytest.fixture(scope="module")
def fleet() -> Iterator[list[MockServerProcess]]:
    workers = start_mocks(3, *FAST)
    try:
        yield workers
    finally:
        for w in workers:
            w.kill()


@pytest.fixture(scope="module")
def kv_router(fleet: list[MockServerProcess]) -> Iterator[RouterProcess]:
    with RouterProcess.over(fleet) as router:
        wait_for(
            lambda: all(w["kv_source"] == "events" for w in router.stats()["workers"]),
            "the router subscribed to every worker's events",
        )
        yield router


@pytest.fixture(scope="module")
def rr_router(fleet: list[MockServerProcess]) -> Iterator[RouterProcess]:
    with RouterProcess.over(fleet, "--router-mode", "round-robin") as router:
        yield router


def complete(router: RouterProcess, text: str, **extra: Any) -> Any:
    reply = router.routed("/v1/completions", {"prompt": text, "max_tokens": 2, **extra})
    assert reply.status == 200, reply.text
    assert reply.worker
    return reply


# --- KV-aware routing ------------------------------------------------------------------------


def test_repeated_prefix_goes_to_the_worker_holding_its_blocks(
    fleet: list[MockServerProcess], kv_router: RouterProcess
) -> None:
    before, routed_before = hits(fleet), kv_router.worker_stats()
    replies = [complete(kv_router, prompt("rep", f"s{i}x")) for i in range(5)]
    holder = replies[0].worker
    assert [r.worker for r in replies] == [holder] * 5
    after, routed = hits(fleet), kv_router.worker_stats()
    for url in after:
        hit = after[url][0] - before[url][0]
        lookups = after[url][1] - before[url][1]
        predicted = routed[url]["hit_blocks"] - routed_before[url]["hit_blocks"]
        if url == holder:
            assert (hit, lookups, predicted) == (4 * 4, 5 * 4, 4 * 4)
            assert routed[url]["requests"] - routed_before[url]["requests"] == 5
        else:
            assert (hit, lookups, predicted) == (0, 0, 0)
    usage = replies[-1].body["usage"]
    assert usage["prompt_tokens"] == 72
    assert usage["prompt_tokens_details"]["cached_tokens"] == 64


def test_chat_prompts_are_tokenized_like_the_workers(kv_router: RouterProcess) -> None:
    system = {"role": "system", "content": words("sys", 70)}
    replies = [
        kv_router.routed(
            "/v1/chat/completions",
            {"messages": [system, {"role": "user", "content": f"q{i}"}], "max_tokens": 1},
        )
        for i in range(3)
    ]
    assert all(r.status == 200 for r in replies)
    assert len({r.worker for r in replies}) == 1
    # "<|system|>" + 70 words = 71 tokens of the same prefix: 4 full blocks hit.
    assert [r.body["usage"]["prompt_tokens_details"]["cached_tokens"] for r in replies] == [
        0,
        64,
        64,
    ]


def test_router_mirrors_each_workers_cache_through_its_events(
    fleet: list[MockServerProcess], kv_router: RouterProcess
) -> None:
    complete(kv_router, prompt("mirror", "a"))

    def mirrored() -> bool:
        routed = kv_router.worker_stats()
        return all(routed[w.url]["indexed_blocks"] == w.kv_stats()["cached_blocks"] for w in fleet)

    wait_for(mirrored, "router's indexed blocks == each worker's cached blocks")
    assert all(w["resyncs"] == 0 for w in kv_router.stats()["workers"])
    target = fleet[0]
    assert target.post("/kv/clear", {}).status == 200
    wait_for(
        lambda: kv_router.worker_stats()[target.url]["indexed_blocks"] == 0,
        "a cleared event empties the worker's blocks in the index",
    )


def test_kv_routing_hits_more_blocks_than_round_robin(
    fleet: list[MockServerProcess], kv_router: RouterProcess, rr_router: RouterProcess
) -> None:
    """4 prefixes x 6 requests, interleaved, over 3 workers: KV mode misses each prefix once,
    round-robin once per worker it visits."""

    def hit_rate(router: RouterProcess, tag: str) -> tuple[float, float]:
        before, routed_before = hits(fleet), router.stats()
        for i in range(24):
            complete(router, prompt(f"{tag}p{i % 4}", f"{tag}s{i}"))
        after, routed = hits(fleet), router.stats()
        hit = sum(after[u][0] - before[u][0] for u in after)
        lookups = sum(after[u][1] - before[u][1] for u in after)
        assert lookups == 24 * 4
        predicted = routed["hit_blocks"] - routed_before["hit_blocks"]
        return hit / lookups, predicted / lookups

    kv, kv_predicted = hit_rate(kv_router, "kvw")
    rr, rr_predicted = hit_rate(rr_router, "rrw")
    assert kv == pytest.approx(20 / 24)
    assert rr == pytest.approx(12 / 24)
    assert kv > rr
    # The router's prediction is what the workers then hit, in both modes.
    assert (kv_predicted, rr_predicted) == (pytest.approx(kv), pytest.approx(rr))


def test_round_robin_spreads_requests_evenly(
    fleet: list[MockServerProcess], rr_router: RouterProcess
) -> None:
    before = rr_router.worker_stats()
    order = [complete(rr_router, prompt("rr", f"s{i}")).worker for i in range(9)]
    after = rr_router.worker_stats()
    assert {u: after[u]["requests"] - before[u]["requests"] for u in after} == {
        w.url: 3 for w in fleet
    }
    assert order[:3] == order[3:6] == order[6:]


def test_random_mode_ignores_the_cache_and_counts_what_it_predicted(
    fleet: list[MockServerProcess],
) -> None:
    """One prefix 30 times: KV mode would send every repeat to one worker; random spreads them
    (all 30 on one of 3 workers has probability 3^-29), and its predicted hits are exactly
    what the workers then found."""
    with RouterProcess.over(fleet, "--router-mode", "random") as router:
        assert router.stats()["mode"] == "random"
        before = hits(fleet)
        workers = [complete(router, prompt("rnd", f"s{i}")).worker for i in range(30)]
        after, stats = hits(fleet), router.stats()
    assert len(set(workers)) > 1
    assert {w["url"]: w["requests"] for w in stats["workers"]} == {
        w.url: workers.count(w.url) for w in fleet
    }
    found = sum(after[u][0] - before[u][0] for u in after)
    # The first request to each worker it visits misses the 4 prefix blocks, every later one hits.
    assert found == stats["hit_blocks"] == 4 * (30 - len(set(workers)))


def test_approximate_mode_routes_repeats_to_the_same_worker(
    fleet: list[MockServerProcess],
) -> None:
    with RouterProcess.over(fleet, "--no-kv-events", "--router-mode", "kv") as router:
        assert {w["kv_source"] for w in router.stats()["workers"]} == {"approx"}
        before = hits(fleet)
        replies = [complete(router, prompt("approx", f"s{i}")) for i in range(4)]
        holder = replies[0].worker
        assert {r.worker for r in replies} == {holder}
        after = hits(fleet)
        assert {u: after[u][0] - before[u][0] for u in after} == {
            w.url: 12 if w.url == holder else 0 for w in fleet
        }
        stats = router.worker_stats()[holder]
        assert (stats["requests"], stats["hit_blocks"], stats["prompt_blocks"]) == (4, 12, 16)
        assert stats["kv_events"] == 0


# --- the OpenAI surface ----------------------------------------------------------------------


def test_streams_pass_through_unchanged(
    fleet: list[MockServerProcess], kv_router: RouterProcess
) -> None:
    body = {
        "prompt": prompt("stream", "a"),
        "max_tokens": 6,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    via_router = kv_router.stream("/v1/completions", body)
    direct = fleet[0].stream("/v1/completions", body)
    assert via_router[-1] == "[DONE]" and len(via_router) == len(direct) == 6 + 2
    text = "".join(c["choices"][0]["text"] for c in via_router[:-2])
    assert text == "".join(c["choices"][0]["text"] for c in direct[:-2])
    assert via_router[-2]["usage"]["completion_tokens"] == 6
    chat = kv_router.stream(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3},
    )
    assert chat[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chat[1:-1]] == [None, None, "length"]


def test_bad_requests_get_clear_errors(kv_router: RouterProcess) -> None:
    reply = kv_router.request("POST", "/v1/completions", raw=b'{"prompt": "a",')
    assert reply.status == 400
    assert reply.body["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in reply.body["error"]["message"]
    reply = kv_router.post("/v1/chat/completions", [1, 2])
    assert reply.status == 400 and "must be a JSON object" in reply.body["error"]["message"]
    # What only the worker can judge is the worker's answer, passed through.
    reply = kv_router.routed("/v1/completions", {"max_tokens": 2})
    assert reply.status == 400 and reply.worker
    assert "prompt is required" in reply.body["error"]["message"]
    assert kv_router.get("/v1/nothing").status == 404
    assert kv_router.get("/v1/completions").status == 405


def test_models_health_stats_and_metrics(
    fleet: list[MockServerProcess], kv_router: RouterProcess
) -> None:
    models = kv_router.get("/v1/models")
    assert models.status == 200 and models.body["data"][0]["id"] == "kvferry-mock"
    health = kv_router.get("/health")
    assert health.status == 200
    assert health.body == {"status": "ok", "workers": 3, "healthy_workers": 3}
    complete(kv_router, prompt("metrics", "a"))
    stats = kv_router.stats()
    assert stats["mode"] == "kv" and stats["block_size"] == BLOCK
    assert stats["model"] == "kvferry-mock"
    assert [w["url"] for w in stats["workers"]] == [w.url for w in fleet]
    metrics = kv_router.metrics()
    for w in stats["workers"]:
        label = f'{{worker="{w["url"]}"}}'
        assert metrics[f"kvferry_router_requests_total{label}"] == w["requests"]
        assert metrics[f"kvferry_router_hit_blocks_total{label}"] == w["hit_blocks"]
        assert metrics[f"kvferry_router_worker_up{label}"] == 1.0
        assert metrics[f"kvferry_router_in_flight{label}"] == 0.0
    assert metrics["kvferry_router_requests_received_total"] == stats["requests"]


# --- failures --------------------------------------------------------------------------------


def test_dead_workers_are_routed_around_retried_and_finally_503() -> None:
    """Approximate mode (no event stream to notice a death): a repeat goes to its dead holder,
    fails there, and is retried once on the other worker; a stream that breaks mid-way ends
    with an error event; with every worker dead the answer is 503."""
    pair = start_mocks(2, "--num-blocks", "512", "--max-model-len", "4096")
    try:
        with RouterProcess.over(
            pair, "--no-kv-events", "--set", "router.health_interval=60"
        ) as router:
            text = prompt("dead", "a")
            first = complete(router, text)
            holder = next(w for w in pair if w.url == first.worker)
            other = next(w for w in pair if w is not holder)
            holder.kill()
            second = complete(router, text)
            assert second.worker == other.url
            assert second.body["choices"][0]["text"] == first.body["choices"][0]["text"]
            stats = router.stats()
            dead = {w["url"]: w for w in stats["workers"]}[holder.url]
            assert (dead["healthy"], dead["errors"], dead["retries"]) == (False, 1, 1)
            assert dead["down_reason"]
            assert stats["retries"] == 1
            assert complete(router, text).worker == other.url  # no second try on the dead one
            assert router.worker_stats()[holder.url]["requests"] == 2

            # A stream that already started is not retried: it ends with an error event.
            body = {"prompt": prompt("midway", "a"), "max_tokens": 3000, "ignore_eos": True}
            req = urllib.request.Request(
                router.url + "/v1/completions",
                data=json.dumps({**body, "stream": True}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=60) as r:
                assert r.headers["X-Kvferry-Worker"] == other.url
                assert r.readline().startswith(b"data: ")
                other.kill()
                rest = [line.decode().strip() for line in r]
            data = [line[len("data: ") :] for line in rest if line.startswith("data: ")]
            assert data[-1] == "[DONE]"
            assert "failed mid-stream" in json.loads(data[-2])["error"]["message"]

            reply = router.routed("/v1/completions", {"prompt": text, "max_tokens": 2})
            assert reply.status == 503
            assert "no healthy worker" in reply.body["error"]["message"]
            assert router.get("/health").status == 503
            assert router.stats()["unrouted"] == 1
    finally:
        for w in pair:
            w.kill()


def test_auth_on_the_router_and_towards_the_workers() -> None:
    with (
        MockServerProcess.start(*FAST, token="worker-secret") as worker,
        RouterProcess.over(
            [worker], "--worker-auth-token", "worker-secret", token="router-secret"
        ) as router,
    ):
        assert router.get("/health", token="").status == 200
        for path in ("/router/stats", "/metrics", "/v1/models"):
            assert router.get(path, token="").status == 401
            assert router.get(path, token="wrong").status == 401
        denied = router.routed("/v1/completions", {"prompt": "a b", "max_tokens": 1}, token="")
        assert denied.status == 401 and not denied.worker
        assert denied.body["error"]["type"] == "authentication_error"
        assert complete(router, "a b c").body["usage"]["prompt_tokens"] == 3
        assert router.get("/v1/models").status == 200
        wait_for(
            lambda: router.stats()["workers"][0]["kv_source"] == "events",
            "the event stream is read with the worker's token",
        )


# --- start-up errors (in process: they fail before serving) ----------------------------------


def test_start_up_refuses_mismatched_or_missing_workers(
    fleet: list[MockServerProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    url = fleet[0].url
    assert main(["serve", "router", "--port", "0", "--worker", url, "--block-size", "32"]) == 2
    err = capsys.readouterr().err
    assert f"worker {url} has block_size 16" in err and "--block-size 16" in err
    assert main(["serve", "router", "--port", "0", "--worker", url, "--model", "other"]) == 2
    assert "serves model 'kvferry-mock'" in capsys.readouterr().err
    assert main(["serve", "router", "--port", "0"]) == 2
    assert "router.workers is empty" in capsys.readouterr().err
    assert main(["serve", "router", "--worker", "ftp://x:1"]) == 2
    assert "must be a URL like http://127.0.0.1:8000" in capsys.readouterr().err
    assert main(["serve", "router", "--worker", url, "--router-mode", "fastest"]) == 2
    assert "router.mode" in capsys.readouterr().err
    # The router must count tokens as the mock does (its /kv/stats says how).
    argv = ["serve", "router", "--port", "0", "--worker", url, "--set", "router.vocab_size=1000"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"worker {url} has vocab_size 128256" in err
    assert "--set router.vocab_size=128256" in err
    with socket.socket() as taken:  # a port in use: the keys to change, no traceback
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "router", "--port", port, "--worker", url]) == 2
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port}" in err and "router.port" in err
        assert main(["serve", "mock", "--port", port]) == 2
        err = capsys.readouterr().err
        assert "mock.port" in err and "Traceback" not in err
