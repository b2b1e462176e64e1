"""An in-process dict of blocks with a capacity in blocks: the hit-rate simulator's tier.

The hit-rate lab runs the real :class:`~kvferry.store.TieredStore` (its index, placement,
promotion, demotion and eviction policies) over tiers of this kind, so a simulated hit rate and
a replay against real tiers come from the same code. The simulator stores empty values, so a
block costs only its key; with real values it is a plain, fully conforming tier (it passes the
tier kit), though the cpu tier is what a store that serves bytes should use.

It is not in the tier registry: nothing configures it by name; callers build it and hand it to
the store (``TieredStore(config, tiers=[...])``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from kvferry.backends.base import Buffer, Key, PutStatus, Tier, TierContext, TierStats

__all__ = ["MemoryTier", "MemoryTierConfig"]


class MemoryTierConfig(BaseModel):
    """Capacity of a :class:`MemoryTier` in blocks (None: unbounded).

    A model of its own, with the same settings as the config sections (``kvferry.config``):
    this tier is not configured by name, so it has no section there.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    capacity_blocks: int | None = None


class MemoryTier(Tier):
    """Blocks as ``bytes`` in a dict; see the module docstring."""

    name = "memory"
    config_section = "memory"

    def __init__(self, config: MemoryTierConfig, context: TierContext) -> None:
        super().__init__(config, context)
        cap = config.capacity_blocks
        if cap is not None and cap < 1:
            raise ValueError(f"a memory tier holds at least 1 block, not {cap}")
        self._cap = cap
        self._slot = context.slot_size
        self._blocks: dict[Key, bytes] = {}
        self._peak = 0
        self._lock = threading.Lock()  # one per batch call: the room check and the stores

    @classmethod
    def sized(cls, capacity_blocks: int | None, *, label: str, slot_size: int) -> MemoryTier:
        """A tier of ``capacity_blocks`` blocks (None: unbounded) named ``label``."""
        return cls(
            MemoryTierConfig(capacity_blocks=capacity_blocks),
            TierContext(slot_size=slot_size, label=label),
        )

    @property
    def capacity_blocks(self) -> int | None:
        return self._cap

    @property
    def used_blocks(self) -> int:
        return len(self._blocks)

    def contains(self, keys: Sequence[Key]) -> list[bool]:
        blocks = self._blocks
        return [k in blocks for k in keys]

    def put(self, keys: Sequence[Key], values: Sequence[Buffer]) -> list[PutStatus]:
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        biggest = max(map(len, values), default=0)
        if biggest > self._slot:
            raise ValueError(f"a {biggest}-byte block is larger than the slot ({self._slot} bytes)")
        with self._lock:
            return self._put(keys, values)

    def _put(self, keys: Sequence[Key], values: Sequence[Buffer]) -> list[PutStatus]:
        blocks = self._blocks
        room = None if self._cap is None else self._cap - len(blocks)
        n = len(keys)
        if (room is None or room >= n) and blocks.keys().isdisjoint(keys):
            # The usual case, in C-level passes: all new and room for all.
            new = dict(zip(keys, map(bytes, values)))
            if len(new) == n:  # no repeats (a repeat is EXISTS for its later copies)
                blocks.update(new)
                self._peak = max(self._peak, len(blocks))
                return [PutStatus.STORED] * n
        out: list[PutStatus] = []
        for k, v in zip(keys, values):
            if k in blocks:
                out.append(PutStatus.EXISTS)
            elif room is not None and room <= 0:
                out.append(PutStatus.NO_SPACE)
            else:
                blocks[k] = bytes(v)  # b"" for the simulator: one shared object
                out.append(PutStatus.STORED)
                if room is not None:
                    room -= 1
        if len(blocks) > self._peak:
            self._peak = len(blocks)
        return out

    def get(self, keys: Sequence[Key], outs: Sequence[memoryview]) -> list[int | None]:
        if len(keys) != len(outs):
            raise ValueError(f"{len(keys)} keys but {len(outs)} output buffers")
        blocks = self._blocks
        found = list(map(blocks.get, keys))
        if None not in found:
            lengths: list[int | None] = list(map(len, found))  # type: ignore[arg-type]
            if not any(lengths):  # empty blocks (the simulator's): nothing to copy
                return lengths
        got: list[int | None] = []
        for k, out in zip(keys, outs):
            v = blocks.get(k)
            if v is None:
                got.append(None)
                continue
            n = len(v)
            if n:
                if len(out) < n:
                    raise ValueError(f"a {len(out)}-byte buffer is smaller than a {n}-byte block")
                out[:n] = v
            got.append(n)
        return got

    def peek(self, keys: Sequence[Key]) -> list[Buffer | None]:
        return list(map(self._blocks.get, keys))  # bytes: immutable, safe to hand out

    def delete(self, keys: Sequence[Key]) -> int:
        blocks = self._blocks
        before = len(blocks)
        pop = blocks.pop
        for k in keys:
            pop(k, None)
        return before - len(blocks)

    def keys(self) -> list[Key]:
        return list(self._blocks)

    def stats(self) -> TierStats:
        used = len(self._blocks)
        return TierStats(
            total_blocks=self._cap,
            used_blocks=used,
            peak_blocks=self._peak,
            total_bytes=None if self._cap is None else self._cap * self._slot,
            used_bytes=sum(len(v) for v in self._blocks.values()),
        )

    def close(self) -> None:
        self._blocks.clear()
