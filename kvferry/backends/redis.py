"""The Redis/Valkey tier: blocks as plain string values in a shared Redis (or Redis Cluster).

This module owns the mapping of the tier primitives onto Redis commands and the translation of
every Redis failure into :class:`~kvferry.errors.StorageError`. It does not decide what to keep:
Redis manages its own space (``maxmemory`` and its eviction policy, optional TTLs), so the tier
has no capacity and never evicts; placement stays with ``kvferry.store``.

Layout: block ``k`` (16 raw bytes) lives at the Redis key ``key_prefix.encode() + k``, binary
safe, its value the block's bytes. Other clients may add and remove blocks at any time
(``shared``), and nothing survives a Redis restart without persistence (``persistent`` is False).

Each primitive is one round trip per node (a pipeline with ``transaction=False``, or one
multi-key command):

- ``put``: ``SET key value NX [PX ttl]`` per block. ``OK`` -> STORED, nil (NX refused) -> EXISTS,
  an ``OOM`` error reply (Redis at ``maxmemory`` with ``noeviction``) -> NO_SPACE for that block.
- ``get``: on a single Redis, one ``MGET`` whose reply kvferry parses itself, straight off the
  pooled connection's socket into the caller's buffers (``redis_mget.MgetReader``): redis-py
  with hiredis would copy each value three times (socket buffer -> hiredis -> ``bytes`` ->
  caller). On a cluster, pipelined ``GET`` through redis-py, whose pipeline splits the keys by
  slot, and one copy from each reply's ``bytes`` into the caller's buffer. The choice is
  measured by ``benchmarks/redis_batch_get.py``.
- A value under the prefix that kvferry cannot have written (larger than ``slot_size``, or not
  a string: another client's key) is a miss for that block, counted as ``foreign`` in the
  tier's stats; the rest of the batch is served. (A foreign string that fits a slot cannot be
  told from a block: values carry no header.)
- ``contains``: pipelined ``EXISTS``; ``delete``: pipelined ``DEL`` (the count of 1s).
- ``keys``: ``SCAN MATCH <escaped prefix>*`` over every primary.

``used_blocks`` is approximate by design: counting our keys in Redis is a full ``SCAN``, so the
tier keeps a local counter of blocks *this client* stored minus those it deleted. It does not see
blocks written or deleted by other clients, expired by the TTL or evicted by Redis.

Cluster or not: ``redis.cluster`` says, and the tier checks. A single-server tier asks the server
once at open (``INFO cluster``: one round trip, one ``socket_timeout`` if the server hangs); a
node of a Redis Cluster switches it to cluster mode, with one warning naming
``redis.cluster=true``. Where that question gets no answer (the server is down at open, or the
user may not run ``INFO``), the first cluster reply to a call (``MOVED``, ``ASK``, ``CROSSSLOT``,
``CLUSTERDOWN``) switches it instead: that call fails with a one-line error that names the flag,
and the next call goes to the cluster.

Failures: a refused or timed-out connection and every ``redis.exceptions.RedisError`` raise
:class:`~kvferry.errors.StorageError` naming the tier and the URL (password hidden). The
connection pool reconnects on its own, so the first call after Redis comes back works again.
A call costs at most one ``socket_timeout`` against a hung server: a dropped connection is
retried once at once, a timeout is not. Skipping a tier that keeps failing is the store's job
(its circuit breaker, ``kvferry.store.breaker``).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel

from kvferry.backends.base import (
    KEY_BYTES,
    Buffer,
    Key,
    PutStatus,
    Tier,
    TierContext,
    TierStats,
)
from kvferry.backends.redis_mget import SCRATCH_BYTES, ErrorReply, MgetReader, ReplyFormatError
from kvferry.config.models import RedisTierConfig
from kvferry.errors import MissingDependency, StorageError

if TYPE_CHECKING:
    from redis import ConnectionPool, Redis
    from redis.cluster import RedisCluster

__all__ = ["RedisTier", "glob_escape", "redact_url"]

log = logging.getLogger(__name__)

_GLOB_SPECIAL = frozenset(b"*?[]\\")
_CLUSTER_REPLIES = ("MOVED ", "ASK ", "CROSSSLOT ", "CLUSTERDOWN ")
"""Error replies only a Redis Cluster node gives (as the direct MGET reader reports them)."""
_SCAN_COUNT = 1000
# A bigger read buffer than redis-py's 64 KiB default for the replies redis-py parses (cluster
# GETs: a batch of 64 KiB blocks is megabytes, and each socket read is fed to hiredis apart).
_SOCKET_READ_SIZE = 1 << 20


def _import_redis() -> ModuleType:
    try:
        import redis
        import redis.backoff
        import redis.cluster
        import redis.retry
    except ImportError as e:
        raise MissingDependency("redis", "redis") from e
    return redis


def redact_url(url: str) -> str:
    """``url`` with the password (if any) replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def glob_escape(prefix: bytes) -> bytes:
    """``prefix`` with Redis glob characters escaped, for ``SCAN MATCH``."""
    out = bytearray()
    for b in prefix:
        if b in _GLOB_SPECIAL:
            out.append(0x5C)  # backslash
        out.append(b)
    return bytes(out)


