"""The router's pure parts: prefix index, event mirror, load tracker, cost and choice, SSE
parsing. The mirror is checked against a real BlockManager's events, so the router's view and
the engine's cache are the same set by construction."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvferry.errors import ConfigError
from kvferry.index.hashing import BlockHasher
from kvferry.serving.mock.blocks import BlockManager
from kvferry.serving.mock.kv_events import event_json
from kvferry.serving.router.prefix_index import (
    EventMirror,
    LoadTracker,
    PrefixIndex,
    RoundRobin,
    WorkerCost,
    pick,
    score,
)
from kvferry.serving.router.workers import SseParser

BS = 4
INF = math.inf


def h(*path: int) -> list[bytes]:
    """Chained hashes of a token path, one block per element (block i = [path[i]] * BS)."""
    tokens = [t for p in path for t in [p] * BS]
    return BlockHasher(BS).hashes(tokens)


# --- PrefixIndex -----------------------------------------------------------------------------


def test_overlap_is_the_leading_run_each_worker_holds() -> None:
    index = PrefixIndex()
    a, b = h(1, 2, 3, 4), h(1, 2, 9)
    index.store("w1", a)
    index.store("w2", a[:2])
    index.store("w3", a[1:])  # not the first block: no prefix
    assert index.overlaps(a, ["w1", "w2", "w3", "w4"], 0.0) == {"w1": 4, "w2": 2, "w3": 0, "w4": 0}
    assert index.overlaps(b, ["w1", "w2"], 0.0) == {"w1": 2, "w2": 2}
    assert index.overlaps([], ["w1"], 0.0) == {"w1": 0}
    assert index.remove("w1", a[1:2]) == 1
    assert index.overlaps(a, ["w1"], 0.0) == {"w1": 1}
    assert index.blocks("w1") == 3
    assert index.clear("w1") == 3
    assert index.blocks("w1") == 0
    assert index.overlaps(a, ["w1", "w2"], 0.0) == {"w1": 0, "w2": 2}


def test_predictions_expire_and_never_shorten_confirmed_blocks() -> None:
    index = PrefixIndex()
    a = h(1, 2, 3)
    index.store("w1", a, until=10.0)
    assert index.overlaps(a, ["w1"], 9.9)["w1"] == 3
    assert index.overlaps(a, ["w1"], 10.0)["w1"] == 0  # at the deadline it is gone
    index.store("w1", a[:1])  # confirmed by an event
    index.store("w1", a, until=5.0)  # an older, shorter prediction changes nothing
    index.store("w1", a[1:], until=20.0)  # extended
    assert index.prune(15.0) == 0
    assert index.overlaps(a, ["w1"], 15.0)["w1"] == 3
    assert index.prune(25.0) == 2
    assert index.blocks("w1") == 1
    assert index.overlaps(a, ["w1"], 25.0)["w1"] == 1
    index.replace("w1", a[1:])
    assert index.blocks("w1") == 2 and index.overlaps(a, ["w1"], 99.0)["w1"] == 0


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["store", "predict", "remove", "clear", "prune"]),
            st.integers(0, 2),  # worker
            st.lists(st.integers(0, 3), min_size=1, max_size=5),  # path of a prompt
            st.integers(0, 20),  # time
        ),
        max_size=40,
    ),
    query=st.lists(st.integers(0, 3), max_size=6),
    now=st.integers(0, 25),
)
def test_index_matches_a_naive_model(
    ops: list[tuple[str, int, list[int], int]], query: list[int], now: int
) -> None:
    """Whatever the operations, overlaps equal a per-worker dict of deadlines walked naively."""
    index = PrefixIndex()
    model: dict[str, dict[bytes, float]] = {f"w{i}": {} for i in range(3)}
    for op, wi, path, t in ops:
        w, hashes = f"w{wi}", h(*path)
        if op == "store":
            index.store(w, hashes)
            for x in hashes:
                model[w][x] = INF
        elif op == "predict":
            index.store(w, hashes, until=float(t))
            for x in hashes:
                model[w][x] = max(model[w].get(x, -INF), float(t))
        elif op == "remove":
            index.remove(w, hashes)
            for x in hashes:
                model[w].pop(x, None)
        elif op == "clear":
            index.clear(w)
            model[w].clear()
        else:
            index.prune(float(t))
            for held in model.values():
                for x in [x for x, d in held.items() if d <= t]:
                    del held[x]
    q = h(*query)
    expected = {}
    for w, held in model.items():
        n = 0
        while n < len(q) and held.get(q[n], -INF) > now:
            n += 1
        expected[w] = n
    assert index.overlaps(q, list(model), float(now)) == expected


# --- EventMirror -----------------------------------------------------------------------------


def test_mirror_of_a_real_block_manager_equals_its_cache() -> None:
    """Replay a BlockManager's events (prefix hits, eviction, clear) into a mirror: the router
    then predicts exactly the manager's own lookup for any prompt."""
    manager = BlockManager(num_blocks=12, block_size=BS, model_name="m")
    index = PrefixIndex()
    mirror = EventMirror(index, "w", BS)
    # The mirror joins late: a snapshot first, like a subscriber without since.
    rng = random.Random(7)
    prompts = [[rng.randrange(50) for _ in range(rng.randrange(1, 20))] for _ in range(5)]
    for i, p in enumerate(prompts[:2]):
        manager.admit(f"pre{i}", p)
        manager.mark_computed(f"pre{i}", len(p))
        manager.free(f"pre{i}")
    last, blocks = manager.snapshot()
    snapshot = {
        "id": last,
        "type": "snapshot",
        "block_size": BS,
        "blocks": [{"hash": x.hex(), "parent_hash": None} for x, _ in blocks],
    }
    assert mirror.apply(snapshot) == "ok"
    manager.add_listener(lambda e: mirror.apply(event_json(e, BS)))
    for i in range(60):
        base = prompts[rng.randrange(len(prompts))]
        p = base[: rng.randrange(1, len(base) + 1)] + [rng.randrange(50) for _ in range(3)]
        manager.admit(f"r{i}", p)
        manager.mark_computed(f"r{i}", len(p))
        for _ in range(rng.randrange(3)):
            manager.append_token(f"r{i}", rng.randrange(50))
        manager.free(f"r{i}")
        if i == 40:
            manager.clear_cache()
        for q in prompts:
            hashes = manager.hasher.hashes(q)
            assert index.overlaps(hashes, ["w"], 0.0)["w"] == manager.lookup(hashes)
    assert mirror.last_id == manager.last_event_id
    assert mirror.resyncs == 0


