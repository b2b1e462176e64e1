"""Keeping a published name alive: with ``metadata.ttl`` set, an entry expires unless refreshed.

:class:`Republisher` publishes a listening engine's name again every third of the ttl, from a
daemon thread, until the engine stops listening.
"""

from __future__ import annotations

import logging
import threading

from kvferry.errors import KvferryError
from kvferry.observe.logs import RateLimitedLog
from kvferry.transfer.metadata.base import MetadataService

__all__ = ["Republisher"]

_log = RateLimitedLog(logging.getLogger("kvferry.transfer.metadata"))


class Republisher:
    """Publishes a listening engine's name again every third of the metadata ttl, so the entry
    expires only when the engine is gone (killed, or its host cut off), never while it serves.
    A failed refresh is retried at the next tick (a warning, held to a rate); ``stop`` joins."""

    def __init__(
        self,
        service: MetadataService,
        name: str,
        address: tuple[str, int],
        instance: str,
        ttl: float,
    ) -> None:
        self._service = service
        self._args = (name, address, instance)
        self._period = ttl / 3
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"kvferry-republish-{name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._period):
            try:
                self._service.publish(*self._args)
            except KvferryError as e:
                _log.warning("metadata", "cannot refresh %r: %s", self._args[0], e)

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
