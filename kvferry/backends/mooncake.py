"""Mooncake Store as a shared remote tier (optional: ``pip install 'kvferry[mooncake]'``).

Owns the mapping of the tier contract (``kvferry.backends.base``) onto Mooncake Store's Python
client, ``mooncake.store.MooncakeDistributedStore``: one client per tier, which contributes
``global_segment_size`` bytes of its own memory to the cluster's pool and talks to a
``mooncake_master`` (P2PHANDSHAKE metadata by default, so no etcd). It must not decide what to
keep: the store does, and Mooncake places each object in some client's segment.

Mapping (checked against mooncake-transfer-engine 0.3.13):

- Key: ``key_prefix + key.hex()`` (a 16-byte block hash becomes 32 hex digits).
- ``put``: ``batch_is_exist`` first (Mooncake answers 0 to a put of a present key and keeps the
  old bytes, so EXISTS can only be told by asking), then ``batch_put_from`` out of a registered
  staging buffer. Per key, ``NO_AVAILABLE_HANDLE`` (-200, no segment has room) is ``NO_SPACE``;
  any other negative code raises :class:`StorageError` naming the code. A key repeated in one
  batch is sent once (Mooncake would keep the *last* copy) and the repeats answer like the
  first. Empty values raise ``ValueError``: Mooncake refuses them (``INVALID_PARAMS``).
- ``get``: ``batch_get_into`` the staging buffer, then one copy into each caller buffer. The
  staging buffer is registered with Mooncake's transfer engine once, at start, because RDMA can
  only write into registered memory and caller buffers change per call. ``OBJECT_NOT_FOUND``,
  ``REPLICA_IS_NOT_READY`` (a put in progress), ``REPLICA_IS_GONE`` and ``LEASE_EXPIRED`` (the
  read outlived its lease, so the bytes may be torn) are misses.
- ``contains``: ``batch_is_exist``. ``delete``: ``batch_remove(force=True)``: every read and
  every ``is_exist`` grants the object a lease (``--default_kv_lease_ttl``, 10 s) during which a
  plain remove fails with ``OBJECT_HAS_LEASE``; since kvferry's own lookups grant such leases,
  an unforced delete would almost never succeed. The cost: a reader in *another* process whose
  transfer is in flight when the block is removed may read bytes of whatever is stored there
  next. Within one process, the store never deletes a block it has pinned for a load.
- ``keys()`` raises ``NotImplementedError``: Mooncake cannot list objects.
- ``capacity_blocks`` is None: Mooncake manages its own space and, unlike the other tiers,
  evicts on its own: in the background once the pool passes the master's
  ``--eviction_high_watermark_ratio`` (0.9), and right after a put that found no room
  (``--eviction_ratio``, 5% of the unleased objects). A master started with
  ``--eviction_high_watermark_ratio=1.0 --eviction_ratio=0.0`` never evicts and answers
  NO_SPACE instead. ``used_blocks`` counts this client's stores minus its removes; it cannot
  see other clients or Mooncake's evictions.

Facts about the client that shape the code: setup against an unreachable master retries for
~90 s (so the master's TCP port is probed first); every call against a hung master waits the
RPC timeout and answers ``-901 RPC_TIMEOUT``, 30 s unless ``MC_RPC_TIMEOUT_MS`` says otherwise
when the client is set up (so the tier sets it from ``mooncake.rpc_timeout`` around setup); any
call after ``close()`` segfaults (so every call is fenced by a closed flag, and ``close`` waits
for calls in flight); ``close`` takes 1 to 2 s; a non-zero ``global_segment_size`` below 16 MiB
fails setup. Mooncake binds its transfer
listener on 0.0.0.0 whatever ``local_hostname`` says and logs through glog on stderr.
"""

from __future__ import annotations

import ctypes
import importlib
import mmap
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from kvferry.backends.base import Buffer, Key, PutStatus, Tier, TierContext, TierStats
from kvferry.config.models import MooncakeTierConfig
from kvferry.errors import ConfigError, MissingDependency, StorageError

DEFAULT_KEY_PREFIX = "kvferry:"
"""Namespace of kvferry's objects in a Mooncake cluster shared with other users."""

MIN_SEGMENT_BYTES = 16 << 20
"""Mooncake refuses a non-zero global segment smaller than this (client_buffer_allocation.cpp)."""

MASTER_PROBE_SECONDS = 2.0

