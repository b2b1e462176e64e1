"""vLLM's KV events, as the router reads them: a ZeroMQ subscriber and the translation of each
event into the router's :class:`~kvferry.serving.router.prefix_index.PrefixIndex`.

vLLM publishes its prefix cache's changes when started with ``--kv-events-config
'{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557",
"replay_endpoint": "tcp://*:5558"}'``: a PUB socket sends multipart messages ``(topic, seq,
payload)``, ``seq`` an 8-byte big-endian batch number from 0, ``payload`` a msgpack
``KVEventBatch`` ``[ts, events, dp_rank]`` whose events are maps tagged by ``type``:
``BlockStored`` (``block_hashes``, ``parent_block_hash``, ``token_ids``, ``block_size``,
``extra_keys``, ``medium``, ...), ``BlockRemoved`` (``block_hashes``, ``medium``) and
``AllBlocksCleared``. A ROUTER socket at the replay endpoint answers a request
``(b"", start_seq)`` with every buffered batch from ``start_seq`` on, then ``seq`` = -1.

**Hashes** (:class:`VllmEventMirror`): vLLM's block hashes are its own (a hash function and seed
the router does not share), so, like Dynamo's router, kvferry recomputes each stored block's
key from the event's token ids: ``BlockHasher(block_size, model_name, cache_salt)`` chained
from the key of ``parent_block_hash`` (kept in a vLLM hash -> kvferry key map), the same key the
router computes for a prompt. A removal looks the key up in that map. ``cache_salt`` is read
from the first block's ``extra_keys`` (vLLM salts only a prompt's first block); kvferry salts
every link of a chain, so a continuation is hashed with its parent's salt, kept beside its key.
Blocks the router cannot key are skipped and counted (``skipped_blocks``): LoRA or multimodal
extra keys, a parent the router never saw stored (events missed before it subscribed, with no
replay), another KV cache group (``group_idx`` > 0: hybrid models), or a medium other than the
GPU (vLLM's offloading tiers).
Events whose block size differs from the router's raise :class:`~kvferry.errors.ConfigError`.

**Order** (:func:`follow_vllm_events`): a new subscriber first asks the replay socket for the
whole buffer (what vLLM cached before the router came up, known at once rather than at the
worker's next batch); then the first batch, a gap in ``seq`` and a worker that was marked down
are answered by a replay request from the first batch missed (from 0 after a reset); without
a replay endpoint, or when vLLM's buffer no longer reaches back that far, the router goes on
with what it has (``gaps`` counts it; blocks it never saw stored are not routed to, never
routed to wrongly). ``seq`` going back means vLLM restarted (unless the batch is the live copy
of one a replay brought, same number and same bytes): its blocks are dropped and mirroring
starts over from a replay. So does a reconnect of the subscriber after which the publisher's
buffer no longer holds the last batch applied byte for byte: a restarted vLLM's first batches
can be lost while the subscriber reconnects, so that the first one heard has the very number
expected next.

**Discovery** (:func:`discovered_endpoints`): vLLM's ``GET /kv_event_sources`` answers its
publishers' resolved configs by data-parallel rank, so a router given only the worker's URL can
find the endpoints itself: a wildcard bind (``tcp://*:5557``) is reached at the worker URL's
host, ``ipc://`` paths as they are (same machine).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from kvferry.errors import ConfigError, MissingDependency
from kvferry.index.hashing import BlockHasher
from kvferry.serving.router.prefix_index import PrefixIndex

__all__ = [
    "END_SEQ",
    "VllmEventMirror",
    "decode_batch",
    "discovered_endpoints",
    "follow_vllm_events",
]

log = logging.getLogger("kvferry.serving.router.server")

END_SEQ: Final = -1
"""The replay socket's end-of-replay sequence number."""
PRIMARY_MEDIA: Final = (None, "GPU")
"""Media whose blocks are the worker's own prefix cache (vLLM names its main KV cache GPU on
every device, CPU builds included)."""


_WILDCARD_HOSTS: Final = frozenset(("*", "0.0.0.0", "::", "[::]", "[*]"))


