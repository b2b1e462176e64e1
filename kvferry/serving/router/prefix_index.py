"""The KV-aware router's decisions, pure: which worker holds which blocks, what each worker is
busy with, what a request would cost on each, and which worker gets it.

- :class:`PrefixIndex`: block hash -> the workers that hold it, each entry with a deadline
  (``inf`` for blocks a worker's KV events confirmed, ``now + ttl`` for the router's own
  predictions). Keys are kvferry's chained block hashes
  (:class:`~kvferry.index.hashing.BlockHasher`), so a hash names its whole prefix: the index is
  a radix tree over blocks flattened into one dict, and the overlap of a request with a worker
  is the length of the leading run of its hashes the worker holds (what the worker's own
  prefix cache will hit, :meth:`~kvferry.serving.mock.blocks.BlockManager.lookup`).
- :class:`EventMirror`: applies one worker's KV events (the JSON objects of ``/kv/events``,
  :mod:`kvferry.serving.mock.server`) to the index and says when the stream must be resynced from a
  fresh snapshot (an ``error`` event, a gap in the ids).
- :class:`LoadTracker`: the requests in flight on each worker, with their prompt blocks
  counted once per worker however many requests share them (vLLM shares a cached prefix
  between running requests) plus their other prompt and output blocks.
- :func:`score` and :func:`pick`: the cost function and the choice (below);
  :class:`RoundRobin` for ``round-robin`` mode.

Cost of sending a request of ``P`` prompt tokens (``len(hashes)`` full blocks) to worker ``w``,
in blocks, lower is better (Dynamo's KV router formula)::

    prefill_blocks(w) = (P - overlap(w) * block_size) / block_size   uncached prompt, fractional
    decode_blocks(w)  = active_blocks(w) + new_blocks(w)             KV the worker would hold
    cost(w)           = prefill_weight * prefill_blocks(w) + decode_blocks(w)

``active_blocks(w)`` are the blocks of the requests in flight on ``w`` (prompt and output so far,
shared prompt blocks once); ``new_blocks(w)`` those of this request not already among them.
Unlike Dynamo, the prefill term has no queued-prefill tokens of other requests: the router sees
an opaque HTTP stream and cannot tell when a worker finished a prefill. With ``temperature`` 0
the lowest cost wins (ties broken at random); with ``T > 0`` worker ``w`` is drawn with
probability ``softmax(-cost / T)``, so several routers fed the same state do not all herd onto
the same worker.

No sockets, no clock (callers pass ``now``), no lock: one thread (the router's event loop) owns
these objects.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from kvferry.errors import ConfigError

__all__ = [
    "ActiveRequest",
    "EventMirror",
    "LoadTracker",
    "PrefixIndex",
    "RoundRobin",
    "WorkerCost",
    "pick",
    "score",
]

INF = math.inf


class PrefixIndex:
    """Block hash -> the workers holding it, each until a deadline (module docstring).

    An entry's deadline only grows: a prediction never shortens a block that events confirmed
    (deadline ``inf``), and a repeated prediction extends the earlier one.
    """

    def __init__(self) -> None:
        self._where: dict[bytes, dict[str, float]] = {}
        """hash -> worker -> deadline (``now`` values at or past it read as absent)."""
        self._held: dict[str, set[bytes]] = {}
        """worker -> its hashes (for clear and counts)."""
        self._expiry: list[tuple[float, str, bytes]] = []
        """Heap of finite deadlines for :meth:`prune`; stale entries are skipped lazily."""

    def store(self, worker: str, hashes: Iterable[bytes], *, until: float = INF) -> None:
        """Record that ``worker`` holds ``hashes`` until ``until`` (``inf``: until removed)."""
        held = self._held.setdefault(worker, set())
        for h in hashes:
            holders = self._where.setdefault(h, {})
            old = holders.get(worker)
            if old is not None and old >= until:
                continue
            holders[worker] = until
            held.add(h)
            if until != INF:
                heapq.heappush(self._expiry, (until, worker, h))

    def remove(self, worker: str, hashes: Iterable[bytes]) -> int:
        """Forget that ``worker`` holds ``hashes``; returns how many it held."""
        held = self._held.get(worker)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h in held:
                held.discard(h)
                self._drop(h, worker)
                n += 1
        return n

    def clear(self, worker: str) -> int:
        """Forget every block of ``worker``; returns how many there were."""
        held = self._held.pop(worker, set())
        for h in held:
            self._drop(h, worker)
        return len(held)

    def replace(self, worker: str, hashes: Iterable[bytes]) -> None:
        """``worker`` holds exactly ``hashes`` now, confirmed (a snapshot)."""
        self.clear(worker)
        self.store(worker, hashes)

    def _drop(self, h: bytes, worker: str) -> None:
        holders = self._where.get(h)
        if holders is None:
            return
        holders.pop(worker, None)
        if not holders:
            del self._where[h]

    def prune(self, now: float) -> int:
        """Drop the entries whose deadline has passed; returns how many."""
        n = 0
        heap = self._expiry
        while heap and heap[0][0] <= now:
            until, worker, h = heapq.heappop(heap)
            holders = self._where.get(h)
            # Stale heap entry: the deadline was extended, confirmed, or the block removed.
            if holders is None or holders.get(worker) != until:
                continue
            self._drop(h, worker)
            self._held[worker].discard(h)
            n += 1
        return n

    def overlaps(
        self, hashes: Sequence[bytes], workers: Iterable[str], now: float
    ) -> dict[str, int]:
        """For each of ``workers``: leading blocks of ``hashes`` it holds at ``now``."""
        out = dict.fromkeys(workers, 0)
        alive = list(out)
        for i, h in enumerate(hashes):
            holders = self._where.get(h)
            if holders is None:
                break
            alive = [w for w in alive if holders.get(w, -INF) > now]
            if not alive:
                break
            for w in alive:
                out[w] = i + 1
        return out

    def blocks(self, worker: str) -> int:
        """Blocks recorded for ``worker`` (expired predictions count until pruned)."""
        return len(self._held.get(worker, ()))


# --- KV events -------------------------------------------------------------------------------


@dataclass
class EventMirror:
    """Mirrors one worker's ``/kv/events`` stream into a :class:`PrefixIndex`.

    Attributes:
        index: the index to keep true.
        worker: whose events these are.
        block_size: the router's; events of another block size raise.
        last_id: id of the last event applied (None: resync, ask for a snapshot).
        events: events applied.
        resyncs: times the stream had to restart from a snapshot (error event or gap).
    """

    index: PrefixIndex
    worker: str
    block_size: int
    last_id: int | None = None
    events: int = 0
    resyncs: int = 0

    def apply(self, event: Mapping[str, object]) -> Literal["ok", "resync"]:
        """Apply one event object.

        Returns:
            "ok", or "resync": the stream is broken (an ``error`` event, or an id that does
            not follow the last one); the caller reconnects without ``since``. The index
            keeps the worker's blocks until the snapshot replaces them.

        Raises:
            ConfigError: the event says the worker's block size is not the router's.
            ValueError: the event is malformed (not the documented JSON).
        """
        kind = event.get("type")
        if kind == "error":
            return self._resync()
        eid = event.get("id")
        if isinstance(eid, bool) or not isinstance(eid, int):
            raise ValueError(f"KV event without an integer id: {_short(event)}")
        size = event.get("block_size")
        if size is not None and size != self.block_size:
            raise ConfigError(
                f"worker {self.worker} has block_size {size} (its KV events), the router has "
                f"router.block_size {self.block_size}; they must be equal (--block-size {size})"
            )
        if kind == "snapshot":
            blocks = event.get("blocks")
            if not isinstance(blocks, list):
                raise ValueError(f"snapshot without a blocks list: {_short(event)}")
            hashes = []
            for block in blocks:
                if not isinstance(block, dict):
                    raise ValueError(f"snapshot block is not an object: {block!r}")
                hashes.append(_hash(block.get("hash")))
            self.index.replace(self.worker, hashes)
            self.last_id = eid
            self.events += 1
            return "ok"
        if self.last_id is None or eid != self.last_id + 1:
            # A gap (missed events) or events before any snapshot: our mirror may be wrong.
            return self._resync()
        if kind == "stored":
            self.index.store(self.worker, _hashes(event))
        elif kind == "removed":
            self.index.remove(self.worker, _hashes(event))
        elif kind == "cleared":
            self.index.clear(self.worker)
        # Unknown kinds (a newer worker) still advance the id: only the id tells of a gap.
        self.last_id = eid
        self.events += 1
        return "ok"

    def _resync(self) -> Literal["resync"]:
        self.last_id = None
        self.resyncs += 1
        return "resync"


def _hash(value: object) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"a block hash must be a hex string, got {value!r}")
    try:
        return bytes.fromhex(value)
    except ValueError as e:
        raise ValueError(f"a block hash must be a hex string, got {value!r}") from e


def _hashes(event: Mapping[str, object]) -> list[bytes]:
    values = event.get("block_hashes")
    if not isinstance(values, list):
        raise ValueError(f"{event.get('type')} event without block_hashes: {_short(event)}")
    return [_hash(v) for v in values]


def _short(event: Mapping[str, object]) -> str:
    text = repr(dict(event))
    return text if len(text) <= 200 else text[:200] + "..."


# --- load ------------------------------------------------------------------------------------


@dataclass
class ActiveRequest:
    """A request in flight on a worker, as the router sees it pass."""

    worker: str
    hashes: tuple[bytes, ...]
    prompt_tokens: int
    output_tokens: int = 0
    extra_blocks: int = 0
    """Blocks beyond its hashed full prompt blocks: a partial last block and the output."""


class LoadTracker:
    """Requests in flight per worker and the KV blocks they hold there (module docstring).

    Args:
        block_size: tokens per block.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._requests: dict[int, ActiveRequest] = {}
        self._refs: dict[str, dict[bytes, int]] = {}
        """worker -> prompt block hash -> in-flight requests holding it."""
        self._extra: dict[str, int] = {}
        self._count: dict[str, int] = {}
        self._tokens: dict[str, int] = {}

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def start(
        self, request_id: int, worker: str, hashes: Sequence[bytes], prompt_tokens: int
    ) -> None:
        """A request was sent to ``worker``.

        Raises:
            ValueError: ``request_id`` is already in flight.
        """
        if request_id in self._requests:
            raise ValueError(f"request {request_id} is already in flight")
        extra = max(self._blocks_for(prompt_tokens) - len(hashes), 0)
        self._requests[request_id] = ActiveRequest(worker, tuple(hashes), prompt_tokens, 0, extra)
        refs = self._refs.setdefault(worker, {})
        for h in hashes:
            refs[h] = refs.get(h, 0) + 1
        self._extra[worker] = self._extra.get(worker, 0) + extra
        self._count[worker] = self._count.get(worker, 0) + 1
        self._tokens[worker] = self._tokens.get(worker, 0) + prompt_tokens

    def add_output(self, request_id: int, tokens: int) -> None:
        """``tokens`` more output tokens of a request passed (no error if it has ended)."""
        request = self._requests.get(request_id)
        if request is None or tokens <= 0:
            return
        request.output_tokens += tokens
        total = self._blocks_for(request.prompt_tokens + request.output_tokens)
        extra = max(total - len(request.hashes), 0)
        self._extra[request.worker] += extra - request.extra_blocks
        self._tokens[request.worker] += tokens
        request.extra_blocks = extra

    def finish(self, request_id: int) -> None:
        """The request ended (answered, failed or abandoned); no error if it is not known."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        worker = request.worker
        refs = self._refs[worker]
        for h in request.hashes:
            n = refs[h] - 1
            if n:
                refs[h] = n
            else:
                del refs[h]
        self._extra[worker] -= request.extra_blocks
        self._count[worker] -= 1
        self._tokens[worker] -= request.prompt_tokens + request.output_tokens

    def in_flight(self, worker: str) -> int:
        return self._count.get(worker, 0)

    def tokens(self, worker: str) -> int:
        """Prompt + output tokens of the requests in flight on ``worker``."""
        return self._tokens.get(worker, 0)

    def active_blocks(self, worker: str) -> int:
        """KV blocks the requests in flight on ``worker`` hold (shared prompt blocks once)."""
        return len(self._refs.get(worker, ())) + self._extra.get(worker, 0)

    def new_blocks(self, worker: str, hashes: Sequence[bytes], prompt_tokens: int) -> int:
        """Blocks a request would add to ``worker``'s active blocks."""
        refs = self._refs.get(worker, {})
        shared = sum(1 for h in hashes if h in refs)
        return self._blocks_for(prompt_tokens) - shared


