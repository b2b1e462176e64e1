"""Conformance kit for eviction policies: the checks every ``kvferry.store.eviction.base.
EvictionPolicy`` must pass.

A policy's tests call :func:`check_policy` with a factory that builds a fresh policy (the
store builds one per tier with ``Policy()``, so ``load_policy(name)`` is such a factory). Each
check raises AssertionError naming the contract it saw broken. Keys are 16-byte ``bytes``, as
the store's are; the checks call the policy directly, as the store does under its lock.

Checks (the contract is the base module's docstring):

``check_empty``
    A fresh policy tracks nothing: ``len`` 0, no ``in``, no victims for any ``n``; unknown
    keys given to ``touch``, ``remove``, ``set_depth``, ``reorder`` and the batch forms are
    ignored (nothing becomes tracked). Two instances share no state.
``check_tracking``
    ``insert`` tracks a key (``len``, ``in``, ``tracked()``); inserting a present key adds
    nothing and orders as ``touch`` does (an access); ``remove`` (present, unknown, twice)
    and ``remove_many`` forget exactly their keys; removing everything leaves an empty
    policy.
``check_victims``
    ``victims(n, None)`` is ``n`` distinct tracked keys (all of them when ``n`` is larger,
    none when ``n <= 0``), the first ``n`` of one eviction order (``victims(n)`` is a prefix
    of ``victims(m)`` for ``n < m``), and removes nothing; ``skip=None`` and a skip that skips
    nothing give the same order.
``check_pinned``
    ``victims(n, skip)`` never returns a skipped (pinned) key and returns the first ``n``
    unskipped keys of the unpinned order; all pinned gives none; removing a victim takes it
    out of the order and leaves the rest of it as it was.
``check_one_key``
    A policy of one key evicts it, and nothing once it is pinned or removed.
``check_depths``
    A policy without ``uses_depth`` answers ``depth`` None; one with it records ``set_depth``
    for tracked keys only, forgets it with the key, and keeps it across a re-insert.
``check_reorder_tracks_the_same_keys``
    ``reorder`` (which counts no access) neither adds nor drops a tracked key.
``check_batches``
    ``insert_many``, ``touch_many``, ``remove_many``, ``insert_chain`` and ``touch_chain``
    leave exactly the state (tracked keys, eviction order, depths) that the base class's
    key-by-key definitions leave, over random sequences with repeats and unknown keys.
``check_tracked_view``
    ``tracked()`` is a live view: later inserts and removes show in it, and its ``in``
    answers as the policy's.
``check_many``
    Ten thousand keys: the order is a permutation of them, and pinning every other key
    leaves the others in the same relative order.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from kvferry.store.eviction.base import EvictionPolicy

__all__ = [
    "PolicyFactory",
    "check_batches",
    "check_depths",
    "check_empty",
    "check_many",
    "check_one_key",
    "check_pinned",
    "check_policy",
    "check_reorder_tracks_the_same_keys",
    "check_tracked_view",
    "check_tracking",
    "check_victims",
    "k",
]

PolicyFactory = Callable[[], EvictionPolicy[bytes]]
"""Builds a fresh, empty policy."""


def k(i: int) -> bytes:
    """A deterministic 16-byte key, as the store's keys are."""
    return i.to_bytes(16, "little")


def _order(p: EvictionPolicy[bytes]) -> list[bytes]:
    return p.victims(len(p), None)


def _fill(p: EvictionPolicy[bytes], n: int, *, touch_every: int = 3) -> list[bytes]:
    """Insert ``n`` keys and touch some, so that an order has something to show."""
    keys = [k(i) for i in range(n)]
    for key in keys:
        p.insert(key)
    for key in keys[::touch_every]:
        p.touch(key)
    return keys