def test_mirror_asks_for_a_resync_on_a_gap_or_an_error_event() -> None:
    index = PrefixIndex()
    mirror = EventMirror(index, "w", BS)
    a = h(1, 2)
    assert mirror.apply({"id": 3, "type": "stored", "block_hashes": [a[0].hex()]}) == "resync"
    snap = {"id": 5, "type": "snapshot", "block_size": BS, "blocks": [{"hash": a[0].hex()}]}
    assert mirror.apply(snap) == "ok" and mirror.last_id == 5
    stored = {"id": 6, "type": "stored", "block_hashes": [a[1].hex()], "block_size": BS}
    assert mirror.apply(stored) == "ok"
    assert index.overlaps(a, ["w"], 0.0)["w"] == 2
    assert mirror.apply({"id": 8, "type": "removed", "block_hashes": [a[1].hex()]}) == "resync"
    assert mirror.last_id is None and mirror.resyncs == 2
    # Until the new snapshot, the old blocks stay: a guess beats forgetting everything.
    assert index.overlaps(a, ["w"], 0.0)["w"] == 2
    assert mirror.apply({**snap, "id": 9, "blocks": []}) == "ok"
    assert index.overlaps(a, ["w"], 0.0)["w"] == 0
    assert mirror.apply({"type": "error", "message": "behind"}) == "resync"
    assert mirror.resyncs == 3
    mirror.apply({**snap, "id": 10})
    assert mirror.apply({"id": 11, "type": "cleared"}) == "ok"
    assert index.blocks("w") == 0
    assert mirror.apply({"id": 12, "type": "something-new"}) == "ok" and mirror.last_id == 12


def test_mirror_refuses_another_block_size_and_malformed_events() -> None:
    mirror = EventMirror(PrefixIndex(), "http://w:1", 16)
    with pytest.raises(ConfigError, match=r"block_size 32.*router.block_size 16"):
        mirror.apply({"id": 1, "type": "snapshot", "block_size": 32, "blocks": []})
    with pytest.raises(ValueError, match="integer id"):
        mirror.apply({"type": "stored"})
    mirror.apply({"id": 1, "type": "snapshot", "block_size": 16, "blocks": []})
    with pytest.raises(ValueError, match="hex string"):
        mirror.apply({"id": 2, "type": "stored", "block_hashes": ["zz"]})
    with pytest.raises(ValueError, match="block_hashes"):
        mirror.apply({"id": 2, "type": "removed"})


# --- load, cost, choice ----------------------------------------------------------------------


