"""The KV event stream of the simulated engine: JSON form, replay history, fan-out.

Owns what ``GET /kv/events`` sends (the format is documented in :mod:`kvferry.serving.mock.server`):
:func:`event_json` turns a :class:`~kvferry.serving.mock.blocks.KvEvent` into its JSON object, and
:class:`EventHub` listens to one engine's block manager, keeps the last ``history`` events for
``?since=`` replays, and queues every event for each subscriber. A subscriber that falls
:data:`SUBSCRIBER_QUEUE` events behind is cut off (it reconnects with ``since``), so a slow
reader never grows memory without bound. No sockets here: the HTTP handler writes the bytes.
Everything runs on the engine's event loop thread.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Mapping
from typing import Final

from kvferry.serving.mock.blocks import KvEvent
from kvferry.serving.mock.scheduler import MockEngine

__all__ = ["SUBSCRIBER_QUEUE", "EventHub", "Subscriber", "event_json", "sse"]

SUBSCRIBER_QUEUE: Final = 10_000
"""Events a subscriber may lag behind before it is disconnected."""


def event_json(event: KvEvent, block_size: int) -> dict[str, object]:
    """The JSON object of one KV event (module docstring)."""
    out: dict[str, object] = {"id": event.event_id, "type": event.kind}
    if event.kind == "stored":
        out["block_hashes"] = [h.hex() for h in event.block_hashes]
        out["parent_hash"] = event.parent_hash.hex() if event.parent_hash is not None else None
        out["token_count"] = event.token_count
        out["block_size"] = block_size
    elif event.kind == "removed":
        out["block_hashes"] = [h.hex() for h in event.block_hashes]
    return out


def sse(event_id: int | None, data: Mapping[str, object]) -> bytes:
    """One SSE message: an ``id:`` line when ``event_id`` is given, one ``data:`` line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Subscriber:
    """One /kv/events reader: its queue of encoded messages (None ends the stream) and whether
    it was cut off for lagging."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.lagged = False


class EventHub:
    """Fans a block manager's events out to /kv/events subscribers and keeps a replay history.

    Args:
        engine: whose block manager to listen to.
        history: events kept for ``?since=`` replays.
    """

    def __init__(self, engine: MockEngine, history: int) -> None:
        self._engine = engine
        self._block_size = engine.config.block_size
        self._history: deque[tuple[int, bytes]] = deque(maxlen=max(history, 0) or None)
        self._keep = history > 0
        self._subscribers: set[Subscriber] = set()
        self.events = 0
        engine.blocks.add_listener(self._on_event)

    def _on_event(self, event: KvEvent) -> None:
        self.events += 1
        message = sse(event.event_id, event_json(event, self._block_size))
        if self._keep:
            self._history.append((event.event_id, message))
        for sub in list(self._subscribers):
            if sub.lagged:
                continue
            if sub.queue.qsize() >= SUBSCRIBER_QUEUE:
                # A slow reader must not grow memory without bound: cut it off, it resumes
                # with ?since=.
                sub.lagged = True
                while not sub.queue.empty():
                    sub.queue.get_nowait()
                sub.queue.put_nowait(None)
                continue
            sub.queue.put_nowait(message)

    def subscribe(self, since: int | None) -> tuple[Subscriber, list[bytes]]:
        """A new subscriber and what it gets first: the events after ``since`` when the
        history still holds them all, else a snapshot."""
        sub = Subscriber()
        self._subscribers.add(sub)
        last = self._engine.blocks.last_event_id
        if since is not None and since <= last:
            if since == last:
                return sub, []
            oldest = self._history[0][0] if self._history else last + 1
            if self._keep and since >= oldest - 1:
                return sub, [message for eid, message in self._history if eid > since]
        return sub, [self._snapshot()]

    def _snapshot(self) -> bytes:
        last, blocks = self._engine.blocks.snapshot()
        body = {
            "id": last,
            "type": "snapshot",
            "block_size": self._block_size,
            "blocks": [
                {"hash": h.hex(), "parent_hash": p.hex() if p is not None else None}
                for h, p in blocks
            ],
        }
        return sse(last, body)

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def close(self) -> None:
        """End every subscriber's stream."""
        for sub in self._subscribers:
            sub.queue.put_nowait(None)