def discovered_endpoints(sources: object, worker_url: str) -> tuple[str, str | None]:
    """The publisher and replay endpoints to subscribe to, from a vLLM server's answer to
    ``GET /kv_event_sources`` (``{"<dp rank>": KVEventsConfig as JSON}``).

    Raises:
        ValueError: the answer gives nothing the router can read: no publisher (vLLM was
            started without ``--kv-events-config``), not ZeroMQ, several data-parallel ranks
            (each its own stream of one worker URL), or an endpoint the router cannot connect
            to (the message says what to give ``--vllm-events`` instead).
    """
    if not isinstance(sources, dict):
        raise ValueError(f"/kv_event_sources answered {sources!r:.200}, not a JSON object")
    configs = [c for c in sources.values() if isinstance(c, dict)]
    if len(configs) != len(sources):
        raise ValueError(f"/kv_event_sources answered {sources!r:.200}: not configs by rank")
    configs = [c for c in configs if c.get("enable_kv_cache_events", True)]
    if not configs:
        raise ValueError(
            "vLLM publishes no KV events; start it with --kv-events-config, e.g. "
            '{"enable_kv_cache_events": true, "publisher": "zmq", '
            '"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}'
        )
    if len(configs) > 1:
        raise ValueError(
            f"vLLM has {len(configs)} data-parallel ranks publishing KV events, and the router "
            "keys one worker URL by one event stream; give --vllm-events for the rank to follow"
        )
    config = configs[0]
    if config.get("publisher") != "zmq":
        raise ValueError(f"vLLM's KV event publisher is {config.get('publisher')!r}, not zmq")
    host = urlsplit(worker_url).hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    endpoint = config.get("endpoint")
    replay = config.get("replay_endpoint")
    return (
        _connectable(endpoint, host, "endpoint"),
        None if replay is None else _connectable(replay, host, "replay_endpoint"),
    )


def _connectable(endpoint: object, host: str, what: str) -> str:
    """``endpoint`` as the router connects to it: a wildcard host becomes ``host``."""
    if isinstance(endpoint, str):
        scheme, sep, rest = endpoint.partition("://")
        if sep and scheme == "ipc" and rest:
            return endpoint
        bound, _, port = rest.rpartition(":")
        if sep and scheme == "tcp" and bound and port.isdigit() and int(port) > 0:
            return f"tcp://{host if bound in _WILDCARD_HOSTS else bound}:{port}"
    raise ValueError(
        f"vLLM's KV event {what} {endpoint!r} is not one the router can connect to "
        "(tcp://HOST:PORT or ipc://PATH); give the worker's endpoints with --vllm-events"
    )


def decode_batch(payload: bytes) -> list[Mapping[str, Any]]:
    """The events of one msgpack ``KVEventBatch`` payload.

    Raises:
        MissingDependency: msgspec is not installed.
        ValueError: not a batch (the message says what was found).
    """
    try:
        import msgspec
    except ImportError as e:
        raise MissingDependency("msgspec (to read vLLM KV events)", "vllm") from e
    try:
        batch = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as e:
        raise ValueError(f"a vLLM KV event batch is not msgpack: {e}") from e
    if not (isinstance(batch, list) and len(batch) >= 2 and isinstance(batch[1], list)):
        raise ValueError(f"a vLLM KV event batch must be [ts, events, ...], got {batch!r:.200}")
    events = batch[1]
    for event in events:
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise ValueError(f"a vLLM KV event must be a map with a type, got {event!r:.200}")
    return events