_ALIGN = 64

# Mooncake's ErrorCode (mooncake-store/include/types.h): code -> (name, meaning).
ERROR_CODES: dict[int, tuple[str, str]] = {
    -1: ("INTERNAL_ERROR", "internal error"),
    -10: ("BUFFER_OVERFLOW", "insufficient buffer space"),
    -100: ("SHARD_INDEX_OUT_OF_RANGE", "shard index out of range"),
    -101: ("SEGMENT_NOT_FOUND", "no available segment"),
    -102: ("SEGMENT_ALREADY_EXISTS", "segment already exists"),
    -103: ("CLIENT_NOT_FOUND", "client not found by the master"),
    -200: ("NO_AVAILABLE_HANDLE", "no segment has room for the object"),
    -300: ("INVALID_VERSION", "invalid version"),
    -400: ("INVALID_KEY", "invalid key"),
    -500: ("WRITE_FAIL", "write failed"),
    -600: ("INVALID_PARAMS", "invalid parameters (e.g. a buffer too small for the object)"),
    -601: ("ILLEGAL_CLIENT", "client not allowed to do this"),
    -700: ("INVALID_WRITE", "invalid write"),
    -701: ("INVALID_READ", "invalid read"),
    -702: ("INVALID_REPLICA", "invalid replica"),
    -703: ("REPLICA_IS_NOT_READY", "replica is not ready (a put in progress)"),
    -704: ("OBJECT_NOT_FOUND", "object not found"),
    -705: ("OBJECT_ALREADY_EXISTS", "object already exists"),
    -706: ("OBJECT_HAS_LEASE", "object is leased to a reader"),
    -707: ("LEASE_EXPIRED", "lease expired before the transfer completed"),
    -708: ("OBJECT_HAS_REPLICATION_TASK", "object has a replication task"),
    -710: ("REPLICA_NOT_FOUND", "replica not found"),
    -712: ("REPLICA_IS_GONE", "replica is gone"),
    -800: ("TRANSFER_FAIL", "transfer engine failed to move the bytes"),
    -900: ("RPC_FAIL", "RPC to the master failed (master down or unreachable)"),
    -901: ("RPC_TIMEOUT", "RPC to the master timed out (master hung; mooncake.rpc_timeout)"),
    -1010: ("UNAVAILABLE_IN_CURRENT_STATUS", "master cannot serve this now"),
}

NO_AVAILABLE_HANDLE = -200
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
LEASE_EXPIRED = -707
_MISS_CODES = frozenset({-703, OBJECT_NOT_FOUND, LEASE_EXPIRED, -712})


def describe_code(code: int) -> str:
    """``"-200 NO_AVAILABLE_HANDLE (no segment has room for the object)"``."""
    name, meaning = ERROR_CODES.get(code, ("UNKNOWN", "unknown Mooncake error code"))
    return f"{code} {name} ({meaning})"


def object_name(key: Key, prefix: str = DEFAULT_KEY_PREFIX) -> str:
    """The Mooncake object name of block ``key``."""
    return prefix + key.hex()


def import_mooncake(module: str, name: str, *, package: str = "mooncake") -> Any:
    """``from mooncake.<module> import <name>``, or a MissingDependency that says which extra
    to install (and, when the wheel is there but its shared library failed to load, which
    Debian packages it needs). Shared by the tier and the transfer bench's Mooncake backend."""
    try:
        return getattr(importlib.import_module(f"mooncake.{module}"), name)
    except ImportError as e:
        err = MissingDependency(package, "mooncake")
        if e.name not in ("mooncake", f"mooncake.{module}"):
            # The wheel is there but its shared library failed to load (typically libibverbs).
            err.add_note(
                f"mooncake is installed but failed to load ({e}); on Debian/Ubuntu: "
                "apt-get install libibverbs1 ibverbs-providers"
            )
        raise err from e


def _import_store_class() -> Any:
    return import_mooncake("store", "MooncakeDistributedStore")


def _byte_view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


_RPC_TIMEOUT_ENV = "MC_RPC_TIMEOUT_MS"
_env_lock = threading.Lock()


