"""Store-server membership in Redis: leases with a TTL, kept by the servers, read by clients.

Layout under the prefix ``server.membership_key`` (default ``kvferry:store-servers``)::

    <prefix>:members              a set of "host:port", one per server that ever joined
    <prefix>:member:<host:port>   the server's lease: its instance id, with a TTL (PX)

A server (:class:`Registration`) SETs its lease with ``PX = server.membership_ttl`` and SADDs
itself to the set, then repeats both every third of the TTL from a thread; a clean shutdown
DELetes the lease and SREMs itself. A server killed with SIGKILL leaves its lease to expire:
Redis drops it after at most one TTL, by Redis's own clock, so nothing compares clocks between
machines (the old layout, a hash of wall-clock heartbeats judged stale by each client, did).

A client (:func:`read_members`) reads the set and the leases in one round trip (SMEMBERS, then
MGET of the lease keys); a member whose lease is gone is not live, and the client SREMs it. Why a
set beside the keys rather than SCAN over the prefix: SCAN walks the whole keyspace of the
database, and the membership Redis is often the one that holds the redis tier's millions of
blocks, so a poll every second would cost O(all keys); SMEMBERS + MGET costs O(servers).

Races, and why they heal: a client's SREM of a member whose lease had just expired can land
after that server restarted and re-SADDed; the server's next refresh (a third of the TTL later)
SADDs it again. The refresh SETs the lease rather than PEXPIRE-ing it, so a lease lost to a
Redis restart or a stall longer than the TTL comes back with the next refresh.

The instance id (random per server start) tells a client that a member it marked down after a
failed call has restarted, so it rejoins without waiting for a probe.

Must not: hold a Redis connection across calls on the client side (each read opens and closes
one, bounded by ``server.timeout``), or stop a server from serving when Redis is unreachable
(membership is advisory; failures are logged and retried on the next refresh).
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from kvferry.backends.redis import redact_url
from kvferry.errors import MissingDependency, StorageError

log = logging.getLogger("kvferry.backends.server.membership")

__all__ = ["Registration", "lease_key", "members_key", "read_members"]


def members_key(prefix: str) -> str:
    """The set of members under ``prefix``."""
    return f"{prefix}:members"


def lease_key(prefix: str, member: str) -> str:
    """The lease key of ``member`` ("host:port") under ``prefix``."""
    return f"{prefix}:member:{member}"


def _client(url: str, timeout: float) -> Any:
    """A Redis client with every wait bounded by ``timeout`` and no retry of its own (the next
    refresh or poll is the retry)."""
    try:
        import redis
        import redis.backoff
        import redis.retry
    except ImportError as e:
        raise MissingDependency("redis", "redis") from e
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
    )


def read_members(url: str, prefix: str, timeout: float) -> dict[str, str]:
    """The live members under ``prefix``: "host:port" -> instance id.

    Members listed in the set whose lease has expired are removed from the set (best effort).

    Raises:
        StorageError: Redis cannot be reached or answered an error (names the URL).
    """
    import redis

    client = _client(url, timeout)
    try:
        names = sorted(m.decode() for m in client.smembers(members_key(prefix)))
        if not names:
            return {}
        values = client.mget([lease_key(prefix, m) for m in names])
        live = {m: v.decode() for m, v in zip(names, values) if v is not None}
        gone = [m for m in names if m not in live]
        if gone:
            client.srem(members_key(prefix), *gone)
        return live
    except redis.RedisError as e:
        raise StorageError(
            f"server tier: cannot read the membership at {redact_url(url)}: {e}"
        ) from e
    finally:
        client.close()


class Registration:
    """One server's lease in the membership; ``start`` joins, ``close`` leaves.

    Args:
        url: the membership Redis URL (``server.membership_url``).
        prefix: ``server.membership_key``.
        member: this server's "host:port" as clients should dial it.
        ttl: ``server.membership_ttl`` seconds.
    """

    def __init__(self, url: str, prefix: str, member: str, ttl: float) -> None:
        self.url = url
        self.prefix = prefix
        self.member = member
        self.ttl = ttl
        self.instance = uuid.uuid4().hex
        self._interval = ttl / 3
        # A refresh must end well inside the TTL, or a slow Redis would let the lease lapse.
        self._client = _client(url, min(2.0, self._interval))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refresh_failures = 0

    def _refresh(self) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.set(lease_key(self.prefix, self.member), self.instance, px=int(self.ttl * 1000))
        pipe.sadd(members_key(self.prefix), self.member)
        pipe.execute()

    def start(self) -> None:
        """Take the lease (one synchronous refresh) and keep it from a thread.

        Raises:
            StorageError: the first refresh failed (Redis unreachable): a server that was asked
                to register and cannot is told at start, not left invisible.
        """
        import redis

        try:
            self._refresh()
        except redis.RedisError as e:
            raise StorageError(
                f"cannot register in the membership at {redact_url(self.url)}: {e}"
            ) from e
        self._thread = threading.Thread(target=self._run, name="kvferry-membership", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._refresh()
            except Exception as e:  # isolation boundary: keep serving, retry next interval
                self.refresh_failures += 1
                log.warning("store server: membership refresh failed: %s", e)

    def close(self) -> None:
        """Stop refreshing, delete the lease and leave the set (best effort); idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.delete(lease_key(self.prefix, self.member))
            pipe.srem(members_key(self.prefix), self.member)
            pipe.execute()
        except Exception as e:  # leaving is best effort: the lease expires by itself
            log.warning("store server: leaving the membership failed: %s", e)
        finally:
            self._client.close()