@dataclass
class VllmEventMirror:
    """Applies one vLLM worker's KV events to a :class:`PrefixIndex` (module docstring).

    Attributes:
        index: the index to keep true.
        worker: whose events these are (its URL).
        block_size: the router's; events of another block size raise.
        batches: batches applied.
        gaps: times batches were missed and could not be replayed.
        skipped_blocks: stored blocks the router could not key.
        resets: times the mirror started over (worker down, vLLM restarted).
    """

    index: PrefixIndex
    worker: str
    block_size: int
    batches: int = 0
    gaps: int = 0
    skipped_blocks: int = 0
    resets: int = 0
    next_seq: int | None = None
    """The batch expected next; None: nothing applied since the last reset."""
    _keys: dict[object, tuple[bytes, str]] = field(default_factory=dict)
    """vLLM block hash -> (kvferry key, its cache_salt), for every block the worker holds that
    was keyed; a continuation is hashed with its parent's salt."""
    _hashers: dict[tuple[str, str], BlockHasher] = field(default_factory=dict)

    @property
    def mapped_blocks(self) -> int:
        return len(self._keys)

    def reset(self) -> None:
        """Forget the worker's blocks (its cache is unknown now; a replay or new events
        rebuild it)."""
        self.index.clear(self.worker)
        self._keys.clear()
        self.next_seq = None
        self.resets += 1

    def apply(self, events: Sequence[Mapping[str, Any]], model: str) -> None:
        """Apply one batch's events, in order; ``model`` salts the keys.

        Raises:
            ConfigError: an event's block size is not the router's.
            ValueError: an event is malformed.
        """
        for event in events:
            kind = event["type"]
            if kind == "BlockStored":
                self._stored(event, model)
            elif kind == "BlockRemoved":
                if event.get("medium") in PRIMARY_MEDIA and not event.get("group_idx"):
                    hashes = _list(event, "block_hashes")
                    gone = (self._keys.pop(_hashable(h), None) for h in hashes)
                    keys = [entry[0] for entry in gone if entry]
                    self.index.remove(self.worker, keys)
            elif kind == "AllBlocksCleared":
                self.index.clear(self.worker)
                self._keys.clear()
            # Other kinds (a newer vLLM) change nothing the router can key.
        self.batches += 1

    def _stored(self, event: Mapping[str, Any], model: str) -> None:
        hashes = _list(event, "block_hashes")
        size = event.get("block_size")
        if size != self.block_size:
            raise ConfigError(
                f"worker {self.worker} has block_size {size} (its vLLM KV events), the router "
                f"has router.block_size {self.block_size}; they must be equal "
                f"(--block-size {size})"
            )
        tokens = _list(event, "token_ids")
        if len(tokens) != len(hashes) * self.block_size or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise ValueError(
                f"BlockStored with {len(hashes)} block(s) of {self.block_size} needs "
                f"{len(hashes) * self.block_size} integer token ids, got {len(tokens)}"
            )
        if (
            event.get("medium") not in PRIMARY_MEDIA
            or event.get("group_idx")
            or event.get("lora_name")
            or event.get("lora_id")
        ):
            self.skipped_blocks += len(hashes)
            return
        parent = event.get("parent_block_hash")
        extra = event.get("extra_keys") or [None] * len(hashes)
        salt = ""
        if parent is None:
            first = extra[0] if extra else None
            if first is not None:
                if not (len(first) == 1 and isinstance(first[0], str)):
                    self.skipped_blocks += len(hashes)  # multimodal or embeddings: not keyable
                    return
                salt = first[0]
            prev = None
        else:
            known = self._keys.get(_hashable(parent))
            if known is None:  # its parent was stored before we listened
                self.skipped_blocks += len(hashes)
                return
            prev, salt = known
        if any(e is not None for e in extra[1 if parent is None else 0 :]):
            self.skipped_blocks += len(hashes)
            return
        keys = self._hasher(model, salt).hashes(tokens, parent=prev)
        for h, key in zip(hashes, keys, strict=True):
            self._keys[_hashable(h)] = (key, salt)
        self.index.store(self.worker, keys)

    def _hasher(self, model: str, salt: str) -> BlockHasher:
        hasher = self._hashers.get((model, salt))
        if hasher is None:
            if len(self._hashers) >= 256:
                self._hashers.clear()
            hasher = BlockHasher(self.block_size, model_name=model, cache_salt=salt)
            self._hashers[(model, salt)] = hasher
        return hasher


def _list(event: Mapping[str, Any], key: str) -> list[Any]:
    value = event.get(key)
    if not isinstance(value, list):
        raise ValueError(f"{event.get('type')} event without a {key} list: {dict(event)!r:.200}")
    return value


def _hashable(value: object) -> object:
    """A vLLM block hash (bytes or int) as a dict key."""
    if isinstance(value, bytes | int) and not isinstance(value, bool):
        return value
    if isinstance(value, list):  # an older msgpack encoding of a tuple
        return tuple(value)
    raise ValueError(f"a vLLM block hash must be bytes or an int, got {value!r:.80}")


# --- the subscriber ----------------------------------------------------------------------------


@dataclass
class ReplayOutcome:
    """What a replay request brought: batches ``(seq, payload)`` in order, and whether vLLM's
    buffer reached back to the first batch asked for."""

    batches: list[tuple[int, bytes]]
    complete: bool


async def _replay(ctx: Any, endpoint: str, start: int, timeout_s: float) -> ReplayOutcome:
    """Ask vLLM's replay socket for every batch from ``start`` on.

    Raises:
        TimeoutError: no answer (or no end marker) within ``timeout_s`` of the last frame.
    """
    import asyncio

    import zmq

    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        await sock.send_multipart([b"", start.to_bytes(8, "big", signed=True)])
        batches: list[tuple[int, bytes]] = []
        while True:
            frames = await asyncio.wait_for(sock.recv_multipart(), timeout_s)
            if len(frames) != 4:
                raise ValueError(f"a replay answer has 4 frames, got {len(frames)}")
            _, _, seq_bytes, payload = frames
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if seq == END_SEQ:
                break
            batches.append((seq, payload))
    finally:
        sock.close()
    return ReplayOutcome(batches, complete=not batches or batches[0][0] <= start)