def _as_bytes_view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class RedisTier(Tier):
    """A Redis/Valkey server or Redis Cluster as a shared, capacity-less remote tier."""

    name = "redis"
    config_section = "redis"
    shared = True
    persistent = False

    def __init__(self, config: BaseModel, context: TierContext) -> None:
        if not isinstance(config, RedisTierConfig):
            raise TypeError(f"RedisTier needs a RedisTierConfig, got {type(config).__name__}")
        super().__init__(config, context)
        self._cfg = config
        self._prefix = config.key_prefix.encode()
        self._url = redact_url(config.url)
        what = "redis tier" if self.label == "redis" else f"redis tier {self.label!r}"
        self._where = f"{what} at {self._url}"
        self._ttl_ms = max(1, round(config.ttl * 1000)) if config.ttl > 0 else None
        self._lock = threading.Lock()
        self._used = 0
        self._peak = 0
        self._counters = {"errors": 0, "no_space": 0, "hits": 0, "misses": 0, "foreign": 0}
        self._closed = False
        redis = _import_redis()
        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.RedisError,
            redis.exceptions.RedisClusterException,
        )
        self._oom: type[BaseException] = redis.exceptions.OutOfMemoryError
        self._reply_error: type[BaseException] = redis.exceptions.ResponseError
        self._cluster_errors: tuple[type[BaseException], ...] = (
            redis.exceptions.AskError,  # and MovedError
            redis.exceptions.ClusterCrossSlotError,
            redis.exceptions.ClusterDownError,
        )
        # One quick reconnect on a dropped connection (a restarted server leaves stale pooled
        # sockets); a server that stays down fails fast instead of backing off for seconds.
        # Connection errors only: redis-py also retries timeouts by default, so a hung server
        # (SIGSTOPped, swapping, a stuck fork) cost two socket_timeouts per call, and as many
        # again for the handshake of the fresh connection that replaced the timed-out one.
        retry = redis.retry.Retry(
            redis.backoff.ExponentialBackoff(cap=0.1, base=0.01),
            1,
            supported_errors=(redis.exceptions.ConnectionError,),
        )
        common: dict[str, Any] = {
            "max_connections": config.pool_size,
            # the blocking pool makes threads wait for a free connection instead of failing
            "connection_pool_class": redis.BlockingConnectionPool,
            "timeout": config.socket_timeout,
            "socket_timeout": config.socket_timeout,
            "socket_connect_timeout": config.socket_timeout,
            "socket_read_size": _SOCKET_READ_SIZE,
            "retry": retry,
            # RESP2 unless the URL asks for ?protocol=3 (redis-py 8 defaults to RESP3): its
            # replies to our commands are plain arrays and bulk strings with no push messages
            # in between, which is what lets get() read MGET replies off the socket itself
            "protocol": 2,
        }
        self._redis = redis
        self._common = common
        self._client: Redis | RedisCluster
        self._pool: ConnectionPool | None = None  # a single server's pool (not a cluster)
        self._cluster = config.cluster
        """Talking to a Redis Cluster: configured, or found out (module docstring)."""
        self._switch_lock = threading.Lock()
        self._direct = False
        self._scratch = threading.local()  # .buf: this thread's MgetReader scratch buffer
        """``get`` reads MGET replies itself: a single server speaking RESP2."""
        with self._failures():
            if config.cluster:
                # connects now: it must learn the slot map before the first command
                self._client = redis.cluster.RedisCluster.from_url(config.url, **common)
            else:
                single = {k: v for k, v in common.items() if k != "connection_pool_class"}
                pool = common["connection_pool_class"].from_url(config.url, **single)
                self._client = redis.Redis(connection_pool=pool)
                self._pool = pool
                self._direct = str(pool.connection_kwargs.get("protocol")) == "2"
        if not config.cluster and self._is_cluster_node():
            log.warning(
                "%s is a node of a Redis Cluster: using cluster mode (set redis.cluster=true "
                "to say so)",
                self._where,
            )
            with self._failures():
                self._to_cluster()

    # -- cluster or not ------------------------------------------------------------------

    def _is_cluster_node(self) -> bool:
        """Whether the server says it is a Redis Cluster node (``INFO cluster``); False when
        it does not answer (down, or this user may not run INFO): a cluster reply to a later
        call finds out instead (:meth:`_error`)."""
        try:
            info = self._client.info("cluster")
        except self._errors:
            return False
        return bool(info.get("cluster_enabled"))

    def _to_cluster(self) -> None:
        """Talk to the cluster of the URL's server from now on (once; calls in flight on the
        single-server connections may fail)."""
        with self._switch_lock:
            if self._cluster:
                return
            client = self._redis.cluster.RedisCluster.from_url(self._cfg.url, **self._common)
            old, pool = self._client, self._pool
            self._client, self._pool, self._direct = client, None, False
            self._cluster = True
        try:
            old.close()
            if pool is not None:
                pool.disconnect()
        except self._errors:
            pass

    def _error(self, e: BaseException) -> StorageError:
        """The StorageError for a failed call; a cluster reply to a single-server tier also
        switches the tier to cluster mode and says which flag would have avoided it."""
        what = f"{type(e).__name__}: {e}"
        cluster_reply = isinstance(e, self._cluster_errors) or (
            isinstance(e, self._reply_error) and str(e).startswith(_CLUSTER_REPLIES)
        )
        if self._cluster or not cluster_reply:
            return StorageError(f"{self._where}: {what}")
        try:
            self._to_cluster()
        except self._errors as switch:
            return StorageError(
                f"{self._where}: answered as a node of a Redis Cluster ({what}) and cluster mode "
                f"failed too ({type(switch).__name__}: {switch}); set redis.cluster=true"
            )
        log.warning(
            "%s is a node of a Redis Cluster: switched to cluster mode (set "
            "redis.cluster=true to start in it)",
            self._where,
        )
        return StorageError(
            f"{self._where}: answered as a node of a Redis Cluster ({what}); this call failed, "
            "the next ones use cluster mode; set redis.cluster=true to start in it"
        )

    # -- helpers -------------------------------------------------------------------------

    @contextmanager
    def _failures(self) -> Iterator[None]:
        """Turn any Redis failure into a StorageError naming this tier and its URL."""
        if self._closed:
            raise StorageError(f"{self._where}: the tier is closed")
        try:
            yield
        except self._errors as e:
            with self._lock:
                self._counters["errors"] += 1
            raise self._error(e) from e

    def _rkey(self, key: Key) -> bytes:
        return self._prefix + key

    def _check_result(self, result: object) -> None:
        if isinstance(result, BaseException):
            with self._lock:
                self._counters["errors"] += 1
            raise self._error(result) from result

    # -- capacity ------------------------------------------------------------------------

    @property
    def capacity_blocks(self) -> int | None:
        """None: Redis manages its own space (maxmemory)."""
        return None

    @property
    def used_blocks(self) -> int:
        """Approximate: blocks this client stored minus those it deleted (module docstring)."""
        return self._used

    # -- primitives ----------------------------------------------------------------------

    def contains(self, keys: Sequence[Key]) -> list[bool]:
        if not keys:
            return []
        with self._failures():
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._rkey(k))
            results = pipe.execute(raise_on_error=False)
        out = []
        for r in results:
            self._check_result(r)
            out.append(bool(r))
        return out

    def put(self, keys: Sequence[Key], values: Sequence[Buffer]) -> list[PutStatus]:
        """Store each block with ``SET NX`` (``PX ttl`` when a TTL is configured).

        Raises:
            ValueError: lengths differ, a key is not 16 bytes or a value exceeds
                ``context.slot_size`` (nothing is stored).
            StorageError: Redis failed or could not be reached.
        """
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        views = [_as_bytes_view(v) for v in values]
        for k, v in zip(keys, views):
            if len(k) != KEY_BYTES:
                raise ValueError(f"a key must be {KEY_BYTES} bytes, got {len(k)}")
            if v.nbytes > self.context.slot_size:
                raise ValueError(
                    f"a {v.nbytes}-byte value exceeds the slot size {self.context.slot_size}"
                )
        if not keys:
            return []
        with self._failures():
            pipe = self._client.pipeline(transaction=False)
            for k, v in zip(keys, views):
                pipe.set(self._rkey(k), v, nx=True, px=self._ttl_ms)
            results = pipe.execute(raise_on_error=False)
        status: list[PutStatus] = []
        for r in results:
            if isinstance(r, self._oom):
                status.append(PutStatus.NO_SPACE)
                continue
            self._check_result(r)
            status.append(PutStatus.STORED if r else PutStatus.EXISTS)
        stored = status.count(PutStatus.STORED)
        no_space = status.count(PutStatus.NO_SPACE)
        with self._lock:
            self._used += stored
            self._peak = max(self._peak, self._used)
            self._counters["no_space"] += no_space
        return status

    def _get_direct(
        self, rkeys: list[bytes], views: list[memoryview]
    ) -> tuple[list[int | None], list[int], int] | None:
        """MGET with the reply parsed off the socket into ``views``; None when this connection
        type offers no socket to read (then the caller goes through redis-py)."""
        pool = self._pool
        if pool is None:
            return None
        # typed loosely: redis-py leaves send_command and disconnect unannotated
        conn: Any = pool.get_connection()
        try:
            sock = getattr(conn, "_sock", None)
            if not isinstance(sock, socket.socket):
                return None
            scratch: bytearray | None = getattr(self._scratch, "buf", None)
            if scratch is None:  # one per thread: no 256 KiB allocation per call
                scratch = self._scratch.buf = bytearray(SCRATCH_BYTES)
            conn.send_command("MGET", *rkeys)
            return MgetReader(sock, scratch).read(views, self.context.slot_size)
        except ErrorReply as e:  # a whole reply was read: the connection is still in sync
            raise self._redis.exceptions.ResponseError(str(e)) from None
        except BaseException as e:
            # a reply read part way leaves the stream out of step: never reuse this socket
            conn.disconnect()
            if isinstance(e, OSError | ReplyFormatError):
                raise self._redis.exceptions.ConnectionError(f"reading the MGET reply: {e}") from e
            raise
        finally:
            pool.release(conn)

    def _get_copied(
        self, rkeys: list[bytes], views: list[memoryview]
    ) -> tuple[list[int | None], list[int], int]:
        """GETs through redis-py, then one copy per value from its ``bytes`` into ``views``."""
        if self._cluster:
            pipe = self._client.pipeline(transaction=False)
            for rk in rkeys:
                pipe.get(rk)
            results = list(pipe.execute(raise_on_error=False))
        else:
            results = list(self._client.mget(rkeys))
        foreign = 0
        limit = self.context.slot_size
        for i, r in enumerate(results):
            wrong_type = isinstance(r, self._reply_error) and str(r).startswith("WRONGTYPE")
            if wrong_type or (isinstance(r, bytes) and len(r) > limit):
                results[i] = None  # not a block: another client's key under our prefix
                foreign += 1
            else:
                self._check_result(r)
        too_small = [
            i for i, (r, v) in enumerate(zip(results, views)) if r is not None and len(r) > v.nbytes
        ]
        sizes: list[int | None] = []
        for view, r in zip(views, results):
            if isinstance(r, bytes):
                if not too_small:
                    view[: len(r)] = r  # the one copy: reply bytes -> caller's buffer
                sizes.append(len(r))
            else:
                sizes.append(None)
        return sizes, too_small, foreign

    def get(self, keys: Sequence[Key], outs: Sequence[memoryview]) -> list[int | None]:
        """Copy each present block into its buffer.

        Raises:
            ValueError: lengths differ, or a buffer is smaller than its block (the contents of
                every buffer are then unspecified).
            StorageError: Redis failed or could not be reached.
        """
        if len(keys) != len(outs):
            raise ValueError(f"{len(keys)} keys but {len(outs)} buffers")
        if not keys:
            return []
        views = [_as_bytes_view(o) for o in outs]
        rkeys = [self._rkey(k) for k in keys]
        with self._failures():
            got = self._get_direct(rkeys, views) if self._direct else None
            sizes, too_small, foreign = got if got is not None else self._get_copied(rkeys, views)
        if too_small:
            i = too_small[0]
            raise ValueError(
                f"block {i} is {sizes[i]} bytes but its buffer holds {views[i].nbytes}"
            )
        hits = len(sizes) - sizes.count(None)
        with self._lock:
            self._counters["hits"] += hits
            self._counters["misses"] += len(sizes) - hits
            self._counters["foreign"] += foreign
        return sizes

    def delete(self, keys: Sequence[Key]) -> int:
        if not keys:
            return 0
        with self._failures():
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.delete(self._rkey(k))
            results = pipe.execute(raise_on_error=False)
        removed = 0
        for r in results:
            self._check_result(r)
            removed += int(r)
        with self._lock:
            self._used = max(0, self._used - removed)
        return removed

    def keys(self) -> list[Key]:
        """Every block key under this tier's prefix (a full SCAN: for tools, not hot paths)."""
        match = glob_escape(self._prefix) + b"*"
        want = len(self._prefix) + KEY_BYTES
        found: set[bytes] = set()
        with self._failures():
            for rk in self._client.scan_iter(match=match, count=_SCAN_COUNT):
                if len(rk) == want and rk.startswith(self._prefix):
                    found.add(bytes(rk[len(self._prefix) :]))
        return list(found)

    def stats(self) -> TierStats:
        """Usage as this client saw it: no round trip (``used_blocks`` is approximate)."""
        with self._lock:
            extra = {name: float(n) for name, n in self._counters.items()}
            return TierStats(
                total_blocks=None,
                used_blocks=self._used,
                peak_blocks=self._peak,
                total_bytes=None,
                extra=extra,
            )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._client.close()
            if self._pool is not None:  # Redis.close leaves a pool it was handed open
                self._pool.disconnect()
        except self._errors:  # closing sockets to a dead server: nothing left to release
            pass
