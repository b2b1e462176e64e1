"""The mock engine's paged KV block manager: prefix hits, LRU eviction, admission, KV events."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvferry.index.hashing import BlockHasher
from kvferry.serving.mock.blocks import BlockManager, KvEvent

MODEL = "m"
BS = 4


def manager(num_blocks: int, block_size: int = BS) -> tuple[BlockManager, list[KvEvent]]:
    m = BlockManager(num_blocks, block_size, model_name=MODEL)
    events: list[KvEvent] = []
    m.add_listener(events.append)
    return m, events


def hashes(tokens: list[int], block_size: int = BS, salt: str = "") -> list[bytes]:
    return BlockHasher(block_size, model_name=MODEL, cache_salt=salt).hashes(tokens)


def run(m: BlockManager, rid: str, tokens: list[int]) -> int:
    """Admit, compute the whole prompt, free; return the hit blocks."""
    adm = m.admit(rid, tokens)
    assert adm.admitted
    m.mark_computed(rid, len(tokens))
    m.free(rid)
    return adm.hit_blocks


def test_repeated_prompt_hits_every_full_block_and_events_carry_its_hashes() -> None:
    m, events = manager(16)
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    assert run(m, "a", tokens) == 0
    assert events == [KvEvent(1, "stored", tuple(hashes(tokens)), None, 2 * BS)]
    assert run(m, "b", tokens) == 2
    s = m.stats()
    assert (s.lookup_blocks, s.hit_blocks, s.hit_rate) == (4, 2, 0.5)
    assert s.request_hit_rate_mean == 0.5
    assert len(events) == 1  # a hit publishes nothing new


def test_shared_prefix_hits_only_its_blocks() -> None:
    m, events = manager(16)
    a = list(range(12))
    b = [*a[:8], 100, 101, 102, 103]
    run(m, "a", a)
    assert run(m, "b", b) == 2
    # b's third block is new: stored with the parent hash of the shared second block.
    assert events[-1] == KvEvent(2, "stored", (hashes(b)[2],), hashes(a)[1], BS)
    assert hashes(b)[:2] == hashes(a)[:2]


def test_blocks_are_published_only_once_computed() -> None:
    m, _ = manager(16)
    tokens = list(range(8))
    assert m.admit("a", tokens).admitted
    assert m.lookup(hashes(tokens)) == 0
    m.mark_computed("a", 5)  # first block done, second not
    assert m.lookup(hashes(tokens)) == 1
    adm = m.admit("b", tokens)
    assert adm.hit_blocks == 1
    assert m.ref_count(m.block_ids("a")[0]) == 2  # shared by both running requests


def test_admission_fails_without_blocks_and_changes_nothing() -> None:
    m, events = manager(4)
    assert m.admit("a", list(range(9))).admitted  # 9 tokens + 1 reserved = 3 blocks
    before = m.stats()
    adm = m.admit("b", list(range(100, 105)))  # 5 + 1 = 2 blocks, 1 free
    assert not adm.admitted and adm.new_blocks == 2
    assert m.stats() == before
    assert "b" not in m and events == []
    m.free("a")
    assert m.admit("b", list(range(100, 105))).admitted


def test_eviction_is_lru_tail_first_and_an_evicted_prefix_misses() -> None:
    m, events = manager(6)
    a = list(range(12))  # 3 full blocks (+1 reserved while running)
    run(m, "a", a)
    assert (m.cached_blocks, m.free_blocks) == (3, 3)
    b = list(range(100, 119))  # 19 tokens + 1 = 5 blocks: 3 free + 2 evicted
    run(m, "b", b)
    ha = hashes(a)
    assert events[1] == KvEvent(2, "removed", (ha[2], ha[1]))
    assert events[2].kind == "stored" and events[2].block_hashes == tuple(hashes(b))
    assert m.stats().evicted_blocks == 2
    assert m.lookup(ha) == 1  # only the first block of a is left
    assert run(m, "a2", a) == 1


def test_hit_blocks_in_the_pool_are_not_counted_as_free() -> None:
    m, _ = manager(4)
    a = list(range(8))
    run(m, "a", a)  # 2 cached, 2 free
    # a + 4 tokens + 1 reserved = 4 blocks, 2 of them hits: fits exactly.
    adm = m.admit("b", [*a, 1, 2, 3, 4])
    assert adm.admitted and adm.hit_blocks == 2 and adm.new_blocks == 2
    assert (m.used_blocks, m.cached_blocks, m.free_blocks) == (4, 0, 0)


def test_output_tokens_fill_blocks_that_are_published_with_their_parent() -> None:
    m, events = manager(8)
    prompt = list(range(6))
    m.admit("a", prompt)
    m.mark_computed("a", 6)
    assert events[-1].block_hashes == (hashes(prompt)[0],)
    assert m.append_token("a", 50)
    assert m.append_token("a", 51)  # fills block 1 with tokens 4, 5, 50, 51
    full = hashes([*prompt, 50, 51])
    assert events[-1] == KvEvent(2, "stored", (full[1],), full[0], BS)
    assert m.num_tokens("a") == 8 and len(m.block_ids("a")) == 2
    assert m.append_token("a", 52)  # takes a third block
    assert len(m.block_ids("a")) == 3


def test_append_token_reports_no_block_and_changes_nothing() -> None:
    m, _ = manager(2)
    m.admit("a", list(range(7)))  # 7 + 1 = 2 blocks: all of them
    m.mark_computed("a", 7)
    assert m.append_token("a", 1)  # the reserved slot
    before = (m.num_tokens("a"), m.block_ids("a"), m.stats())
    assert not m.append_token("a", 2)
    assert (m.num_tokens("a"), m.block_ids("a"), m.stats()) == before


def test_same_prompt_admitted_twice_before_compute_keeps_one_published_copy() -> None:
    m, events = manager(8)
    tokens = list(range(8))
    m.admit("a", tokens)
    m.admit("b", tokens)  # a is not computed yet: no hit, its own blocks
    m.mark_computed("a", 8)
    m.mark_computed("b", 8)
    assert [e.kind for e in events] == ["stored"]  # b's copies stay unpublished duplicates
    m.free("a")
    m.free("b")
    assert (m.cached_blocks, m.free_blocks, m.used_blocks) == (2, 6, 0)
    assert run(m, "c", tokens) == 2


def test_cache_salt_separates_tenants() -> None:
    m, _ = manager(16)
    tokens = list(range(8))
    t1 = BlockHasher(BS, model_name=MODEL, cache_salt="t1")
    m.admit("a", tokens, hasher=t1)
    m.mark_computed("a", 8)
    m.free("a")
    assert m.admit("b", tokens).hit_blocks == 0
    assert m.admit("c", tokens, hasher=t1).hit_blocks == 2
    assert m.lookup(hashes(tokens, salt="t1")) == 2


def test_clear_cache_unpublishes_everything() -> None:
    m, events = manager(8)
    run(m, "a", list(range(8)))
    m.admit("b", list(range(100, 108)))
    m.mark_computed("b", 8)
    assert m.clear_cache() == 4
    assert events[-1] == KvEvent(3, "cleared")
    assert m.lookup(hashes(list(range(8)))) == 0
    assert m.snapshot() == (3, [])
    assert m.used_blocks == 2 + 1 and m.cached_blocks == 0  # b still runs
    m.free("b")
    assert m.free_blocks == 8


def test_snapshot_lists_published_hashes_with_parents() -> None:
    m, _ = manager(8)
    tokens = list(range(8))
    run(m, "a", tokens)
    h = hashes(tokens)
    assert m.snapshot() == (1, [(h[0], None), (h[1], h[0])])


def test_bad_calls_raise() -> None:
    m, _ = manager(8)
    m.admit("a", [1])
    with pytest.raises(ValueError, match="already running"):
        m.admit("a", [1])
    with pytest.raises(ValueError, match="at least one token"):
        m.admit("b", [])
    with pytest.raises(ValueError, match="tokens_per_block 16"):
        m.admit("b", [1], hasher=BlockHasher(16))
    with pytest.raises(ValueError, match="cannot mark 5 computed"):
        m.mark_computed("a", 5)
    with pytest.raises(KeyError):
        m.free("nope")
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0)


# --- property test ---------------------------------------------------------------------------

# Prompts from a few shared prefixes, so hits, partial hits and evictions all happen.
PREFIXES = [list(range(i * 100, i * 100 + 12)) for i in range(3)]
prompts = st.tuples(
    st.integers(0, len(PREFIXES) - 1),
    st.integers(1, 12),
    st.lists(st.integers(0, 5), max_size=7),
).map(lambda t: PREFIXES[t[0]][: t[1]] + t[2])


class BlockMachine(RuleBasedStateMachine):
    """Random admit / compute / append / free sequences against a shadow copy of what every
    physical block holds."""

    def __init__(self) -> None:
        super().__init__()
        self.m = BlockManager(10, BS, model_name=MODEL)
        self.mirror: set[bytes] = set()
        self.m.add_listener(self._on_event)
        self.content: dict[int, tuple[int, ...]] = {}
        """Physical block -> the token prefix whose last block it holds (as computed)."""
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.next_id = 0
        self.last_event = 0

    def _on_event(self, event: KvEvent) -> None:
        assert event.event_id == self.last_event + 1
        self.last_event = event.event_id
        if event.kind == "stored":
            assert not set(event.block_hashes) & self.mirror
            self.mirror.update(event.block_hashes)
        elif event.kind == "removed":
            assert set(event.block_hashes) <= self.mirror
            self.mirror.difference_update(event.block_hashes)
        else:
            self.mirror.clear()

    def _write(self, rid: str, upto: int) -> None:
        """Record the KV of the full blocks of ``rid`` among its first ``upto`` tokens."""
        tokens = self.tokens[rid]
        blocks = self.m.block_ids(rid)
        for i in range(self.computed[rid] // BS, upto // BS):
            self.content[blocks[i]] = tuple(tokens[: (i + 1) * BS])
        self.computed[rid] = max(self.computed[rid], upto)

    @rule(tokens=prompts)
    def admit(self, tokens: list[int]) -> None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        adm = self.m.admit(rid, tokens)
        if not adm.admitted:
            assert rid not in self.m
            return
        blocks = self.m.block_ids(rid)
        for i in range(adm.hit_blocks):
            # A hit block really holds this prefix's KV, and its hash matches the tokens.
            assert self.content[blocks[i]] == tuple(tokens[: (i + 1) * BS])
            assert self.m.block_hash(blocks[i]) == hashes(tokens)[i]
        self.tokens[rid] = list(tokens)
        self.computed[rid] = adm.hit_blocks * BS

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        upto = data.draw(st.integers(self.computed[rid], len(self.tokens[rid])))
        self._write(rid, upto)
        self.m.mark_computed(rid, upto)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), token=st.integers(0, 5))
    def append(self, data: st.DataObject, token: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        if self.computed[rid] < len(self.tokens[rid]):
            self._write(rid, len(self.tokens[rid]))
            self.m.mark_computed(rid, len(self.tokens[rid]))
        if self.m.append_token(rid, token):
            self.tokens[rid].append(token)
            self._write(rid, len(self.tokens[rid]))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.m.free(rid)
        del self.tokens[rid]
        del self.computed[rid]

    @rule()
    def clear(self) -> None:
        self.m.clear_cache()

    @invariant()
    def counts_add_up(self) -> None:
        m = self.m
        assert m.used_blocks + m.free_blocks + m.cached_blocks == m.num_blocks
        held: dict[int, int] = {}
        for rid in self.tokens:
            for b in m.block_ids(rid):
                held[b] = held.get(b, 0) + 1
        for b in range(m.num_blocks):
            assert m.ref_count(b) >= 0
            assert m.ref_count(b) == held.get(b, 0)
        assert m.used_blocks == len(held)

    @invariant()
    def published_hashes_match_their_tokens(self) -> None:
        _, snapshot = self.m.snapshot()
        published = {h for h, _ in snapshot}
        assert published == self.mirror  # events replayed == what the manager holds
        for b in range(self.m.num_blocks):
            h = self.m.block_hash(b)
            if h is not None:
                assert hashes(list(self.content[b]))[-1] == h


TestBlockMachine = BlockMachine.TestCase
TestBlockMachine.settings = settings(
    max_examples=75,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
