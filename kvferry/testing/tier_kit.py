"""Conformance kit for storage tiers: the checks every ``kvferry.backends.base.Tier`` must pass.

A tier's tests call :func:`check_tier` with a factory that builds a fresh, empty tier (capacity
of at least ``min_blocks`` blocks of ``slot_size`` bytes). Each check raises AssertionError with
the contract it saw broken. The kit stores real bytes and reads them back; nothing is faked.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kvferry.backends.base import PutStatus, SlotTier, Tier
from kvferry.index.keys import KEY_BYTES

TierFactory = Callable[[], Tier]


def key(i: int, salt: int = 0) -> bytes:
    """A deterministic 16-byte key."""
    return (i.to_bytes(8, "little") + salt.to_bytes(8, "little"))[:KEY_BYTES]


def value(i: int, size: int) -> bytes:
    """Deterministic bytes for block ``i`` (every byte depends on i, so a swapped block shows)."""
    seed = i.to_bytes(8, "little") * 8
    reps = size // len(seed) + 1
    return (seed * reps)[:size]


def check_roundtrip(tier: Tier, n: int, size: int) -> None:
    keys = [key(i) for i in range(n)]
    vals = [value(i, size - (i % 3)) for i in range(n)]
    assert tier.contains(keys) == [False] * n, "a fresh tier must be empty"
    status = tier.put(keys, vals)
    assert status == [PutStatus.STORED] * n, f"put into an empty tier: {status}"
    assert tier.contains(keys) == [True] * n
    assert tier.used_blocks >= n
    outs = [memoryview(bytearray(size)) for _ in range(n)]
    got = tier.get(keys, outs)
    assert got == [len(v) for v in vals], f"get lengths {got}"
    for i, (out, v) in enumerate(zip(outs, vals)):
        assert bytes(out[: len(v)]) == v, f"block {i} came back with other bytes"
    # EXISTS leaves the bytes alone
    again = tier.put(keys[:1], [b"x" * len(vals[0])])
    assert again == [PutStatus.EXISTS], f"second put of a key: {again}"
    out = memoryview(bytearray(size))
    assert tier.get(keys[:1], [out]) == [len(vals[0])]
    assert bytes(out[: len(vals[0])]) == vals[0], "a second put changed a stored block"


def check_miss_and_delete(tier: Tier, size: int) -> None:
    a, b, c = key(1, 7), key(2, 7), key(3, 7)
    assert tier.put([a, b], [value(1, size), value(2, size)]) == [PutStatus.STORED] * 2
    outs = [memoryview(bytearray(size)) for _ in range(3)]
    assert tier.get([a, c, b], outs) == [size, None, size], "a miss must be None, in place"
    assert bytes(outs[2]) == value(2, size)
    assert tier.delete([a, c]) == 1, "delete counts only present keys"
    assert tier.contains([a, b, c]) == [False, True, False]
    assert tier.get([a], [memoryview(bytearray(size))]) == [None]
    try:
        present = set(tier.keys())
    except NotImplementedError:  # allowed for shared tiers that cannot list
        present = {b}
    assert b in present and a not in present, "keys() must list exactly the present blocks"
    assert tier.delete([b]) == 1


def check_bad_input(tier: Tier, slot_size: int) -> None:
    k = key(99, 3)
    if tier.capacity_blocks is not None:
        try:
            tier.put([k], [b"z" * (slot_size + 1)])
        except ValueError:
            pass
        else:
            raise AssertionError("a value larger than the slot size must raise ValueError")
        assert tier.contains([k]) == [False], "a refused put must store nothing"
    assert tier.put([k], [value(5, 64)]) == [PutStatus.STORED]
    try:
        tier.get([k], [memoryview(bytearray(8))])
    except ValueError:
        pass
    else:
        raise AssertionError("get into a buffer smaller than the block must raise ValueError")
    tier.delete([k])


def check_full(tier: Tier, slot_size: int) -> None:
    cap = tier.capacity_blocks
    if cap is None:
        return
    keys = [key(i, 11) for i in range(cap + 3)]
    vals = [value(i, slot_size) for i in range(cap + 3)]
    status = tier.put(keys, vals)
    stored = status.count(PutStatus.STORED)
    assert stored == cap, f"{cap} slots, stored {stored}"
    assert status[cap:] == [PutStatus.NO_SPACE] * 3, "a full tier answers NO_SPACE"
    outs = [memoryview(bytearray(slot_size)) for _ in range(cap)]
    assert tier.get(keys[:cap], outs) == [slot_size] * cap
    for i in range(cap):
        assert bytes(outs[i]) == vals[i], f"block {i} corrupted by a put into a full tier"
    assert tier.delete(keys[:cap]) == cap


def check_threads(tier: Tier, size: int, threads: int = 4, rounds: int = 20) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for r in range(rounds):
                keys = [key(r * 8 + j, 100 + t) for j in range(4)]
                vals = [value((t << 20) + r * 8 + j, size) for j in range(4)]
                tier.put(keys, vals)
                outs = [memoryview(bytearray(size)) for _ in keys]
                got = tier.get(keys, outs)
                for g, o, v in zip(got, outs, vals):
                    if g is not None and bytes(o[:g]) != v:
                        raise AssertionError(f"thread {t} read another block's bytes")
                tier.delete(keys[:2])
        except BaseException as e:  # collected and re-raised in the caller
            errors.append(e)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    if errors:
        raise errors[0]


def check_slots(tier: SlotTier, slot_size: int) -> None:
    k1, k2 = key(1, 21), key(2, 21)
    views = tier.reserve([k1, k2], [slot_size, 100])
    assert all(v is not None for v in views)
    assert tier.contains([k1, k2]) == [False, False], "reserved slots must stay invisible"
    v1, v2 = views
    assert v1 is not None and v2 is not None and len(v1) == slot_size and len(v2) == 100
    v1[:] = value(1, slot_size)
    v2[:] = value(2, 100)
    tier.commit([k1, k2], [True, False])
    assert tier.contains([k1, k2]) == [True, False], "commit publishes only ok slots"
    (rv,) = tier.views([k1])
    assert rv is not None and rv.readonly and bytes(rv) == value(1, slot_size)
    assert tier.views([k2]) == [None]
    tier.delete([k1])


def check_tier(factory: TierFactory, *, slot_size: int) -> None:
    """Run every check on fresh tiers from ``factory`` (each closed afterwards)."""
    checks: list[Callable[[Tier], None]] = [
        lambda t: check_roundtrip(t, 8, slot_size),
        lambda t: check_miss_and_delete(t, slot_size),
        lambda t: check_bad_input(t, slot_size),
        lambda t: check_full(t, slot_size),
        lambda t: check_threads(t, min(slot_size, 4096)),
    ]
    for check in checks:
        tier = factory()
        try:
            check(tier)
            if isinstance(tier, SlotTier):
                check_slots(tier, slot_size)
        finally:
            tier.close()
