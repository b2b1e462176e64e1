"""Redis metadata: targets publish ``<prefix>:segment:<name>`` -> JSON address; initiators read it.

Needs the ``redis`` extra. Any name works (e.g. "prefill-0"); with ``ttl`` set the entry expires
unless refreshed: a listening engine publishes it again every ttl/3 until it stops listening, so
a dead target stops resolving within the ttl and a live one never does.
"""

from __future__ import annotations

import json
import math
from typing import Any

from kvferry.config.models import MetadataConfig
from kvferry.errors import MissingDependency, PeerClosed, SegmentError
from kvferry.transfer.metadata.base import MetadataService, check_address


class RedisMetadata(MetadataService):
    name = "redis"
    url_schemes = ("redis", "rediss", "unix")

    def __init__(self, config: MetadataConfig) -> None:
        super().__init__(config)
        try:
            import redis
        except ImportError as e:
            raise MissingDependency("redis", "redis") from e
        self._redis_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._client: Any = redis.Redis.from_url(
            config.url, socket_timeout=5, socket_connect_timeout=5
        )

    def _key(self, name: str) -> str:
        return f"{self.config.key_prefix}:segment:{name}"

    def publish(self, name: str, address: tuple[str, int], instance: str) -> None:
        check_address(address)
        doc = json.dumps({"host": address[0], "port": address[1], "instance": instance})
        # Rounded up: a positive ttl under a millisecond ("500us") must not become "forever".
        ttl_ms = math.ceil(self.config.ttl * 1000) if self.config.ttl > 0 else None
        try:
            self._client.set(self._key(name), doc, px=ttl_ms)
        except self._redis_errors as e:
            raise PeerClosed(f"cannot publish {name!r} to {self.config.url}: {e}") from e

    def resolve(self, name: str) -> tuple[str, int]:
        try:
            raw = self._client.get(self._key(name))
        except self._redis_errors as e:
            raise PeerClosed(f"cannot resolve {name!r} through {self.config.url}: {e}") from e
        if raw is None:
            raise SegmentError(f"segment {name!r} is not published in {self.config.url}")
        try:
            doc = json.loads(raw)
            host, port = doc["host"], doc["port"]
            if not isinstance(host, str) or not isinstance(port, int):
                raise TypeError("host must be a string and port an int")
        except (ValueError, KeyError, TypeError) as e:
            raise SegmentError(f"metadata of {name!r} is malformed: {e}") from e
        return host, port

    def unpublish(self, name: str) -> None:
        try:
            self._client.delete(self._key(name))
        except self._redis_errors:
            pass

    def close(self) -> None:
        self._client.close()