# --- cost and choice -------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerCost:
    """One worker's cost for one request (module docstring), lower is better."""

    worker: str
    overlap_blocks: int
    prefill_blocks: float
    decode_blocks: int
    cost: float


def score(
    workers: Sequence[str],
    hashes: Sequence[bytes],
    prompt_tokens: int,
    overlaps: Mapping[str, int],
    load: LoadTracker,
    prefill_weight: float,
) -> list[WorkerCost]:
    """The cost of sending a request to each of ``workers``, in their order.

    Args:
        workers: the candidates.
        hashes: the request's full prompt block hashes.
        prompt_tokens: its prompt length.
        overlaps: worker -> leading blocks of ``hashes`` it holds (absent: 0).
        load: the requests in flight.
        prefill_weight: weight of the uncached prompt blocks.
    """
    bs = load.block_size
    out = []
    for w in workers:
        overlap = overlaps.get(w, 0)
        prefill = max(prompt_tokens - overlap * bs, 0) / bs
        decode = load.active_blocks(w) + load.new_blocks(w, hashes, prompt_tokens)
        out.append(WorkerCost(w, overlap, prefill, decode, prefill_weight * prefill + decode))
    return out


def pick(costs: Sequence[WorkerCost], temperature: float, rng: random.Random) -> WorkerCost:
    """The worker to use: the lowest cost (random among ties) when ``temperature`` is 0, else
    a draw with probability ``softmax(-cost / temperature)``.

    Raises:
        ValueError: ``costs`` is empty or ``temperature`` is negative.
    """
    if not costs:
        raise ValueError("no worker to pick from")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    best = min(c.cost for c in costs)
    if temperature == 0:
        # Costs are sums of floats: a hair of slack so equal costs tie.
        return rng.choice([c for c in costs if c.cost <= best + 1e-9])
    # Shifted by the minimum: exp() of the best is 1, never overflows or underflows to all 0.
    weights = [math.exp(-(c.cost - best) / temperature) for c in costs]
    return rng.choices(costs, weights=weights)[0]


class RoundRobin:
    """Cycles over a fixed list of workers, skipping those not currently eligible."""

    def __init__(self, workers: Sequence[str]) -> None:
        self._workers = list(workers)
        self._next = 0

    def next(self, eligible: Iterable[str]) -> str | None:
        """The next eligible worker in turn; None if none is."""
        ok = set(eligible)
        n = len(self._workers)
        for i in range(n):
            w = self._workers[(self._next + i) % n]
            if w in ok:
                self._next = (self._next + i + 1) % n
                return w
        return None
