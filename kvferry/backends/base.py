"""The storage tier plug-in point: one ABC that every tier (cpu, disk, redis, server) implements.

A tier stores immutable KV blocks under 16-byte block hashes (``kvferry.index.hashing``). It
moves bytes and keeps its own key -> location map; it never decides *what* to keep: placement,
eviction, pins and the prefix index belong to the control plane (``kvferry.store``), which calls
these primitives. Every primitive takes a batch; the base class has no per-item fallback because
each tier's batch form is its reason to exist (a pipeline, a gather, a vectored read).

Primitives and their contracts (all must be safe to call from several threads at once):

``contains(keys) -> list[bool]``
    Presence of each key. Never blocks on more than one round trip (shared tiers).
``put(keys, values) -> list[PutStatus]``
    Store each value (bytes-like, at most ``context.slot_size`` bytes for slotted tiers) under
    its key. A key already present is left unchanged (``EXISTS``: same key, same bytes). A tier
    that is full answers ``NO_SPACE`` for that block and stores the rest; it never evicts on its
    own (the store evicts first) and never overwrites another block. A value that is too large
    raises :class:`ValueError` before anything is stored.
``get(keys, outs) -> list[int | None]``
    Copy each present block into the matching writable buffer and give its length; ``None``
    means the tier does not have it (a miss, or a copy detected torn/corrupt and dropped: a tier
    never returns bytes it cannot vouch for). A buffer smaller than the block raises
    :class:`ValueError`.
``delete(keys) -> int``
    Remove the keys that are present; the number removed.
``keys() -> list[bytes]``
    The keys present now. The store calls it once at open on ``persistent`` tiers to rebuild
    its index (a disk tier after a restart); shared tiers may raise ``NotImplementedError``.
``stats() -> TierStats``
    Usage of the tier.
``peek(keys) -> list[Buffer | None] | None``
    Optional: the stored blocks themselves, without a copy (None per miss), from a tier that
    keeps immutable bytes in this process (the simulator's memory tier), for the store's
    demotions. The base class returns None: not offered, the store reads with ``get``.
``note_chain(keys, depth)``
    Optional hint, no I/O: ``keys`` are consecutive blocks of one prefix chain and ``keys[0]``
    is at ``depth`` (0: a prompt's first block). The store gives it before the calls about those
    blocks (its lookups, and its gets and puts given a depth). A tier that places blocks by
    prefix (server: ``server.chunk_blocks``) remembers it; the base class ignores it. Reads
    must stay correct without it (a hint can be missing or stale).
``close()``
    Release files, sockets, memory; idempotent.
``check(config, context)`` (classmethod, optional)
    Refuse, before anything is allocated or written, a config this host cannot honour (a pool
    above the available memory, a disk capacity above the free space) with a
    :class:`~kvferry.errors.ConfigError` naming the key, the value, what the host has and how
    to override. A constructor calls it first; a store (or store server) calls it for every
    tier before it builds any, so one tier's bad config never waits for another's allocation.
    The base class checks nothing.

Failures of the medium (I/O error, Redis unreachable) raise
:class:`~kvferry.errors.StorageError` naming the tier; the store turns them into misses for that
tier and keeps serving from the others.

``SlotTier`` adds the zero-copy primitives of tiers whose blocks live in this process's memory
(cpu): ``reserve`` hands out writable views of free slots that stay invisible until ``commit``,
and ``views`` hands out read-only views of present blocks. The store pins a block before it hands
out a view and only evicts unpinned blocks, so a view never sees its slot reused.

Constructor shape (the same for every tier, so no factory branches on names):
``Tier(config, context)`` with ``config`` the tier's own section of
:class:`~kvferry.config.KvferryConfig` (``config_section`` names it) and ``context`` a
:class:`TierContext`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import xxhash
from pydantic import BaseModel

from kvferry.index.keys import KEY_BYTES as KEY_BYTES
from kvferry.index.keys import Key as Key

if TYPE_CHECKING:
    from kvferry.transfer.memory import MemoryRegion


Buffer = bytes | bytearray | memoryview
"""A block value given to ``put``."""


class PutStatus(enum.Enum):
    """What happened to one block of a put."""

    STORED = "stored"
    EXISTS = "exists"
    NO_SPACE = "no_space"
    REJECTED = "rejected"
    """The bytes did not match the checksum the writer declared (a two-phase put whose slot
    was written by someone else, or torn): nothing was published."""


def block_checksum(key: Key, data: Buffer) -> int:
    """A block's integrity checksum: xxh3-64 of its bytes, seeded with its key, so the same
    bytes under another key (a slot reused for another block) do not match either.

    Fast (tens of GB/s), not cryptographic: it catches stale, torn and misplaced writes, not a
    forger who can compute xxh3 (a peer that may write the shared pool can write any block).
    """
    return xxhash.xxh3_64_intdigest(data, _seed(key))


def _seed(key: Key) -> int:
    return int.from_bytes(key[:8], "little") ^ int.from_bytes(key[8:16], "little")


@dataclass(frozen=True)
class TierContext:
    """What every tier gets besides its own config."""

    slot_size: int
    """Largest block in bytes (``store.slot_size``); slotted tiers size their slots by it."""
    label: str = ""
    """Instance label for logs and metrics (defaults to the tier name)."""
    allocate: Callable[[int], MemoryRegion] | None = None
    """Where memory tiers get their pool; a store server passes its TransferEngine's
    ``allocate`` so that peers can read the pool directly. None: a private memfd region."""


@dataclass
class TierStats:
    """Usage of one tier. ``total_blocks`` is None for tiers without a fixed capacity."""

    total_blocks: int | None
    used_blocks: int
    peak_blocks: int
    total_bytes: int | None = None
    used_bytes: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    """Tier-specific counters (e.g. disk ``corrupt_dropped``, ``direct_io``)."""


class Tier(ABC):
    """One storage tier. See the module docstring for the contract of each primitive."""

    name: ClassVar[str]
    """Registry name ("cpu", "disk", ...)."""
    config_section: ClassVar[str]
    """The KvferryConfig section that configures this tier."""
    shared: ClassVar[bool] = False
    """Other processes add and remove blocks here: the store must ask, not trust its index."""
    persistent: bool = False
    """Blocks survive a restart: the store rebuilds its index from ``keys()`` at open and
    flushes into it at a graceful shutdown. Per instance: a disk tier without a directory of
    its own (``disk.path``) keeps nothing past its process."""

    def __init__(self, config: BaseModel, context: TierContext) -> None:
        self.config = config
        self.context = context
        self.label = context.label or self.name

    @property
    @abstractmethod
    def capacity_blocks(self) -> int | None:
        """Blocks this tier can hold, or None when it manages its own space (redis)."""

    @property
    @abstractmethod
    def used_blocks(self) -> int:
        """Blocks stored now."""

    @abstractmethod
    def contains(self, keys: Sequence[Key]) -> list[bool]: ...

    @abstractmethod
    def put(self, keys: Sequence[Key], values: Sequence[Buffer]) -> list[PutStatus]: ...

    @abstractmethod
    def get(self, keys: Sequence[Key], outs: Sequence[memoryview]) -> list[int | None]: ...

    @abstractmethod
    def delete(self, keys: Sequence[Key]) -> int: ...

    @abstractmethod
    def keys(self) -> list[Key]: ...

    @abstractmethod
    def stats(self) -> TierStats: ...

    @classmethod
    def check(cls, config: BaseModel, context: TierContext) -> None:
        """Refuse a config this host cannot honour, before anything is allocated.

        Raises:
            ConfigError: the message names the key, the value, what the host has and the way
                out (see the module docstring).
        """

    def peek(self, keys: Sequence[Key]) -> list[Buffer | None] | None:
        """The stored blocks without a copy, or None when the tier does not offer it."""
        return None

    def note_chain(self, keys: Sequence[Key], depth: int) -> None:
        """A hint that ``keys`` are consecutive blocks of one chain from ``depth`` (see the
        module docstring); ignored unless a tier places blocks by prefix."""

    @abstractmethod
    def close(self) -> None: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label} used={self.used_blocks}>"


class SlotTier(Tier):
    """A tier whose blocks live in this process's memory and can be lent out as views."""

    @abstractmethod
    def reserve(self, keys: Sequence[Key], sizes: Sequence[int]) -> list[memoryview | None]:
        """Take a free slot per key and return a writable view of ``size`` bytes, or None when
        no slot is free. Reserved slots are invisible (``contains`` is False) until ``commit``.

        Raises:
            ValueError: a key is already present or reserved, or a size exceeds the slot size.
        """

    @abstractmethod
    def commit(
        self, keys: Sequence[Key], ok: Sequence[bool], checksums: Sequence[int] | None = None
    ) -> list[bool]:
        """Publish the reserved slots whose ``ok`` is True and free the others; returns which
        were published.

        ``checksums`` (the writer's :func:`block_checksum` of what it meant to write, per key,
        as ``needs_checksum`` asked): where the tier guards a slot, the block is published only
        when the slot holds exactly those bytes, and freed otherwise (a writer that lost the
        slot wrote it since, or the write was torn).
        """

    def abandon(self, keys: Sequence[Key]) -> None:
        """Take back reserved slots whose holder did not finish (its lease ran out): it may
        still write into them, so a tier that guards slots guards these from now on. The base
        class frees them like a failed commit."""
        self.commit(keys, [False] * len(keys))

    def needs_checksum(self, keys: Sequence[Key]) -> list[bool]:
        """For reserved keys: whether ``commit`` must be given the writer's checksum (the slot
        is guarded). The base class guards nothing."""
        return [False] * len(keys)

    @abstractmethod
    def views(self, keys: Sequence[Key], *, verify: bool = False) -> list[memoryview | None]:
        """Read-only views of present blocks (None for a miss). The caller must keep the block
        pinned in the store while it uses the view. ``verify``: a guarded block is checked
        first and dropped (None) if it does not match its checksum."""

    def checksums(self, keys: Sequence[Key]) -> list[int | None]:
        """For each present block, the :func:`block_checksum` a reader of its bytes (a view, a
        peer reading the pool) must check them against, or None where none is needed (the
        slot is not guarded) or the block is absent."""
        return [None] * len(keys)

    def verify(self, keys: Sequence[Key]) -> list[Key]:
        """Check the guarded present blocks among ``keys`` against their checksums and drop
        those that do not match; the keys dropped."""
        return []