def test_load_counts_shared_prompt_blocks_once() -> None:
    load = LoadTracker(BS)
    a = h(1, 2, 3)  # 3 full blocks
    load.start(1, "w", a, 3 * BS + 1)  # + a partial block
    load.start(2, "w", a, 3 * BS)
    assert load.in_flight("w") == 2
    assert load.active_blocks("w") == 3 + 1
    assert load.new_blocks("w", a, 3 * BS) == 0
    assert load.new_blocks("w", h(1, 7), 2 * BS) == 1
    load.add_output(2, 1)  # starts a new block
    assert load.active_blocks("w") == 5
    load.add_output(2, BS - 1)  # fills it
    assert load.active_blocks("w") == 5
    assert load.tokens("w") == 7 * BS + 1
    with pytest.raises(ValueError, match="already in flight"):
        load.start(1, "w", a, 1)
    load.finish(1)
    load.finish(1)  # idempotent
    assert load.active_blocks("w") == 4
    load.finish(2)
    assert (load.in_flight("w"), load.active_blocks("w"), load.tokens("w")) == (0, 0, 0)


def test_cost_prefers_cached_prefix_until_load_outweighs_it() -> None:
    load = LoadTracker(BS)
    prompt = h(*range(8))  # 8 blocks
    costs = score(["a", "b"], prompt, 8 * BS, {"a": 6}, load, 1.0)
    assert [c.cost for c in costs] == [2 + 8, 8 + 8]
    assert costs[0] == WorkerCost("a", 6, 2.0, 8, 10.0)
    # Busy with 20 unrelated blocks, "a" is no longer the cheaper one at weight 1 ...
    load.start(1, "a", h(*range(100, 120)), 20 * BS)
    costs = score(["a", "b"], prompt, 8 * BS, {"a": 6}, load, 1.0)
    assert pick(costs, 0.0, random.Random(0)).worker == "b"
    # ... but is at a prefill weight that values the cache more, and at weight 0 only load
    # counts.
    costs = score(["a", "b"], prompt, 8 * BS, {"a": 6}, load, 5.0)
    assert pick(costs, 0.0, random.Random(0)).worker == "a"
    assert [c.cost for c in score(["a", "b"], prompt, 8 * BS, {"a": 6}, load, 0.0)] == [28, 8]
    # The same prefix in flight on "a" makes its blocks free there.
    load.finish(1)
    load.start(2, "a", prompt, 8 * BS)
    costs = score(["a", "b"], prompt, 8 * BS, {}, load, 1.0)
    assert [c.decode_blocks for c in costs] == [8, 8]


def test_pick_breaks_ties_at_random_and_samples_by_softmax() -> None:
    costs = [WorkerCost(w, 0, 0.0, 0, c) for w, c in (("a", 1.0), ("b", 1.0), ("c", 3.0))]
    rng = random.Random(1)
    counts = Counter(pick(costs, 0.0, rng).worker for _ in range(400))
    assert set(counts) == {"a", "b"} and min(counts.values()) > 150
    counts = Counter(pick(costs, 1.0, rng).worker for _ in range(4000))
    # softmax(-cost): a, b each e^0 / (2 + e^-2) = 0.468, c 0.063
    assert abs(counts["c"] / 4000 - math.exp(-2) / (2 + math.exp(-2))) < 0.03
    counts = Counter(pick(costs, 1e6, rng).worker for _ in range(3000))
    assert min(counts.values()) > 800  # a huge temperature is nearly uniform
    huge = [WorkerCost("x", 0, 0.0, 0, 1e9), WorkerCost("y", 0, 0.0, 0, 0.0)]
    assert pick(huge, 0.5, rng).worker == "y"  # no overflow
    with pytest.raises(ValueError, match="no worker"):
        pick([], 0.0, rng)
    with pytest.raises(ValueError, match="temperature"):
        pick(costs, -1.0, rng)


def test_round_robin_skips_ineligible_workers() -> None:
    rr = RoundRobin(["a", "b", "c"])
    assert [rr.next(["a", "b", "c"]) for _ in range(4)] == ["a", "b", "c", "a"]
    assert [rr.next(["a", "c"]) for _ in range(3)] == ["c", "a", "c"]
    assert rr.next([]) is None


# --- SSE -------------------------------------------------------------------------------------


def test_sse_parser_splits_messages_across_any_chunking() -> None:
    events = [{"id": i, "type": "stored", "block_hashes": ["ab" * 16] * i} for i in range(1, 6)]
    body = b": keepalive\n\n" + b"".join(
        f"id: {e['id']}\ndata: {json.dumps(e)}\n\n".encode() for e in events
    )
    for size in (1, 2, 3, 7, 64, len(body)):
        parser = SseParser()
        out: list[str] = []
        for i in range(0, len(body), size):
            out += parser.feed(body[i : i + size])
        assert [json.loads(x) for x in out] == events