async def follow_vllm_events(
    mirror: VllmEventMirror,
    endpoint: str,
    replay: str | None,
    *,
    model: Callable[[], str],
    on_applied: Callable[[], None],
    timeout_s: float,
) -> None:
    """Mirror a vLLM worker's ZeroMQ KV events for as long as the task runs (module
    docstring). ``model()`` salts the keys (the router's model, learned at start-up);
    ``on_applied`` is called after every batch applied (the worker's kv_source becomes
    "events"). A malformed batch is logged and skipped, with a replay of what follows.

    Raises:
        MissingDependency: pyzmq or msgspec is not installed.
        ConfigError: the worker's block size is not the router's (the caller marks it down).
    """
    try:
        import zmq
        import zmq.asyncio
    except ImportError as e:
        raise MissingDependency("pyzmq (to read vLLM KV events)", "vllm") from e
    from zmq.utils.monitor import parse_monitor_message

    ctx = zmq.asyncio.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    # Connection events of the subscriber: a reconnect is when a restarted vLLM can slip by.
    monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED)
    sub.connect(endpoint)
    poller = zmq.asyncio.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    worker = mirror.worker
    last: tuple[int, int] | None = None  # number and payload hash of the last batch applied
    connected_before = False

    def apply(seq: int, payload: bytes) -> None:
        nonlocal last
        try:
            events = decode_batch(payload)
        except ValueError as e:
            log.warning("worker %s: vLLM KV event batch %d skipped: %s", worker, seq, e)
            events = []
        mirror.apply(events, model())
        mirror.next_seq = seq + 1
        last = (seq, hash(payload))
        on_applied()

    # The batches replays applied that the live stream has not passed yet (seq -> hash of the
    # payload): a live batch below next_seq is one of them arriving late (skipped), or else
    # proof that the publisher restarted and counts from 0 again.
    replayed: dict[int, int] = {}

    async def replay_from(start: int) -> ReplayOutcome | None:
        """The replay socket's batches from ``start``; None (logged) when it failed."""
        assert replay is not None
        try:
            return await _replay(ctx, replay, start, timeout_s)
        except (TimeoutError, ValueError, zmq.ZMQError) as e:
            log.warning("worker %s: vLLM KV event replay failed: %s", worker, e)
            return None

    async def catch_up(start: int) -> bool:
        """Apply the replay from ``start``; True when it reached back that far."""
        outcome = await replay_from(start)
        if outcome is None:
            return False
        for rseq, rpayload in outcome.batches:
            if rseq >= start and (mirror.next_seq is None or rseq >= mirror.next_seq):
                apply(rseq, rpayload)
                replayed[rseq] = hash(rpayload)
        return outcome.complete

    async def still_the_same_publisher() -> bool:
        """After a reconnect: does the publisher's replay buffer still hold the last batch
        applied, byte for byte? A restarted vLLM counts from 0 again, and its first batches
        may be lost while the subscriber reconnects, so the numbers alone can line up."""
        if replay is None or last is None or mirror.next_seq is None:
            return True  # nothing to compare (a replay from 0 follows anyway when reset)
        outcome = await replay_from(last[0])
        if outcome is None:
            return True  # cannot tell: the numbers decide
        if not outcome.batches:
            return False  # fewer batches than we applied: a new publisher
        seq, payload = outcome.batches[0]
        if seq > last[0]:
            return True  # that batch left its buffer: cannot tell, the numbers decide
        return seq == last[0] and hash(payload) == last[1]

    try:
        if replay is not None and mirror.next_seq is None:
            # What vLLM cached before the router subscribed, now rather than at its next batch
            # (an idle worker may publish nothing for a long time).
            await catch_up(0)
        while True:
            ready = dict(await poller.poll())
            if monitor in ready:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_CONNECTED:
                    if connected_before and not await still_the_same_publisher():
                        log.info("worker %s: vLLM's KV event publisher restarted", worker)
                        mirror.reset()
                        replayed.clear()
                        last = None
                        await catch_up(0)
                    connected_before = True
            if sub not in ready:
                continue
            frames = await sub.recv_multipart()
            if len(frames) != 3:
                log.warning("worker %s: a vLLM KV event message of %d frames", worker, len(frames))
                continue
            _, seq_bytes, payload = frames
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            expected = mirror.next_seq
            if expected is not None and seq < expected:
                if replayed.get(seq) == hash(payload):
                    continue  # already applied (a replay overlapped the live stream)
                log.info("worker %s: vLLM KV events went back to %d: vLLM restarted", worker, seq)
                mirror.reset()
                replayed.clear()
                expected = None
            if expected is None or seq > expected:
                start = 0 if expected is None else expected
                caught_up = replay is not None and await catch_up(start)
                if not caught_up and (expected is not None or seq > 0):
                    mirror.gaps += 1
                    log.info(
                        "worker %s: vLLM KV event batches from %d missed; blocks stored then "
                        "are not routed to",
                        worker,
                        start,
                    )
                if mirror.next_seq is not None and seq < mirror.next_seq:
                    continue  # the replay covered it
            apply(seq, payload)
            replayed.clear()  # the live stream is past every replayed batch
    finally:
        with contextlib.suppress(Exception):
            sub.disable_monitor()
            monitor.close()
        with contextlib.suppress(Exception):
            sub.close()
