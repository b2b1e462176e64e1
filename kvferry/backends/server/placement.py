"""Where the server tier keeps a block: by prefix chunk, on ``server.replicas`` servers (no I/O).

A prefix lookup counts leading blocks, so it stops at the first block it cannot find. Placed
block by block (each by its own key on the ring), the blocks of one prefix land on every server
in turn, and losing any one of N servers cuts nearly every prefix at its first few blocks. Placed
by chunk, the ``server.chunk_blocks`` (K) consecutive blocks of a prefix that start at a depth
that is a multiple of K go to the server that owns the chunk's first key (its *anchor*): a prefix
of L blocks touches about L/K servers instead of L, and the dead server cuts it at its first
chunk there instead of at its first block. K = 1 is placement by block.

A key is 16 opaque bytes: which chunk it belongs to cannot be read off it. The store says when a
call's keys are consecutive blocks of one chain and at which depth the first is
(:meth:`Placement.note_chain`, from ``Tier.note_chain``: its lookups from a prompt's first block,
its gets and puts given a ``depth``), and the placement remembers each block's anchor in a bounded
memo (:data:`MEMO_BLOCKS`). A call about a key it has no anchor for (a demotion of a block noted
too long ago; a put that starts in the middle of a chunk whose first block it never saw) places
it by its own key. Reads therefore ask a key's *readers*: the servers of its anchor first, then
those of its own key when those differ; a block is found wherever either placement put it, and a
miss costs one more round trip (only to the servers that own misses).

With ``server.replicas`` = R > 1 each block is written to the first R distinct servers of the
ring walk from its anchor (:meth:`~kvferry.backends.server.ring.HashRing.owners`); a read asks
them in that order and stops at the first that has it. On the ring of live servers, a dead
replica's place is taken by the next server of the walk, so new writes keep R copies and reads
find the surviving copy first.

Must not: do I/O, or depend on anything but the keys, the depths and the ring (every client with
the same member list and the same noted chains agrees on every placement).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from kvferry.backends.base import Key
from kvferry.backends.server.ring import HashRing

__all__ = ["MEMO_BLOCKS", "Placement", "chunk_anchors"]

MEMO_BLOCKS = 1 << 18
"""Blocks whose anchor a client remembers (oldest forgotten first): about 25 MiB, and 4M tokens of
prompts at 16 tokens per block, enough to cover the prompts between a lookup and the put of their
new blocks, and most demotions of blocks put recently."""


def chunk_anchors(keys: Sequence[Key], depth: int, chunk_blocks: int) -> list[Key | None]:
    """Each key's anchor (the first key of its chunk) when ``keys`` are consecutive blocks of one
    prefix chain and ``keys[0]`` is at ``depth``; None for the blocks of a first chunk that began
    before ``keys[0]`` (its anchor is not among ``keys``).

    Raises:
        ValueError: ``depth`` < 0 or ``chunk_blocks`` < 1.
    """
    if depth < 0 or chunk_blocks < 1:
        raise ValueError(f"depth must be >= 0 and chunk_blocks >= 1, got {depth}, {chunk_blocks}")
    out: list[Key | None] = []
    for j in range(len(keys)):
        start = j - (depth + j) % chunk_blocks
        out.append(keys[start] if start >= 0 else None)
    return out


class Placement:
    """A client's placement of blocks on servers: anchors remembered from noted chains, and each
    key's writers and readers on a ring.

    Args:
        chunk_blocks: K, blocks per chunk (1: place each block by its own key).
        replicas: R, servers each block is written to.
        memo_blocks: anchors remembered at most.

    Raises:
        ValueError: K, R or ``memo_blocks`` < 1.
    """

    def __init__(self, chunk_blocks: int, replicas: int, memo_blocks: int = MEMO_BLOCKS) -> None:
        if chunk_blocks < 1 or replicas < 1 or memo_blocks < 1:
            raise ValueError(
                f"chunk_blocks, replicas and memo_blocks must be >= 1, got {chunk_blocks}, "
                f"{replicas}, {memo_blocks}"
            )
        self.chunk_blocks = chunk_blocks
        self.replicas = replicas
        self._cap = memo_blocks
        self._memo: OrderedDict[Key, Key] = OrderedDict()
        self._lock = threading.Lock()

    def note_chain(self, keys: Sequence[Key], depth: int) -> None:
        """Remember the anchors of ``keys``, consecutive blocks of one chain from ``depth``."""
        if self.chunk_blocks == 1 or not keys:
            return
        anchors = chunk_anchors(keys, depth, self.chunk_blocks)
        with self._lock:
            memo = self._memo
            for k, a in zip(keys, anchors):
                if a is not None:
                    memo[k] = a
                    memo.move_to_end(k)
            while len(memo) > self._cap:
                memo.popitem(last=False)

    def anchor(self, key: Key) -> Key:
        """The key ``key`` is placed by: its noted anchor, else itself."""
        if self.chunk_blocks == 1:
            return key
        return self._memo.get(key, key)

    def writers(self, ring: HashRing, keys: Sequence[Key]) -> list[list[str]]:
        """Each key's R servers on ``ring``, in the order reads ask them (the blocks of one chunk
        share one list: do not change it)."""
        r = self.replicas
        memo = self._memo
        if r == 1 and (self.chunk_blocks == 1 or not memo):
            owner = ring.owner
            return [[owner(k)] for k in keys]
        seen: dict[Key, list[str]] = {}  # the blocks of a chunk share one walk
        out: list[list[str]] = []
        for k in keys:
            a = memo.get(k, k)
            owners = seen.get(a)
            if owners is None:
                owners = seen[a] = ring.owners(a, r)
            out.append(owners)
        return out

    def fallback(self, ring: HashRing, key: Key, writers: list[str]) -> list[str]:
        """The servers to ask for ``key`` after its ``writers``: the owners of its own key that
        are not among them (where a put that had no anchor for it placed it); often none."""
        if self.chunk_blocks == 1:
            return []
        return [m for m in ring.owners(key, self.replicas) if m not in writers]

    def readers(self, ring: HashRing, keys: Sequence[Key]) -> list[list[str]]:
        """Each key's servers to ask in turn: its writers, then :meth:`fallback`."""
        return [w + self.fallback(ring, k, w) for k, w in zip(keys, self.writers(ring, keys))]
