"""Prefix-friendly placement (``server.chunk_blocks``) and replication (``server.replicas``).

The pure placement first (anchors, ring walks, the memo), then real store server processes
killed with SIGKILL under a real TieredStore: what a prefix lookup still finds is what the
placement says survives, computed from the same ring.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator

import pytest

from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.server.client import ServerTier
from kvferry.backends.server.placement import Placement, chunk_anchors
from kvferry.backends.server.ring import HashRing
from kvferry.config import load_config
from kvferry.config.models import KvferryConfig, ServerTierConfig, StoreConfig
from kvferry.errors import ConfigError
from kvferry.store import TieredStore
from kvferry.testing.store_server import StoreServerProcess
from kvferry.testing.tier_kit import key, value

SLOT = 4096
MEMBERS = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]


def chain(prefix: int, n: int) -> list[bytes]:
    """``n`` keys of one prefix (distinct per ``prefix``)."""
    return [key(prefix * 100_000 + i) for i in range(n)]


# -- pure placement ---------------------------------------------------------------------------
def test_chunk_anchors_are_the_first_key_of_each_depth_aligned_chunk() -> None:
    ks = chain(0, 10)
    assert chunk_anchors(ks, 0, 4) == [ks[0]] * 4 + [ks[4]] * 4 + [ks[8]] * 2
    # From depth 6: blocks 6 and 7 belong to a chunk that began before the call.
    assert chunk_anchors(ks[:5], 6, 4) == [None, None, ks[2], ks[2], ks[2]]
    assert chunk_anchors(ks, 3, 1) == ks
    with pytest.raises(ValueError, match="chunk_blocks"):
        chunk_anchors(ks, 0, 0)


def test_ring_owners_walk_distinct_members_and_survive_a_removal() -> None:
    full = HashRing(MEMBERS)
    for i in range(200):
        k = key(i)
        owners = full.owners(k, 2)
        assert len(set(owners)) == 2 and owners[0] == full.owner(k)
        assert full.owners(k, 5) == full.owners(k, 3) and len(full.owners(k, 5)) == 3
        # Without one of its owners, the other keeps its place in the walk (reads find it).
        smaller = HashRing([m for m in MEMBERS if m != owners[0]])
        assert smaller.owners(k, 2)[0] == owners[1]


def test_placement_keeps_chunks_together_and_reads_fall_back_to_the_own_key() -> None:
    ring = HashRing(MEMBERS)
    place = Placement(chunk_blocks=4, replicas=1)
    ks = chain(1, 12)
    # Unknown chains: each block by its own key, as with chunk_blocks=1.
    assert place.writers(ring, ks) == [[ring.owner(k)] for k in ks]
    place.note_chain(ks, 0)
    writers = place.writers(ring, ks)
    assert writers == [[ring.owner(ks[c])] for c in (0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8)]
    for k, w, r in zip(ks, writers, place.readers(ring, ks)):
        assert r[0] == w[0]
        assert r[1:] == ([] if ring.owner(k) == w[0] else [ring.owner(k)])
    # The memo is bounded: the oldest anchors go first.
    small = Placement(chunk_blocks=4, replicas=1, memo_blocks=4)
    small.note_chain(ks, 0)
    assert small.anchor(ks[1]) == ks[1] and small.anchor(ks[11]) == ks[8]
    two = Placement(chunk_blocks=4, replicas=2)
    two.note_chain(ks, 0)
    assert two.writers(ring, ks)[5] == ring.owners(ks[4], 2)


# -- real servers -----------------------------------------------------------------------------
@pytest.fixture
def servers() -> Iterator[Callable[[int], list[StoreServerProcess]]]:
    started: list[StoreServerProcess] = []

    def start(n: int) -> list[StoreServerProcess]:
        more = [StoreServerProcess(slot_size=SLOT, capacity="8MiB").start() for _ in range(n)]
        started.extend(more)
        return more

    yield start
    for s in started:
        s.kill()


def tier(addresses: list[str], chunk_blocks: int, replicas: int = 1, fanout: int = 8) -> ServerTier:
    cfg = ServerTierConfig(
        addresses=addresses,
        chunk_blocks=chunk_blocks,
        replicas=replicas,
        transport="tcp",
        timeout=2.0,
        fanout=fanout,
    )
    return ServerTier(cfg, TierContext(slot_size=SLOT))


def store_over(remote: ServerTier) -> TieredStore:
    cfg = KvferryConfig(store=StoreConfig(slot_size=SLOT, tiers=["server"]))
    return TieredStore(cfg, tiers=[remote])


def held_by(address: str) -> set[bytes]:
    one = tier([address], 1)
    try:
        return set(one.keys())
    finally:
        one.close()


def fill(store: TieredStore, prefixes: int, blocks: int, first: int = 0) -> list[list[bytes]]:
    out = []
    for p in range(first, first + prefixes):
        ks = chain(p, blocks)
        vals = [value(p * 100_000 + i, 256) for i in range(blocks)]
        assert store.put(ks, vals, depth=0) == [PutStatus.STORED] * blocks
        out.append(ks)
    return out


def test_a_chunk_lives_on_one_server_and_every_client_finds_it(
    servers: Callable[[int], list[StoreServerProcess]],
) -> None:
    addrs = [s.address for s in servers(3)]
    writer = tier(addrs, chunk_blocks=8)
    with store_over(writer) as store:
        # A put that starts inside a chunk (blocks 5..7 of chunk 0) after a lookup of the whole
        # prompt, as an engine saves the new blocks of a request after a partial hit.
        ks = chain(7, 24)
        assert store.put(ks[:5], [b"a" * 64] * 5, depth=0) == [PutStatus.STORED] * 5
        assert store.lookup(ks) == 5
        assert store.put(ks[5:], [b"b" * 64] * 19, depth=5) == [PutStatus.STORED] * 19
    where = {a: held_by(a) for a in addrs}
    for c in range(3):
        chunk = set(ks[c * 8 : c * 8 + 8])
        assert [a for a in addrs if chunk <= where[a]] == [writer._ring.owner(ks[c * 8])]
        assert sum(len(chunk & where[a]) for a in addrs) == 8, "one copy, on one server"
    writer.close()
    # Another client (no memo of its own) follows the same placement from its lookup.
    reader = tier(addrs, chunk_blocks=8)
    with store_over(reader) as store:
        assert store.lookup(ks) == 24
        outs = [memoryview(bytearray(SLOT)) for _ in ks]
        assert store.get(ks, outs, depth=0) == [64] * 24
        assert bytes(outs[6][:64]) == b"b" * 64
    # Blocks put with no chain known (placed by their own key) are found by the fallback read.
    loose = tier(addrs, chunk_blocks=8)
    more = chain(8, 16)
    assert loose.put(more, [b"c" * 64] * 16) == [PutStatus.STORED] * 16
    loose.close()
    reader = tier(addrs, chunk_blocks=8)
    with store_over(reader) as store:
        assert store.lookup(more) == 16


@pytest.mark.parametrize("chunk_blocks", [1, 16])
def test_a_dead_server_cuts_each_prefix_at_its_first_chunk_there(
    servers: Callable[[int], list[StoreServerProcess]], chunk_blocks: int
) -> None:
    procs = servers(3)
    addrs = [s.address for s in procs]
    remote = tier(addrs, chunk_blocks)
    with store_over(remote) as store:
        prefixes = fill(store, 30, 32)
        assert [store.lookup(ks) for ks in prefixes] == [32] * 30
        dead = procs[0]
        dead.kill()
        got = [store.lookup(ks) for ks in prefixes]
        ring = HashRing(addrs)
        want = []
        for ks in prefixes:
            owners = [ring.owner(ks[i - i % chunk_blocks]) for i in range(32)]
            want.append(owners.index(dead.address) if dead.address in owners else 32)
        assert got == want  # exactly what the placement says survives
        st = store.stats().tiers["server"]
        assert (st.errors, st.breaker_opens) == (0, 0), "no call failed as a whole"
    hit = sum(got) / (30 * 32)
    if chunk_blocks == 1:
        assert hit < 0.25  # nearly every prefix cut within its first few blocks
    else:  # two chunks per prefix: about (2/3 + 2/3 * 2/3) / 2 = 0.56 of the blocks survive
        assert hit > 0.2  # (loose: one ring can give the dead server well over a third)


def test_two_replicas_lose_no_hit_when_a_server_dies(
    servers: Callable[[int], list[StoreServerProcess]],
) -> None:
    procs = servers(3)
    addrs = [s.address for s in procs]
    remote = tier(addrs, chunk_blocks=16, replicas=2)
    with store_over(remote) as store:
        prefixes = fill(store, 20, 32)
        copies = sum(len(held_by(a)) for a in addrs)
        assert copies == 2 * 20 * 32, "each block on two servers"
        procs[1].kill()
        assert [store.lookup(ks) for ks in prefixes] == [32] * 20
        for p, ks in enumerate(prefixes):
            outs = [memoryview(bytearray(SLOT)) for _ in ks]
            assert store.get(ks, outs, depth=0) == [256] * 32
            assert [bytes(o[:256]) for o in outs] == [
                value(p * 100_000 + i, 256) for i in range(32)
            ]
        # Writes go on to two live servers; the dead one never fails a call.
        extra = fill(store, 1, 8, first=99)[0]
        assert store.lookup(extra) == 8
        st = store.stats().tiers["server"]
        assert (st.errors, st.breaker_opens) == (0, 0)
        assert remote.stats().extra["put_dropped"] == 0
        assert remote.down_members() == [procs[1].address]


def test_bad_placement_config_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match=r"server\.replicas=3 but server\.addresses lists 2"):
        load_config(flags={"server.replicas": "3", "server.addresses": "a:1,b:2"}, environ={})
    with pytest.raises(ConfigError, match="chunk_blocks"):
        load_config(flags={"server.chunk_blocks": "0"}, environ={})
    with pytest.raises(ConfigError, match="replicas"):
        load_config(flags={"server.replicas": "two"}, environ={})
    # With a membership the count of servers is known only at run time: allowed.
    ok = load_config(
        flags={"server.replicas": "3", "server.membership_url": "redis://x:1/0"}, environ={}
    )
    assert ok.config.server.replicas == 3


def test_a_batch_over_several_servers_asks_them_in_parallel_with_the_same_answers(
    servers: Callable[[int], list[StoreServerProcess]],
) -> None:
    procs = servers(3)
    addrs = [s.address for s in procs]
    ks = [key(700_000 + i) for i in range(300)]
    vals = [value(700_000 + i, 512) for i in range(300)]
    # chunk_blocks=1: every block by its own key, so each call spans all three servers.
    fanned, serial = tier(addrs, 1), tier(addrs, 1, fanout=1)
    try:
        assert fanned.put(ks[:150], vals[:150]) == [PutStatus.STORED] * 150
        assert serial.put(ks[150:], vals[150:]) == [PutStatus.STORED] * 150
        for t in (fanned, serial):
            outs = [memoryview(bytearray(SLOT)) for _ in ks]
            assert t.get(ks, outs) == [512] * 300
            assert all(bytes(o[:512]) == v for o, v in zip(outs, vals))
            assert t.contains([*ks, key(1)]) == [True] * 300 + [False]
        # The caller's mistake in one server's share is raised, whichever thread asked it.
        small = [memoryview(bytearray(SLOT)) for _ in ks[:-1]] + [memoryview(bytearray(8))]
        with pytest.raises(ValueError, match="smaller"):
            fanned.get(ks, small)
        # A frozen server (SIGSTOP: connections accepted, never answered) costs its own share
        # only: the others' blocks come back, and it is marked down.
        on_frozen = set(fanned._ring.split(ks)[addrs[0]])
        procs[0].proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        outs = [memoryview(bytearray(SLOT)) for _ in ks]
        got = fanned.get(ks, outs)
        assert fanned.down_members() == [addrs[0]]
        live = [i for i in range(300) if i not in on_frozen]
        assert on_frozen and live
        assert all(got[i] == 512 and bytes(outs[i][:512]) == vals[i] for i in live)
    finally:
        procs[0].proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        fanned.close()
        serial.close()
