"""The simulated engine's paged KV cache: a block manager with prefix caching, pure.

It does what vLLM's KV cache manager does, without the tensors. The cache has ``num_blocks``
blocks of ``block_size`` tokens. Each block is in exactly one of three states:

- **used**: held by at least one running request (``ref_count > 0``);
- **cached**: held by no request but still holding the KV of a full block whose hash is known,
  kept in an LRU pool so a later request with the same prefix can reuse it;
- **free**: holding nothing reusable.

So ``used + cached + free == num_blocks`` at all times. A full block is keyed by kvferry's
chained block hash (:class:`~kvferry.index.hashing.BlockHasher`, salted with the model name and
an optional tenant ``cache_salt``): equal hashes mean equal token prefixes.

Admission (:meth:`BlockManager.admit`) finds the longest prefix of the request's full blocks
whose hashes are in the cache (the hit; every full block may hit: the engine still recomputes
the last prompt token for its logits, which is a timing matter), takes a reference on those
blocks, and allocates new blocks for the rest of the prompt plus ``reserve_tokens`` more (the
first output token). New blocks come from the free blocks first, then by evicting the least
recently used cached blocks; a request whose blocks do not fit is not admitted (it waits) and
nothing changes. Blocks are hashed and published when their tokens are computed
(:meth:`~BlockManager.mark_computed` for prompt chunks, :meth:`~BlockManager.append_token` for
output tokens), so a request never hits blocks that are still being prefilled. A computed block
whose hash is already cached (its prefix was evicted, so it was not part of the hit) stays an
unpublished duplicate and is freed, not cached, at the end. :meth:`~BlockManager.free` releases
a request's blocks tail first, so under LRU a prefix's last blocks are evicted before its first.

KV events go to listeners registered with :meth:`~BlockManager.add_listener`, one
:class:`KvEvent` per change, numbered 1, 2, 3, ... in order: ``stored`` (newly published hashes
of consecutive blocks, the parent hash of the first, and how many tokens they hold), ``removed``
(hashes evicted or unpublished) and ``cleared`` (every hash unpublished). Replaying them gives
exactly the set of hashes :meth:`~BlockManager.lookup` can hit, which is what a KV-aware router
mirrors per worker.

Counters (:class:`BlockStats`): full prompt blocks looked up at admission, how many hit, blocks
evicted. This module holds no sockets, no clock and no lock: one thread (the engine's event
loop) owns a manager.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from kvferry.index.hashing import BlockHasher

__all__ = ["Admission", "BlockManager", "BlockStats", "KvEvent", "KvEventListener"]

KvEventKind = Literal["stored", "removed", "cleared"]


@dataclass(frozen=True)
class KvEvent:
    """One change of the set of published block hashes.

    Attributes:
        event_id: 1 for the manager's first event, then +1 per event.
        kind: "stored", "removed" or "cleared".
        block_hashes: stored: the new hashes of consecutive blocks of one sequence, first to
            last; removed: the hashes no longer published; cleared: empty.
        parent_hash: stored: hash of the block before the first one, None at a sequence start.
        token_count: stored: tokens the stored blocks hold (``len(block_hashes) * block_size``).
    """

    event_id: int
    kind: KvEventKind
    block_hashes: tuple[bytes, ...] = ()
    parent_hash: bytes | None = None
    token_count: int = 0


KvEventListener = Callable[[KvEvent], None]
"""Called synchronously, in event order, by the thread changing the manager."""


@dataclass(frozen=True)
class Admission:
    """What :meth:`BlockManager.admit` decided.

    Attributes:
        admitted: False when the blocks did not fit; nothing changed then.
        hit_blocks: leading full blocks found in the cache (0 when not admitted).
        lookup_blocks: full blocks of the request's tokens.
        new_blocks: blocks that were allocated (free or evicted); needed ones when not admitted.
    """

    admitted: bool
    hit_blocks: int
    lookup_blocks: int
    new_blocks: int


@dataclass
class BlockStats:
    """Counters and occupancy of a :class:`BlockManager` (a snapshot; block-weighted hit rate
    is the headline, the per-request mean is aiperf's definition)."""

    block_size: int
    num_blocks: int
    used_blocks: int
    cached_blocks: int
    free_blocks: int
    lookup_blocks: int
    hit_blocks: int
    evicted_blocks: int
    admissions: int
    request_hit_rate_sum: float
    requests_with_blocks: int
    last_event_id: int

    @property
    def usage(self) -> float:
        """Fraction of the blocks held by running requests."""
        return self.used_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        """Hit blocks / looked-up blocks (block-weighted ratio of sums); 0 before any lookup."""
        return self.hit_blocks / self.lookup_blocks if self.lookup_blocks else 0.0

    @property
    def request_hit_rate_mean(self) -> float:
        """Mean over admissions with at least one full block of their hit fraction."""
        if not self.requests_with_blocks:
            return 0.0
        return self.request_hit_rate_sum / self.requests_with_blocks


@dataclass
class _Seq:
    """A running request's blocks and tokens."""

    blocks: list[int]
    tokens: list[int]
    hashes: list[bytes]
    """Hashes of every full block of ``tokens`` so far (published or not)."""
    hasher: BlockHasher
    hit_blocks: int
    published: int = 0
    """Leading blocks whose computed state has been handled (hit, published or duplicate)."""
    computed: int = 0
    """Leading tokens whose KV is computed."""


class BlockManager:
    """Paged KV blocks with prefix caching (module docstring).

    Args:
        num_blocks: blocks in the cache.
        block_size: tokens per block.
        model_name: salts the default hasher, so two models never share a block.

    Raises:
        ValueError: ``num_blocks`` or ``block_size`` is not positive.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, *, model_name: str = "") -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.hasher = BlockHasher(block_size, model_name=model_name)
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        """Published hash of each block, None when not published."""
        self._cached: dict[bytes, int] = {}
        """Published hash -> its block (used or in the LRU pool)."""
        self._parent: dict[bytes, bytes | None] = {}
        """Published hash -> the hash before it (for snapshots)."""
        self._lru: OrderedDict[int, None] = OrderedDict()
        """Cached blocks with no reference, least recently freed first."""
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        """Free blocks (a stack: block 0 is handed out first)."""
        self._seqs: dict[str, _Seq] = {}
        self._listeners: list[KvEventListener] = []
        self._last_event_id = 0
        self._lookup_blocks = 0
        self._hit_blocks = 0
        self._evicted = 0
        self._admissions = 0
        self._request_rate_sum = 0.0
        self._requests_with_blocks = 0

    # --- events ------------------------------------------------------------------------------

    def add_listener(self, listener: KvEventListener) -> None:
        """Call ``listener(event)`` for every event from now on."""
        self._listeners.append(listener)

    def remove_listener(self, listener: KvEventListener) -> None:
        """Stop calling ``listener`` (no error if it is not registered)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(
        self,
        kind: KvEventKind,
        hashes: Sequence[bytes] = (),
        parent: bytes | None = None,
    ) -> None:
        self._last_event_id += 1
        event = KvEvent(
            self._last_event_id,
            kind,
            tuple(hashes),
            parent,
            len(hashes) * self.block_size if kind == "stored" else 0,
        )
        for listener in list(self._listeners):
            listener(event)

    @property
    def last_event_id(self) -> int:
        """Id of the latest event (0 before any)."""
        return self._last_event_id

    def snapshot(self) -> tuple[int, list[tuple[bytes, bytes | None]]]:
        """``(last_event_id, [(hash, parent_hash), ...])``: every published hash as of that
        event, in publication order (a parent may be absent, evicted before its child)."""
        return self._last_event_id, [(h, self._parent[h]) for h in self._cached]

    # --- queries -----------------------------------------------------------------------------

    def lookup(self, hashes: Sequence[bytes]) -> int:
        """Leading blocks of ``hashes`` that are in the cache now (no side effect)."""
        n = 0
        cached = self._cached
        for h in hashes:
            if h not in cached:
                break
            n += 1
        return n

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free) - len(self._lru)

    @property
    def cached_blocks(self) -> int:
        """Blocks in the LRU pool: published, held by no request."""
        return len(self._lru)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def block_hash(self, block: int) -> bytes | None:
        """The hash ``block`` is published under, None if it is not published."""
        return self._hash[block]

    def block_ids(self, request_id: str) -> list[int]:
        """The blocks of a running request, in token order.

        Raises:
            KeyError: ``request_id`` is not running.
        """
        return list(self._seqs[request_id].blocks)

    def num_tokens(self, request_id: str) -> int:
        """Tokens of a running request (prompt + appended).

        Raises:
            KeyError: ``request_id`` is not running.
        """
        return len(self._seqs[request_id].tokens)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._seqs

    def stats(self) -> BlockStats:
        return BlockStats(
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            used_blocks=self.used_blocks,
            cached_blocks=self.cached_blocks,
            free_blocks=self.free_blocks,
            lookup_blocks=self._lookup_blocks,
            hit_blocks=self._hit_blocks,
            evicted_blocks=self._evicted,
            admissions=self._admissions,
            request_hit_rate_sum=self._request_rate_sum,
            requests_with_blocks=self._requests_with_blocks,
            last_event_id=self._last_event_id,
        )

    # --- request lifecycle -------------------------------------------------------------------

    def admit(
        self,
        request_id: str,
        token_ids: Sequence[int],
        *,
        hashes: Sequence[bytes] | None = None,
        hasher: BlockHasher | None = None,
        reserve_tokens: int = 1,
    ) -> Admission:
        """Reserve blocks for a request's tokens, reusing the longest cached prefix.

        Args:
            request_id: unique among running requests.
            token_ids: the tokens to hold (the prompt; after a preemption, the prompt and the
                output so far). Nothing is computed yet: see :meth:`mark_computed`.
            hashes: ``hasher.hashes(token_ids)`` if the caller has it already.
            hasher: the request's hasher (a tenant's ``cache_salt``); this manager's if None.
                It must have this manager's ``block_size``.
            reserve_tokens: room for this many more tokens (the first output token).

        Returns:
            The admission; when ``admitted`` is False nothing changed (the request waits).

        Raises:
            ValueError: ``request_id`` is already running, ``token_ids`` is empty,
                ``reserve_tokens`` is negative, or ``hasher``/``hashes`` do not match.
        """
        if request_id in self._seqs:
            raise ValueError(f"request {request_id!r} is already running")
        if not token_ids:
            raise ValueError("a request needs at least one token")
        if reserve_tokens < 0:
            raise ValueError(f"reserve_tokens must be >= 0, got {reserve_tokens}")
        hasher = hasher or self.hasher
        if hasher.tokens_per_block != self.block_size:
            raise ValueError(
                f"hasher has tokens_per_block {hasher.tokens_per_block}, the cache has "
                f"block_size {self.block_size}"
            )
        full = len(token_ids) // self.block_size
        block_hashes = list(hashes) if hashes is not None else hasher.hashes(token_ids)
        if len(block_hashes) != full:
            raise ValueError(f"{len(block_hashes)} hashes given for {full} full blocks")
        hit = self.lookup(block_hashes)
        hit_blocks = [self._cached[h] for h in block_hashes[:hit]]
        total = self.blocks_for(len(token_ids) + reserve_tokens)
        need = total - hit
        # Hit blocks that sit in the LRU pool are not available for new blocks.
        pooled_hits = sum(1 for b in hit_blocks if self._ref[b] == 0)
        if need > len(self._free) + len(self._lru) - pooled_hits:
            return Admission(False, 0, full, need)
        for b in hit_blocks:
            if self._ref[b] == 0:
                del self._lru[b]
            self._ref[b] += 1
        blocks = hit_blocks + self._take(need)
        self._seqs[request_id] = _Seq(
            blocks=blocks,
            tokens=list(token_ids),
            hashes=block_hashes,
            hasher=hasher,
            hit_blocks=hit,
            published=hit,
            computed=hit * self.block_size,
        )
        self._admissions += 1
        self._lookup_blocks += full
        self._hit_blocks += hit
        if full:
            self._requests_with_blocks += 1
            self._request_rate_sum += hit / full
        return Admission(True, hit, full, need)

    def _take(self, n: int) -> list[int]:
        """``n`` blocks with ref 1: free ones first, then evicted LRU ones (one removed event)."""
        out: list[int] = []
        evicted: list[bytes] = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._lru.popitem(last=False)
                h = self._hash[b]
                if h is not None:  # every pooled block is published; checked for the types
                    del self._cached[h]
                    del self._parent[h]
                    self._hash[b] = None
                    evicted.append(h)
            self._ref[b] = 1
            out.append(b)
        if evicted:
            self._evicted += len(evicted)
            self._emit("removed", evicted)
        return out

    def mark_computed(self, request_id: str, num_tokens: int) -> None:
        """Record that the first ``num_tokens`` tokens of the request have KV now; its full
        blocks among them are published (one stored event per run of new hashes).

        Raises:
            KeyError: ``request_id`` is not running.
            ValueError: ``num_tokens`` is more than the request's tokens.
        """
        seq = self._seqs[request_id]
        if num_tokens > len(seq.tokens):
            raise ValueError(
                f"request {request_id!r} has {len(seq.tokens)} tokens, cannot mark "
                f"{num_tokens} computed"
            )
        seq.computed = max(seq.computed, num_tokens)
        self._publish(seq)

    def append_token(self, request_id: str, token_id: int) -> bool:
        """Add one (output) token to a running request, taking a new block when its last one is
        full; the token counts as computed, so a block it fills is published.

        Returns:
            False when a new block is needed and none is free or evictable (the caller
            preempts a request and tries again); nothing changed then.

        Raises:
            KeyError: ``request_id`` is not running.
        """
        seq = self._seqs[request_id]
        if len(seq.tokens) == len(seq.blocks) * self.block_size:
            if not self._free and not self._lru:
                return False
            seq.blocks.extend(self._take(1))
        seq.tokens.append(token_id)
        n = len(seq.tokens)
        if n % self.block_size == 0:
            start = n - self.block_size
            parent = seq.hashes[-1] if seq.hashes else None
            seq.hashes.extend(seq.hasher.hashes(seq.tokens[start:n], parent=parent))
        if seq.computed == n - 1:
            seq.computed = n
        self._publish(seq)
        return True

    def _publish(self, seq: _Seq) -> None:
        """Publish the request's computed full blocks not yet handled."""
        done = min(seq.computed // self.block_size, len(seq.hashes))
        run: list[bytes] = []
        run_parent: bytes | None = None
        for i in range(seq.published, done):
            h = seq.hashes[i]
            if h in self._cached:
                # Same prefix already cached in another block: ours stays an unpublished
                # duplicate (its prefix was evicted, so it was not part of the hit) and is
                # freed, not pooled, at the end.
                if run:
                    self._emit("stored", run, run_parent)
                    run = []
                continue
            parent = seq.hashes[i - 1] if i > 0 else None
            if not run:
                run_parent = parent
            b = seq.blocks[i]
            self._cached[h] = b
            self._parent[h] = parent
            self._hash[b] = h
            run.append(h)
        seq.published = max(seq.published, done)
        if run:
            self._emit("stored", run, run_parent)

    def free(self, request_id: str) -> None:
        """Release a request's blocks (finished, aborted or preempted): published ones join the
        LRU pool, tail first, the others become free.

        Raises:
            KeyError: ``request_id`` is not running.
        """
        seq = self._seqs.pop(request_id)
        for b in reversed(seq.blocks):
            self._ref[b] -= 1
            if self._ref[b] > 0:
                continue
            if self._hash[b] is not None:
                self._lru[b] = None
            else:
                self._free.append(b)

    def clear_cache(self) -> int:
        """Unpublish every hash (running requests keep their blocks, unpublished); pooled
        blocks become free. Emits one cleared event.

        Returns:
            How many hashes were unpublished.
        """
        n = len(self._cached)
        for b in self._cached.values():
            self._hash[b] = None
        self._cached.clear()
        self._parent.clear()
        while self._lru:
            b, _ = self._lru.popitem(last=False)
            self._free.append(b)
        for seq in self._seqs.values():
            # Blocks computed before the clear are never published again; later ones are.
            seq.published = max(seq.published, seq.computed // self.block_size)
        self._emit("cleared")
        return n