def check_empty(factory: PolicyFactory) -> None:
    p = factory()
    assert len(p) == 0, f"a fresh policy tracks {len(p)} keys"
    assert k(1) not in p and k(1) not in p.tracked(), "a fresh policy answers `in` for a key"
    for n in (-1, 0, 1, 5):
        assert p.victims(n, None) == [], f"victims({n}) of an empty policy"
        assert p.victims(n, lambda key: False) == []
    p.touch(k(1))
    p.remove(k(2))
    p.set_depth(k(3), 4)
    p.reorder([k(4)])
    p.touch_many([k(5), k(6)])
    p.remove_many([k(7)])
    p.touch_chain([k(8), k(9)], 0)
    assert len(p) == 0 and _order(p) == [], "an unknown key became tracked"
    assert all(key not in p for key in map(k, range(10))), "an unknown key became tracked"
    assert p.depth(k(3)) is None, "set_depth recorded a depth for an unknown key"
    other = factory()
    p.insert(k(1))
    assert len(other) == 0 and k(1) not in other, "two instances share their keys"


def check_tracking(factory: PolicyFactory) -> None:
    p = factory()
    keys = _fill(p, 6)
    assert len(p) == 6, f"6 keys inserted, {len(p)} tracked"
    assert all(key in p for key in keys) and all(key in p.tracked() for key in keys)
    p.insert(keys[2])  # present: an access, not a second entry
    assert len(p) == 6, "inserting a present key added an entry"
    touched = factory()
    _fill(touched, 6)
    touched.touch(keys[2])
    assert _order(p) == _order(touched), "inserting a present key is not the access touch is"
    assert sorted(_order(p)) == sorted(keys), "victims(len) is not every tracked key once"
    p.remove(keys[0])
    p.remove(keys[0])  # twice: ignored
    p.remove(k(99))  # unknown: ignored
    assert len(p) == 5 and keys[0] not in p, "remove did not forget exactly its key"
    assert keys[0] not in _order(p), "a removed key is still a victim"
    p.remove_many([keys[1], k(98), keys[1]])
    assert len(p) == 4 and keys[1] not in p, "remove_many did not forget exactly its keys"
    p.remove_many(keys)
    assert len(p) == 0 and _order(p) == [], "removing every key left some tracked"
    p.insert(keys[0])
    assert _order(p) == [keys[0]], "a policy emptied by removes does not track again"


def check_victims(factory: PolicyFactory) -> None:
    p = factory()
    _fill(p, 8)
    full = _order(p)
    assert len(full) == len(set(full)) == 8, f"victims repeat a key: {full}"
    for n in range(-1, 11):
        got = p.victims(n, None)
        want = full[: max(0, n)]
        assert got == want, f"victims({n}) = {got}, not the first {n} of the order {full}"
        assert p.victims(n, lambda key: False) == got, "skip=None and skip-nothing differ"
    assert len(p) == 8 and _order(p) == full, "victims changed the policy"


def check_pinned(factory: PolicyFactory) -> None:
    p = factory()
    keys = _fill(p, 10)
    full = _order(p)
    pinned = {keys[0], keys[3], keys[4], full[0]}

    def skip(key: bytes) -> bool:
        return key in pinned

    unpinned = [key for key in full if key not in pinned]
    for n in range(0, 12):
        got = p.victims(n, skip)
        assert not pinned & set(got), f"victims({n}) returned a pinned key"
        assert got == unpinned[:n], f"victims({n}, pinned) = {got}, not {unpinned[:n]}"
    assert p.victims(10, lambda key: True) == [], "victims returned a key when all are pinned"
    gone = unpinned[0]
    p.remove(gone)
    left = [key for key in full if key != gone]
    assert _order(p) == left, "removing a victim reordered the others"


def check_one_key(factory: PolicyFactory) -> None:
    p = factory()
    p.insert(k(1))
    assert p.victims(1, None) == [k(1)] and p.victims(5, None) == [k(1)]
    assert p.victims(1, lambda key: key == k(1)) == [], "a pinned key was a victim"
    p.touch(k(1))
    assert p.victims(1, None) == [k(1)]
    p.remove(k(1))
    assert p.victims(1, None) == [] and len(p) == 0