@contextmanager
def _rpc_timeout(seconds: float) -> Iterator[None]:
    """Mooncake's RPC timeout for the client set up in the ``with`` body.

    Mooncake takes it only from ``MC_RPC_TIMEOUT_MS``, read once when a client is set up (a
    change afterwards does not reach that client), so it is set for the setup alone, under a
    lock (two tiers set up at once each get their own), and the previous value put back.
    """
    with _env_lock:
        before = os.environ.get(_RPC_TIMEOUT_ENV)
        os.environ[_RPC_TIMEOUT_ENV] = str(max(1, round(seconds * 1000)))
        try:
            yield
        finally:
            if before is None:
                del os.environ[_RPC_TIMEOUT_ENV]
            else:
                os.environ[_RPC_TIMEOUT_ENV] = before


def _probe_master(address: str) -> None:
    """Fail fast when the master's RPC port is closed (Mooncake's setup would retry ~90 s)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address or ";" in address:
        return  # not a plain host:port (an HA connection string): let Mooncake resolve it
    try:
        with socket.create_connection((host.strip("[]"), int(port)), MASTER_PROBE_SECONDS):
            pass
    except OSError as e:
        raise StorageError(
            f"mooncake: master at {address} is not reachable ({e}); start mooncake_master "
            "or fix mooncake.master_address"
        ) from e


class _Staging:
    """A registered buffer cut into slots of ``stride`` bytes, lent to calls a batch at a time.

    A call takes all the slots of one chunk at once (``acquire``) and returns them before it
    takes more, so no call holds slots while it waits for others: no deadlock.
    """

    def __init__(self, slots: int, stride: int) -> None:
        self.slots = slots
        self.stride = stride
        self.size = slots * stride
        # mmap: page-aligned, and pages are only committed when a slot is first used.
        self._mem = mmap.mmap(-1, self.size)
        self._anchor: Any = ctypes.c_char.from_buffer(self._mem)
        self.address: int = ctypes.addressof(self._anchor)
        self.view = memoryview(self._mem)
        self._free = list(range(slots))
        self._cond = threading.Condition()

    def acquire(self, n: int) -> list[int]:
        with self._cond:
            while len(self._free) < n:
                self._cond.wait()
            taken = self._free[-n:]
            del self._free[-n:]
            return taken

    def release(self, taken: list[int]) -> None:
        with self._cond:
            self._free.extend(taken)
            self._cond.notify_all()

    def close(self) -> None:
        self.view.release()
        del self._anchor
        self._mem.close()


class MooncakeTier(Tier):
    """A Mooncake Store client as a kvferry tier. See the module docstring for the mapping."""

    name: ClassVar[str] = "mooncake"
    config_section: ClassVar[str] = "mooncake"
    shared: ClassVar[bool] = True

    config: MooncakeTierConfig

    def __init__(self, config: MooncakeTierConfig, context: TierContext) -> None:
        """Connect to the master, mount this client's segment, register the staging buffer.

        Raises:
            MissingDependency: the mooncake wheel is not installed.
            ConfigError: a size that Mooncake or the staging buffer cannot work with.
            StorageError: the master is unreachable, or Mooncake's setup failed.
        """
        super().__init__(config, context)
        # MooncakeTierConfig has no key_prefix field yet; read it when it grows one.
        self._prefix: str = config.key_prefix
        stride = -(-context.slot_size // _ALIGN) * _ALIGN
        slots = config.local_buffer_size // stride
        if slots < 1:
            raise ConfigError(
                f"mooncake.local_buffer_size={config.local_buffer_size} cannot hold one block of "
                f"store.slot_size={context.slot_size} bytes; valid: at least {stride}"
            )
        if 0 < config.global_segment_size < MIN_SEGMENT_BYTES:
            raise ConfigError(
                f"mooncake.global_segment_size={config.global_segment_size} is refused by "
                f"Mooncake; valid: 0 (contribute no memory) or at least {MIN_SEGMENT_BYTES}"
            )
        store_class = _import_store_class()
        _probe_master(config.master_address)

        self._cond = threading.Condition()
        self._closed = False
        self._inflight = 0
        self._stored = 0
        self._removed = 0
        self._peak = 0
        self._no_space = 0
        self._dropped_reads = 0

        self._store: Any = store_class()
        # Mooncake's own local buffer only serves get_batch/put_batch, which this tier does not
        # use: the registered staging buffer below is this client's local transfer buffer.
        with _rpc_timeout(config.rpc_timeout):
            rc = self._store.setup(
                config.local_hostname,
                config.metadata_server,
                config.global_segment_size,
                0,
                config.protocol,
                config.device_name,
                config.master_address,
            )
        if rc != 0:
            self._store.close()
            raise StorageError(
                f"mooncake tier {self.label!r}: setup against master {config.master_address} "
                f"(metadata {config.metadata_server}, protocol {config.protocol}) failed: "
                f"{describe_code(rc)}"
            )
        try:
            self._staging = _Staging(slots, stride)
        except BaseException:
            self._store.close()
            raise
        rc = self._store.register_buffer(self._staging.address, self._staging.size)
        if rc != 0:
            self._store.close()
            self._staging.close()
            raise StorageError(
                f"mooncake tier {self.label!r}: register_buffer of {self._staging.size} "
                f"staging bytes failed: {describe_code(rc)}"
            )

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _active(self) -> Iterator[Any]:
        """The client, fenced against ``close`` (a call on a closed client segfaults)."""
        with self._cond:
            if self._closed:
                raise StorageError(f"mooncake tier {self.label!r} is closed")
            self._inflight += 1
        try:
            yield self._store
        finally:
            with self._cond:
                self._inflight -= 1
                if self._inflight == 0:
                    self._cond.notify_all()

    def _names(self, keys: Sequence[Key]) -> list[str]:
        prefix = self._prefix  # inlined object_name: this runs once per key on every call
        return [prefix + k.hex() for k in keys]

    def _chunks(self, indexes: list[int]) -> Iterator[list[int]]:
        step = self._staging.slots
        for start in range(0, len(indexes), step):
            yield indexes[start : start + step]

    def _fail(self, op: str, failures: list[tuple[Key, int]], total: int) -> StorageError:
        key, code = failures[0]
        return StorageError(
            f"mooncake tier {self.label!r}: {op} failed for {len(failures)} of {total} blocks; "
            f"first: key {key.hex()}: {describe_code(code)}"
        )

    def _exist(self, store: Any, keys: Sequence[Key]) -> list[bool]:
        codes = store.batch_is_exist(self._names(keys))
        present: list[bool] = []
        failures: list[tuple[Key, int]] = []
        for key, code in zip(keys, codes):
            if code not in (0, 1):
                failures.append((key, code))
            present.append(code == 1)
        if failures or len(codes) != len(keys):
            raise self._fail("is_exist", failures or [(b"", -1)], len(keys))
        return present

    # -- the tier contract ------------------------------------------------------------------

    @property
    def capacity_blocks(self) -> int | None:
        return None

    @property
    def used_blocks(self) -> int:
        with self._cond:
            return max(0, self._stored - self._removed)

    def contains(self, keys: Sequence[Key]) -> list[bool]:
        if not keys:
            return []
        with self._active() as store:
            return self._exist(store, keys)

    def put(self, keys: Sequence[Key], values: Sequence[Buffer]) -> list[PutStatus]:
        if len(keys) != len(values):
            raise ValueError(f"put got {len(keys)} keys and {len(values)} values")
        views = [_byte_view(v) for v in values]
        for i, view in enumerate(views):
            if not 0 < view.nbytes <= self.context.slot_size:
                raise ValueError(
                    f"value {i} has {view.nbytes} bytes; mooncake tier {self.label!r} stores "
                    f"1 to store.slot_size={self.context.slot_size} bytes"
                )
        status: list[PutStatus | None] = [None] * len(keys)
        first: dict[Key, int] = {}
        repeats: list[tuple[int, int]] = []
        for i, key in enumerate(keys):
            if key in first:
                repeats.append((i, first[key]))
            else:
                first[key] = i
        unique = list(first.values())
        failures: list[tuple[Key, int]] = []
        stored = no_space = 0
        if unique:
            with self._active() as store:
                present = self._exist(store, [keys[i] for i in unique])
                pending: list[int] = []
                for i, here in zip(unique, present):
                    if here:
                        status[i] = PutStatus.EXISTS
                    else:
                        pending.append(i)
                stride, base, staging = self._staging.stride, self._staging.address, self._staging
                for chunk in self._chunks(pending):
                    slots = staging.acquire(len(chunk))
                    try:
                        sizes = []
                        for i, slot in zip(chunk, slots):
                            n = views[i].nbytes
                            staging.view[slot * stride : slot * stride + n] = views[i]
                            sizes.append(n)
                        codes = store.batch_put_from(
                            self._names([keys[i] for i in chunk]),
                            [base + slot * stride for slot in slots],
                            sizes,
                        )
                    finally:
                        staging.release(slots)
                    if len(codes) != len(chunk):
                        failures.append((keys[chunk[0]], -1))
                        continue
                    for i, code in zip(chunk, codes):
                        if code == 0:
                            status[i] = PutStatus.STORED
                            stored += 1
                        elif code == NO_AVAILABLE_HANDLE:
                            status[i] = PutStatus.NO_SPACE
                            no_space += 1
                        elif code == OBJECT_ALREADY_EXISTS:
                            status[i] = PutStatus.EXISTS
                        else:
                            failures.append((keys[i], code))
        with self._cond:
            self._stored += stored
            self._no_space += no_space
            self._peak = max(self._peak, self._stored - self._removed)
        if failures:
            raise self._fail("put", failures, len(unique))
        for i, j in repeats:
            # "Same key, same bytes": a repeat is EXISTS once its first copy is in.
            head = status[j]
            status[i] = PutStatus.NO_SPACE if head is PutStatus.NO_SPACE else PutStatus.EXISTS
        return [s if s is not None else PutStatus.NO_SPACE for s in status]

    def get(self, keys: Sequence[Key], outs: Sequence[memoryview]) -> list[int | None]:
        if len(keys) != len(outs):
            raise ValueError(f"get got {len(keys)} keys and {len(outs)} buffers")
        result: list[int | None] = [None] * len(keys)
        if not keys:
            return result
        failures: list[tuple[Key, int]] = []
        dropped = 0
        size = self.context.slot_size
        stride, base, staging = self._staging.stride, self._staging.address, self._staging
        with self._active() as store:
            for chunk in self._chunks(list(range(len(keys)))):
                slots = staging.acquire(len(chunk))
                try:
                    codes = store.batch_get_into(
                        self._names([keys[i] for i in chunk]),
                        [base + slot * stride for slot in slots],
                        [size] * len(chunk),
                    )
                    if len(codes) != len(chunk):
                        failures.append((keys[chunk[0]], -1))
                        continue
                    for i, slot, code in zip(chunk, slots, codes):
                        if code >= 0:
                            out = outs[i]
                            if out.format != "B" or out.ndim != 1:
                                out = out.cast("B")
                            if code > out.nbytes:
                                raise ValueError(
                                    f"buffer {i} has {out.nbytes} bytes; block "
                                    f"{keys[i].hex()} has {code}"
                                )
                            out[:code] = staging.view[slot * stride : slot * stride + code]
                            result[i] = code
                        elif code in _MISS_CODES:
                            if code == LEASE_EXPIRED:
                                dropped += 1
                        else:
                            failures.append((keys[i], code))
                finally:
                    staging.release(slots)
        if dropped:
            with self._cond:
                self._dropped_reads += dropped
        if failures:
            raise self._fail("get", failures, len(keys))
        return result

    def delete(self, keys: Sequence[Key]) -> int:
        unique = list(dict.fromkeys(keys))
        if not unique:
            return 0
        with self._active() as store:
            codes = store.batch_remove(self._names(unique), True)
        removed = 0
        failures: list[tuple[Key, int]] = []
        for key, code in zip(unique, codes):
            if code == 0:
                removed += 1
            elif code != OBJECT_NOT_FOUND:
                failures.append((key, code))
        with self._cond:
            self._removed += removed
        if failures or len(codes) != len(unique):
            raise self._fail("delete", failures or [(unique[0], -1)], len(unique))
        return removed

    def keys(self) -> list[Key]:
        raise NotImplementedError("Mooncake Store cannot list its objects")

    def stats(self) -> TierStats:
        with self._cond:
            used = max(0, self._stored - self._removed)
            return TierStats(
                total_blocks=None,
                used_blocks=used,
                peak_blocks=self._peak,
                extra={
                    "segment_bytes": float(self.config.global_segment_size),
                    "staging_slots": float(self._staging.slots),
                    "no_space_blocks": float(self._no_space),
                    "dropped_reads": float(self._dropped_reads),
                },
            )

    def close(self) -> None:
        """Wait for calls in flight, unmount this client's segment (its objects go with it) and
        free the staging buffer; idempotent. Takes 1 to 2 s (Mooncake's client shutdown)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._inflight:
                self._cond.wait()
        try:
            self._store.unregister_buffer(self._staging.address)
            self._store.close()
        finally:
            self._staging.close()