def check_depths(factory: PolicyFactory) -> None:
    p = factory()
    keys = _fill(p, 4)
    if not p.uses_depth:
        p.set_depth(keys[0], 3)
        p.insert_chain([k(10), k(11)], 5)
        assert p.depth(keys[0]) is None and p.depth(k(11)) is None, (
            "a policy without uses_depth answered a depth"
        )
        assert k(10) in p and k(11) in p, "insert_chain did not insert"
        return
    for d, key in enumerate(keys):
        p.set_depth(key, d)
    assert [p.depth(key) for key in keys] == [0, 1, 2, 3], "set_depth was not recorded"
    assert p.depth(k(50)) is None, "an unknown key has a depth"
    p.set_depth(k(50), 1)
    assert k(50) not in p and p.depth(k(50)) is None, "set_depth of an unknown key tracked it"
    p.insert(keys[2])  # a present key again: its depth in the chain does not change
    assert p.depth(keys[2]) == 2, "a re-insert lost the key's depth"
    p.remove(keys[1])
    assert p.depth(keys[1]) is None, "a removed key kept its depth"
    p.insert(keys[1])
    assert p.depth(keys[1]) is None, "a key removed and inserted again has its old depth"
    p.insert_chain([k(20), k(21), k(22)], 7)
    assert [p.depth(key) for key in (k(20), k(21), k(22))] == [7, 8, 9]
    p.remove_many([k(21)])
    assert p.depth(k(21)) is None, "remove_many left a depth behind"


def _state(p: EvictionPolicy[bytes], universe: list[bytes]) -> tuple[object, ...]:
    return (len(p), _order(p), [p.depth(key) for key in universe])


def check_batches(factory: PolicyFactory, *, seed: int = 0, steps: int = 300) -> None:
    """The batch forms leave the state their key-by-key definitions leave."""
    rng = random.Random(seed)
    fast, slow = factory(), factory()
    universe = [k(i) for i in range(40)]
    next_key = 1000
    ops = ["insert_many", "touch_many", "remove_many", "insert_chain", "touch_chain"]
    for step in range(steps):
        keys = [rng.choice(universe) for _ in range(rng.randint(0, 8))]
        if rng.random() < 0.5:  # mostly fresh blocks, as a store's put sends them
            keys = [k(next_key + i) for i in range(len(keys))]
            next_key += len(keys)
            universe.extend(keys)
        op = rng.choice(ops)
        if op.endswith("_chain"):
            depth = rng.choice([0, 1, 3])
            getattr(fast, op)(keys, depth)
            getattr(EvictionPolicy, op)(slow, keys, depth)
        else:
            getattr(fast, op)(keys)
            getattr(EvictionPolicy, op)(slow, keys)
        assert _state(fast, universe) == _state(slow, universe), (
            f"step {step}: {op}({len(keys)} keys) left another state than its definition"
        )


def check_reorder_tracks_the_same_keys(factory: PolicyFactory) -> None:
    """``reorder`` counts no access and tracks no new key: the tracked set is unchanged."""
    p = factory()
    keys = _fill(p, 8)
    before = sorted(_order(p))
    p.reorder([keys[5], k(77), keys[1]])
    assert sorted(_order(p)) == before and k(77) not in p, "reorder changed the tracked keys"


def check_tracked_view(factory: PolicyFactory) -> None:
    p = factory()
    view = p.tracked()
    p.insert_many([k(1), k(2), k(3)])
    p.insert_chain([k(4)], 0)
    p.remove_many([k(2)])
    probe = [k(i) for i in range(1, 6)]
    assert [key in view for key in probe] == [True, False, True, True, False], (
        "tracked() is not a live view of the keys"
    )
    assert [key in view for key in probe] == [key in p for key in probe]


def check_many(factory: PolicyFactory, n: int = 10_000) -> None:
    p = factory()
    keys = [k(i) for i in range(n)]
    p.insert_many(keys)
    p.touch_many(keys[::7])
    full = _order(p)
    assert len(full) == n and set(full) == set(keys), "the order is not a permutation"
    odd = set(keys[1::2])
    got = p.victims(n, odd.__contains__)
    assert got == [key for key in full if key not in odd], "pinning reordered the others"


def check_policy(factory: PolicyFactory, *, seeds: int = 3) -> None:
    """Run every check on fresh policies from ``factory``."""
    check_empty(factory)
    check_tracking(factory)
    check_victims(factory)
    check_pinned(factory)
    check_one_key(factory)
    check_depths(factory)
    check_reorder_tracks_the_same_keys(factory)
    for seed in range(seeds):
        check_batches(factory, seed=seed)
    check_tracked_view(factory)
    check_many(factory)
