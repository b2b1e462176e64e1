"""The SSD tier: preallocated files of fixed-size slots, one block per slot, each with a header.

This module owns the on-disk format of the disk tier, the key -> slot index rebuilt from it at
open, and the I/O that moves block bytes between caller buffers and the slot files. It decides
nothing about placement or eviction (the store does) and never evicts on its own.

Where: ``DiskTierConfig.path``, a directory the user names (a store server on a fixed port
names ``~/.cache/kvferry/disk/store-<port>`` itself, :func:`instance_directory`). With no path the
tier is *private*: its files are made in a fresh directory under ``~/.cache/kvferry/disk`` and
unlinked, directory and all, as soon as they are open, so no other process can find them and
their space goes back to the filesystem when the tier closes or the process dies, however it
dies (nothing to sweep up later). A private tier has no lock and no ``layout.json``; its blocks
do not outlive it (``persistent`` is False, so a graceful shutdown writes nothing into it).

The on-disk format (slot files, headers, ``layout.json``) and the directory a tier uses are
:mod:`kvferry.backends.disk_format`'s; this module reads and writes them.

Crash safety: a put writes header and payload in one ``pwrite``/``pwritev`` and publishes the key
only after that write returned, so a block is invisible until complete. A write torn by a crash
leaves a header or payload whose checksum does not match: the header scan at open treats a bad
header as a free slot, and every ``get`` checks the payload checksum, dropping a corrupt block
(counted in ``stats().extra["corrupt_dropped"]``) instead of serving it. A delete overwrites the
header block with zeros before returning, so a restart does not resurrect the block. If two valid
slots claim one key (a crash mid-overwrite), the higher generation wins and the other is wiped.
Blocks survive the death of the process (the page cache or the device has them once a put
returns); surviving a power loss needs the ``fdatasync`` that ``close`` does.

Concurrency: one lock guards the index, free list and counters; no I/O happens under it. A get
or put of several blocks is a two-stage pipeline: a pool of ``io_threads`` threads does the I/O,
each one block after another (at most ``io_threads`` I/Os in flight, like fio's ``iodepth``),
while the calling thread does the checksums: a put's before each block's write is queued, a get's
as each read completes, the readers going on to the next blocks meanwhile (a get returns only
once every block it reports is verified). Checksumming in the I/O thread kept the disk idle for
one pass over the payload per block (55-65 us per MiB just read, 10-15% of a 1 MiB read on the
VMs measured; ``pread``/``pwrite`` and xxh3 of more than 64 KiB release the GIL). The header scan
at open and wipes cut their jobs into up to ``io_threads`` contiguous chunks, one done in the
calling thread. A slot being read keeps a reader count; a deleted slot goes back to the free list
only once its readers are gone, so a read never sees its slot reused.

``O_DIRECT``: used when ``direct_io`` is set and a probe (open with ``O_DIRECT``, one aligned
write and read in the directory) succeeds; otherwise buffered I/O, with one warning and
``stats().extra["direct_io"] == 0``. Under ``O_DIRECT`` a page-aligned caller buffer whose length
is a multiple of 4 KiB is read into or written from directly; other buffers go through a
page-aligned bounce buffer (anonymous mmap) with one copy.

Why one class of this length (past ~600 lines): opening a directory (lock, layout check,
preallocation, the header scan that rebuilds the index) and every I/O path (put, get, delete,
the reader counts that keep a slot from reuse) share one index, one free list and one lock, and
the crash-safety rules above hold only if they change together. The format itself, which does
not need them, lives in :mod:`kvferry.backends.disk_format`.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import mmap
import os
import queue
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np
from pydantic import BaseModel

from kvferry.backends.base import Buffer, Key, PutStatus, Tier, TierContext, TierStats
from kvferry.backends.disk_format import (
    ALIGN,
    DEFAULT_ROOT,
    FORMAT_VERSION,
    HEADER_BLOCK,
    HEADER_BYTES,
    LAYOUT_FILE,
    LOCK_FILE,
    O_DIRECT,
    SLOT_FILE_PATTERN,
    SlotHeader,
    align_up,
    bytes_to_preallocate,
    checksum,
    configured_directory,
    decode_header,
    default_root,
    encode_header,
    file_slots,
    instance_directory,
    probe_direct_io,
    slot_file,
)
from kvferry.config.models import DiskTierConfig
from kvferry.config.units import format_size_approx
from kvferry.errors import ConfigError, StorageError
from kvferry.index.keys import KEY_BYTES

# The format's names are importable from here too (``kvferry.backends.disk`` is where users and
# the benches have always found them).
__all__ = [
    "ALIGN",
    "DEFAULT_ROOT",
    "HEADER_BLOCK",
    "DiskTier",
    "SlotHeader",
    "align_up",
    "bytes_to_preallocate",
    "checksum",
    "decode_header",
    "default_root",
    "encode_header",
    "instance_directory",
    "probe_direct_io",
]

log = logging.getLogger(__name__)

_ZEROS = memoryview(bytes(HEADER_BLOCK))

J = TypeVar("J")
R = TypeVar("R")


def _is_aligned(view: memoryview) -> bool:
    return len(view) > 0 and int(np.frombuffer(view, dtype=np.uint8).ctypes.data) % ALIGN == 0


def _byte_view(buf: Buffer, what: str) -> memoryview:
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        try:
            view = view.cast("B")
        except TypeError as e:
            raise ValueError(f"{what} must be a C-contiguous buffer: {e}") from e
    return view


class _Bounce:
    """Page-aligned scratch buffers of one slot each, reused across I/Os (anonymous mmaps).

    Private mappings: ``mmap.mmap(-1, n)`` alone is MAP_SHARED (shmem), whose pages come out
    scattered, and an O_DIRECT I/O over more scattered pages than the device takes segments
    (virtio-blk: 254) is split into two device requests (~150 us more per 1 MiB read measured).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: deque[mmap.mmap] = deque()

    def take(self) -> mmap.mmap:
        try:
            return self._free.pop()  # deque.pop/append are atomic: no lock needed
        except IndexError:
            return mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def give(self, buf: mmap.mmap) -> None:
        self._free.append(buf)


@dataclass(frozen=True)
class _Write:
    index: int
    slot: int
    key: Key
    value: memoryview
    generation: int


@dataclass(frozen=True)
class _Read:
    index: int
    slot: int
    key: Key
    length: int
    generation: int
    out: memoryview


@dataclass
class _Fetched:
    """A block read from its slot but not yet verified: the slot's header block is at the start
    of ``view`` (a bounce buffer, ``buf``); ``payload`` is the out buffer, or for a bounced read
    a part of ``view``."""

    buf: mmap.mmap
    view: memoryview
    payload: memoryview
    bounced: bool
    complete: bool
    """The read returned every byte asked for."""

    def release(self, bounce: _Bounce) -> None:
        self.payload.release()
        self.view.release()
        bounce.give(self.buf)


_READ_AHEAD = 2
"""Blocks a read pipeline may hold read but unverified, per I/O thread: enough for every thread
to start its next read while the verifier checks one, few enough to bound the bounce buffers."""


class DiskTier(Tier):
    """Blocks in preallocated slot files on a local disk (see the module docstring).

    Args:
        config: the ``disk`` section.
        context: ``slot_size`` sizes the slots.

    Raises:
        ConfigError: the directory holds slot files of another layout.
        StorageError: the directory or files cannot be created, opened or read, or another
            process has the directory open.
    """

    name: ClassVar[str] = "disk"
    config_section: ClassVar[str] = "disk"
    persistent = True  # False for a private tier: its files go with the process

    def __init__(self, config: DiskTierConfig, context: TierContext) -> None:
        super().__init__(config, context)
        self.check(config, context)  # before the index lists or any file: they scale with it
        self.disk_config = config
        self.slot_size = context.slot_size
        self.slot_bytes = HEADER_BLOCK + align_up(context.slot_size)
        self.private = not config.path
        """No disk.path: unnamed files of this tier alone (module docstring)."""
        self.persistent = not self.private
        self.directory = configured_directory(config)
        self.num_files = config.files
        self.num_slots = config.capacity // self.slot_bytes
        self.io_threads = config.io_threads

        self._lock = threading.Lock()
        self._closed = True  # until every file is open
        self._fds: list[int] = []
        self._index: dict[Key, int] = {}
        self._pending: set[Key] = set()
        self._slot_key: list[Key | None] = [None] * self.num_slots
        self._slot_len = [0] * self.num_slots
        self._slot_gen = [0] * self.num_slots
        self._readers = [0] * self.num_slots
        self._awaiting_readers: set[int] = set()
        self._free: list[int] = []
        self._next_gen = 1
        self._used_bytes = 0
        self._peak = 0
        self._corrupt_dropped = 0
        self._recovered = 0
        self._bounce = _Bounce(self.slot_bytes)
        self._pool: ThreadPoolExecutor | None = None
        self._lock_fd = -1

        try:
            os.makedirs(self.directory, exist_ok=True)
            if self.private:
                self.directory = tempfile.mkdtemp(
                    prefix=f"process-{os.getpid()}-", dir=self.directory
                )
        except OSError as e:
            raise StorageError(
                f"disk tier {self.label!r}: cannot create directory {self.directory}: {e}"
            ) from e
        self._paths = [os.path.join(self.directory, slot_file(i)) for i in range(self.num_files)]
        if not self.private:
            self._take_directory_lock()
        try:
            if not self.private:
                self._check_layout()
            reason = probe_direct_io(self.directory) if config.direct_io else "disabled"
            self.direct_io = reason is None
            if config.direct_io and reason is not None:
                log.warning(
                    "disk tier %r: O_DIRECT is not supported in %s (%s); using buffered I/O",
                    self.label,
                    self.directory,
                    reason,
                )
            # io_threads threads: a get or put of several blocks does all its I/O on them while
            # the calling thread checksums (module docstring, Concurrency)
            self._pool = ThreadPoolExecutor(
                self.io_threads, thread_name_prefix=f"kvferry-disk-{self.label}"
            )
            existing = self._open_files()
            if self.private:
                self._unname()
            self._closed = False
            self._rebuild_index(existing)
        except BaseException:
            self._release()
            if self.private:
                shutil.rmtree(self.directory, ignore_errors=True)
            raise
        log.info(
            "disk tier %r: %s of slot files in %s",
            self.label,
            format_size_approx(self.num_slots * self.slot_bytes),
            self.where(),
        )

    @classmethod
    def check(cls, config: BaseModel, context: TierContext) -> None:
        """Refuse a ``disk.path`` that cannot be a directory here, and (unless
        ``force_capacity``) a capacity whose slot files need more bytes than the filesystem has
        free; files already there count as held."""
        if not isinstance(config, DiskTierConfig):
            raise TypeError(f"disk tier: expected a DiskTierConfig, got {type(config).__name__}")
        directory = configured_directory(config)
        existing = directory
        while not os.path.exists(existing):  # the directory is made at open; check its parent
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ConfigError(
                f"disk.path {directory}: {existing} is not a directory; point disk.path "
                "(--disk-path) at a directory or where one can be made"
            )
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(
                f"disk.path {directory}: {existing} is not writable by this user; point "
                "disk.path (--disk-path) elsewhere"
            )
        if config.force_capacity:
            return
        need = bytes_to_preallocate(config, context)
        st = os.statvfs(existing)
        free = st.f_bavail * st.f_frsize
        if need > free:
            raise ConfigError(
                f"disk tier: disk.capacity {format_size_approx(config.capacity)} needs "
                f"{format_size_approx(need)} more in {directory}, but its filesystem has "
                f"{format_size_approx(free)} free; "
                "lower disk.capacity, point disk.path (--disk-path) at a larger filesystem, or "
                "set disk.force_capacity (--force-capacity) to preallocate anyway"
            )

    # ---- open ---------------------------------------------------------------------------------

    def _take_directory_lock(self) -> None:
        path = os.path.join(self.directory, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StorageError(f"disk tier {self.label!r}: cannot open {path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise StorageError(
                f"disk tier {self.label!r}: {self.directory} is in use by another process "
                f"(lock {path}: {e}); give each store its own directory (disk.path, --disk-path)"
            ) from e
        self._lock_fd = fd

    def _layout(self) -> dict[str, int]:
        return {
            "format": FORMAT_VERSION,
            "slot_size": self.slot_size,
            "slot_bytes": self.slot_bytes,
            "header_block": HEADER_BLOCK,
            "files": self.num_files,
            "slots": self.num_slots,
        }

    def where(self) -> str:
        """Where the slot files are, for people: the directory, or for a private tier the
        root its unnamed files are under."""
        if self.private:
            return f"unnamed files of this process under {os.path.dirname(self.directory)}"
        return self.directory

    def _check_layout(self) -> None:
        """Write ``layout.json`` in a new directory; in one written before, refuse another
        layout (nothing in the directory is changed) or, with ``wipe_other_layout``, delete its
        slot files and take the directory over."""
        path = os.path.join(self.directory, LAYOUT_FILE)
        want = self._layout()
        try:
            with open(path, encoding="utf-8") as f:
                have = json.load(f)
        except FileNotFoundError:
            self._write_layout(path, want)
            return
        except ValueError as e:
            have = f"unreadable {LAYOUT_FILE} ({e})"
        except OSError as e:
            raise StorageError(f"disk tier {self.label!r}: cannot read {path}: {e}") from e
        if have == want:
            return
        if self.disk_config.wipe_other_layout:
            self._wipe_slot_files()
            self._write_layout(path, want)
            log.warning(
                "disk tier %r: %s held slot files of another layout; wiped them "
                "(disk.wipe_other_layout) and started empty",
                self.label,
                self.directory,
            )
            return
        if isinstance(have, dict):
            diff = ", ".join(
                f"{k}: on disk {have.get(k)!r}, configured {v!r}"
                for k, v in want.items()
                if have.get(k) != v
            )
            what = f"slot files of another layout ({diff})"
            restore = "restore disk.capacity/disk.files/store.slot_size, "
        else:
            what = f"slot files with an {have}" if isinstance(have, str) else "another layout"
            restore = ""
        raise ConfigError(
            f"disk tier {self.label!r}: {self.directory} holds {what}; give this store another "
            f"directory (disk.path, --disk-path), {restore}or empty this one and start afresh "
            "(disk.wipe_other_layout, --wipe-disk: its blocks are lost)"
        )

    def _wipe_slot_files(self) -> None:
        """Delete the slot files, and the layout file last: a wipe cut short by a crash
        still finds the old layout next time and wipes again. Other files are left alone."""
        try:
            names = [
                n for n in sorted(os.listdir(self.directory)) if SLOT_FILE_PATTERN.fullmatch(n)
            ]
            for name in [*names, LAYOUT_FILE]:
                os.unlink(os.path.join(self.directory, name))
        except OSError as e:
            raise StorageError(
                f"disk tier {self.label!r}: cannot wipe the slot files in {self.directory}: {e}"
            ) from e

    def _unname(self) -> None:
        """Unlink a private tier's slot files and directory: the open descriptors hold the
        space until they close, so nothing is left however the process ends."""
        try:
            for path in self._paths:
                os.unlink(path)
            os.rmdir(self.directory)
        except OSError as e:
            raise StorageError(
                f"disk tier {self.label!r}: cannot unlink its private files in "
                f"{self.directory}: {e}"
            ) from e

    def _write_layout(self, path: str, layout: dict[str, int]) -> None:
        tmp = path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(layout, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise StorageError(f"disk tier {self.label!r}: cannot write {path}: {e}") from e

    def _file_slots(self, i: int) -> int:
        """Slots in file ``i`` (slot s lives in file s % files)."""
        return file_slots(self.num_slots, self.num_files, i)

    def _open_files(self) -> list[bool]:
        """Open (create, preallocate) every slot file; per file, whether it existed before."""
        flags = os.O_RDWR | os.O_CREAT | (O_DIRECT if self.direct_io else 0)
        existed = []
        for i, path in enumerate(self._paths):
            size = self._file_slots(i) * self.slot_bytes
            try:
                existed.append(os.path.exists(path))
                fd = os.open(path, flags, 0o600)
                self._fds.append(fd)
                if os.fstat(fd).st_size < size:
                    self._preallocate(fd, size)
            except OSError as e:
                raise StorageError(f"disk tier {self.label!r}: cannot open {path}: {e}") from e
        return existed

    @staticmethod
    def _preallocate(fd: int, size: int) -> None:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            # Filesystems without fallocate: a sparse file still works, only less contiguous.
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            os.ftruncate(fd, size)

    def _rebuild_index(self, existed: list[bool]) -> None:
        """Scan the headers of every slot in files that existed, rebuild index and free list."""
        scan = [s for s in range(self.num_slots) if existed[s % self.num_files]]
        headers = self._run(self._read_header, scan)
        failures = [(s, h) for s, h in zip(scan, headers) if isinstance(h, Exception)]
        if failures:
            self._raise_io("header scan", failures)
        losers: list[int] = []
        for slot, header in zip(scan, headers):
            if not isinstance(header, SlotHeader):
                continue
            other = self._index.get(header.key)
            if other is not None:
                # Two slots claim one key (crash mid-overwrite): keep the newer copy.
                if self._slot_gen[other] >= header.generation:
                    losers.append(slot)
                    continue
                losers.append(other)
                self._forget(other)
            self._publish(slot, header.key, header.length, header.generation)
            self._next_gen = max(self._next_gen, header.generation + 1)
        if losers:
            wiped = self._run(self._invalidate, losers)
            failed = [(s, r) for s, r in zip(losers, wiped) if isinstance(r, Exception)]
            if failed:
                self._raise_io("wipe of a stale duplicate", failed)
        self._recovered = len(self._index)
        self._peak = self._recovered
        # Pop from the end: low slot numbers first, so a fresh tier fills its files in order.
        self._free = [s for s in range(self.num_slots - 1, -1, -1) if self._slot_key[s] is None]

    # ---- bookkeeping (under self._lock, or in __init__) ---------------------------------------

    def _publish(self, slot: int, key: Key, length: int, gen: int) -> None:
        self._index[key] = slot
        self._slot_key[slot] = key
        self._slot_len[slot] = length
        self._slot_gen[slot] = gen
        self._used_bytes += length
        self._peak = max(self._peak, len(self._index))

    def _forget(self, slot: int) -> None:
        """Unpublish ``slot``; it is free on neither list until its header is wiped."""
        key = self._slot_key[slot]
        if key is not None and self._index.get(key) == slot:
            del self._index[key]
        self._slot_key[slot] = None
        self._used_bytes -= self._slot_len[slot]

    def _recycle(self, slot: int) -> None:
        """``slot``'s header is wiped: free it now, or when its last reader leaves."""
        if self._readers[slot]:
            self._awaiting_readers.add(slot)
        else:
            self._free.append(slot)

    # ---- I/O ----------------------------------------------------------------------------------

    def _where(self, slot: int) -> tuple[int, int]:
        return self._fds[slot % self.num_files], (slot // self.num_files) * self.slot_bytes

    def _run(self, fn: Callable[[J], R], jobs: Sequence[J]) -> list[R | Exception]:
        """``fn`` over ``jobs`` in up to ``io_threads`` contiguous chunks; the calling thread does
        the first. Every job runs; a job's exception is its result."""
        results: list[R | Exception] = [OSError("not run")] * len(jobs)

        def chunk(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                try:
                    results[i] = fn(jobs[i])
                except Exception as e:  # handed to the caller, which raises or cleans up
                    results[i] = e

        n = len(jobs)
        parts = min(self.io_threads, n)
        if parts <= 1 or self._pool is None:
            chunk(0, n)
            return results
        bounds = [n * p // parts for p in range(parts + 1)]
        futures: list[Future[None]] = [
            self._pool.submit(chunk, bounds[p], bounds[p + 1]) for p in range(1, parts)
        ]
        try:
            chunk(bounds[0], bounds[1])
        finally:
            for f in futures:
                f.result()
        return results

    def _raise_io(self, op: str, failures: Sequence[tuple[int, object]]) -> None:
        """Raise StorageError for failed jobs ``(slot, exception)``; a non-I/O exception (a bug)
        is re-raised as itself."""
        for _, err in failures:
            if isinstance(err, Exception) and not isinstance(err, OSError):
                raise err
        slot, err = failures[0]
        path = self._paths[slot % self.num_files]
        raise StorageError(
            f"disk tier {self.label!r}: {op} failed for {len(failures)} block(s); "
            f"first: slot {slot} in {path}: {err}"
        ) from (err if isinstance(err, BaseException) else None)

    def _read_header(self, slot: int) -> SlotHeader | None:
        fd, offset = self._where(slot)
        buf = self._bounce.take()
        try:
            view = memoryview(buf)[:HEADER_BLOCK]
            try:
                n = os.preadv(fd, [view], offset)
                return decode_header(view, self.slot_size) if n == HEADER_BLOCK else None
            finally:
                view.release()
        finally:
            self._bounce.give(buf)

    def _invalidate(self, slot: int) -> None:
        """Overwrite ``slot``'s header block with zeros (an invalid header)."""
        fd, offset = self._where(slot)
        if self.direct_io:
            buf = self._bounce.take()
            try:
                view = memoryview(buf)[:HEADER_BLOCK]
                try:
                    view[:] = _ZEROS
                    n = os.pwrite(fd, view, offset)
                finally:
                    view.release()
            finally:
                self._bounce.give(buf)
        else:
            n = os.pwrite(fd, _ZEROS, offset)
        if n != HEADER_BLOCK:
            raise OSError(errno.EIO, f"short write of a header ({n} of {HEADER_BLOCK} bytes)")

    def _direct_ok(self, view: memoryview) -> bool:
        """Can ``view`` go to/from the file without a bounce buffer?"""
        return not self.direct_io or (len(view) % ALIGN == 0 and _is_aligned(view))

    def _seal(self, job: _Write) -> bytes:
        """The CPU half of a write: the header, which holds the payload's checksum."""
        value = job.value
        return encode_header(SlotHeader(job.key, len(value), checksum(value), job.generation))

    def _store(self, job: _Write, header: bytes) -> None:
        """The I/O half of a write: header block and payload in one syscall."""
        fd, offset = self._where(job.slot)
        value = job.value
        length = len(value)
        buf = self._bounce.take()
        view = memoryview(buf)
        try:
            view[:HEADER_BYTES] = header
            view[HEADER_BYTES:HEADER_BLOCK] = _ZEROS[HEADER_BYTES:]  # a read may have left bytes
            if self._direct_ok(value):
                # header and payload in one syscall, payload straight from the caller's buffer
                expected = HEADER_BLOCK + length
                n = os.pwritev(fd, [view[:HEADER_BLOCK], value], offset)
            else:
                padded = align_up(length)
                end = HEADER_BLOCK + length
                view[HEADER_BLOCK:end] = value
                view[end : HEADER_BLOCK + padded] = _ZEROS[: padded - length]
                expected = HEADER_BLOCK + padded
                n = os.pwrite(fd, view[:expected], offset)
        finally:
            view.release()
            self._bounce.give(buf)
        if n != expected:
            raise OSError(errno.EIO, f"short write ({n} of {expected} bytes)")

    def _write(self, job: _Write) -> None:
        self._store(job, self._seal(job))

    def _write_blocks(self, jobs: Sequence[_Write]) -> list[Exception | None]:
        """Write ``jobs``: the calling thread checksums each block while up to ``io_threads``
        pool threads write the ones already checksummed. A job's exception is its result.

        Why a pipeline: the checksum reads the whole payload from memory (~50-100 us per MiB
        the CPU has not touched), which a thread that also wrote added to every block's
        syscall; here it overlaps with the writes, at most ``io_threads`` of them in flight.
        """
        n = len(jobs)
        if n < 2 or self._pool is None:
            return self._run(self._write, jobs)
        workers = min(self.io_threads, n)
        results: list[Exception | None] = [OSError("not run")] * n
        headers: list[bytes] = [b""] * n
        ready: queue.SimpleQueue[int] = queue.SimpleQueue()  # sealed job indexes; -1: stop

        def writer() -> None:
            while (i := ready.get()) >= 0:
                try:
                    self._store(jobs[i], headers[i])
                    results[i] = None
                except Exception as e:  # handed to the caller, which raises or cleans up
                    results[i] = e

        pool = self._pool
        futures = [pool.submit(writer) for _ in range(workers)]
        try:
            for i, job in enumerate(jobs):
                try:
                    headers[i] = self._seal(job)
                except Exception as e:
                    results[i] = e
                    continue
                ready.put(i)
        finally:
            for _ in range(workers):
                ready.put(-1)  # after every job: a writer stops only once the queue is drained
            for f in futures:
                f.result()
        return results

    def _fetch(self, job: _Read) -> _Fetched:
        """The I/O half of a read: header block and payload in one ``preadv``, the payload
        straight into the out buffer where ``O_DIRECT`` allows, else into a bounce buffer."""
        fd, offset = self._where(job.slot)
        length = job.length
        target = job.out[:length]
        buf = self._bounce.take()
        view = memoryview(buf)
        try:
            if self._direct_ok(target):
                expected = HEADER_BLOCK + length
                n = os.preadv(fd, [view[:HEADER_BLOCK], target], offset)
                return _Fetched(buf, view, target, False, n >= expected)
            expected = HEADER_BLOCK + align_up(length)
            n = os.preadv(fd, [view[:expected]], offset)
            payload = view[HEADER_BLOCK : HEADER_BLOCK + length]
            return _Fetched(buf, view, payload, True, n >= expected)
        except BaseException:
            view.release()
            self._bounce.give(buf)
            raise

    def _verify(self, job: _Read, got: _Fetched) -> bool:
        """The CPU half of a read: True when the slot held exactly ``job``'s block (header and
        payload checksum), False when it is torn, corrupt or rewritten. A bounced payload is
        copied to the out buffer only after its check: out never gets unchecked bytes from a
        bounce. Gives the bounce buffer back."""
        try:
            if not got.complete:
                return False
            header = decode_header(got.view, self.slot_size)
            if (
                header is None
                or header.key != job.key
                or header.generation != job.generation
                or header.length != job.length
                or checksum(got.payload) != header.payload_checksum
            ):
                return False
            if got.bounced:
                job.out[: job.length] = got.payload
            return True
        finally:
            got.release(self._bounce)

    def _read(self, job: _Read) -> bool:
        """Read ``job``'s block into its out buffer and verify it (see :meth:`_verify`)."""
        return self._verify(job, self._fetch(job))

    def _read_blocks(self, jobs: Sequence[_Read]) -> list[bool | Exception]:
        """Read and verify ``jobs``: up to ``io_threads`` pool threads read, one block after
        another each, while the calling thread verifies the blocks already read. A job's
        exception is its result; every block is verified before this returns.

        Why a pipeline: a thread that read and then checksummed each block kept the disk idle
        for the checksum (the whole payload read from memory the device just wrote, 55-65 us
        per MiB measured); now a reader goes straight to its next block. Readers run ahead of the
        verifier by at most ``_READ_AHEAD`` blocks per thread (each holds a bounce buffer).
        """
        n = len(jobs)
        if n < 2 or self._pool is None:
            return self._run(self._read, jobs)
        workers = min(self.io_threads, n)
        fetched: list[_Fetched | Exception | None] = [None] * n
        done: queue.SimpleQueue[int] = queue.SimpleQueue()  # indexes read, to verify
        credit: queue.SimpleQueue[bool] = queue.SimpleQueue()  # True: read one more; False: stop
        for _ in range(_READ_AHEAD * workers):
            credit.put(True)
        order = itertools.count()  # next() is atomic: each index goes to one reader

        def reader() -> None:
            while (i := next(order)) < n and credit.get():
                try:
                    fetched[i] = self._fetch(jobs[i])
                except Exception as e:  # handed to the caller, which raises or cleans up
                    fetched[i] = e
                done.put(i)

        results: list[bool | Exception] = [OSError("not run")] * n
        pool = self._pool
        futures = [pool.submit(reader) for _ in range(workers)]
        try:
            for _ in range(n):
                i = done.get()
                got, fetched[i] = fetched[i], None
                if isinstance(got, _Fetched):
                    try:
                        results[i] = self._verify(jobs[i], got)
                    except Exception as e:
                        results[i] = e
                elif isinstance(got, Exception):
                    results[i] = got
                credit.put(True)
        finally:
            for _ in range(workers):
                credit.put(False)  # wakes a reader left waiting when this loop was cut short
            for f in futures:
                f.result()
            for got in fetched:  # only when cut short: read, never verified
                if isinstance(got, _Fetched):
                    got.release(self._bounce)
        return results

    # ---- the Tier primitives ------------------------------------------------------------------

    @property
    def capacity_blocks(self) -> int:
        return self.num_slots

    @property
    def used_blocks(self) -> int:
        return len(self._index)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"disk tier {self.label!r} ({self.directory}) is closed")

    @staticmethod
    def _check_keys(keys: Sequence[Key]) -> None:
        for k in keys:
            if not isinstance(k, bytes) or len(k) != KEY_BYTES:
                raise ValueError(f"a key must be {KEY_BYTES} bytes, got {k!r}")

    def contains(self, keys: Sequence[Key]) -> list[bool]:
        self._check_open()
        with self._lock:
            return [k in self._index for k in keys]

    def put(self, keys: Sequence[Key], values: Sequence[Buffer]) -> list[PutStatus]:
        """Store each value in a free slot; see :class:`~kvferry.backends.base.Tier`.

        A key already present, or being put by another call right now, is ``EXISTS``.

        Raises:
            ValueError: a value larger than ``slot_size``, a key that is not 16 bytes, or
                ``keys`` and ``values`` of different lengths (nothing is stored).
            StorageError: a write failed; the blocks whose write succeeded are stored.
        """
        self._check_open()
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        self._check_keys(keys)
        views = [_byte_view(v, "a value") for v in values]
        for i, v in enumerate(views):
            if len(v) > self.slot_size:
                raise ValueError(
                    f"value {i} is {len(v)} bytes, larger than the slot size {self.slot_size}"
                )
        status: list[PutStatus] = [PutStatus.EXISTS] * len(keys)
        jobs: list[_Write] = []
        with self._lock:
            for i, (k, v) in enumerate(zip(keys, views)):
                if k in self._index or k in self._pending:
                    continue
                if not self._free:
                    status[i] = PutStatus.NO_SPACE
                    continue
                jobs.append(_Write(i, self._free.pop(), k, v, self._next_gen))
                self._pending.add(k)
                self._next_gen += 1
        results = self._write_blocks(jobs) if jobs else []
        failures: list[tuple[int, object]] = []
        with self._lock:
            for job, res in zip(jobs, results):
                self._pending.discard(job.key)
                if isinstance(res, Exception):
                    # Reusing the slot overwrites whatever half-write it holds.
                    self._free.append(job.slot)
                    failures.append((job.slot, res))
                else:
                    self._publish(job.slot, job.key, len(job.value), job.generation)
                    status[job.index] = PutStatus.STORED
        if failures:
            self._raise_io("write", failures)
        return status

    def get(self, keys: Sequence[Key], outs: Sequence[memoryview]) -> list[int | None]:
        """Read each present block into its out buffer; see :class:`~kvferry.backends.base.Tier`.

        Every payload's checksum is verified; a block that fails is dropped and reads as None.
        For a None, the bytes of that out buffer are unspecified.

        Raises:
            ValueError: an out buffer smaller than its block or read-only, a bad key, or
                ``keys`` and ``outs`` of different lengths (nothing is read).
            StorageError: a read failed.
        """
        self._check_open()
        if len(keys) != len(outs):
            raise ValueError(f"{len(keys)} keys but {len(outs)} out buffers")
        self._check_keys(keys)
        views = [_byte_view(o, "an out buffer") for o in outs]
        result: list[int | None] = [None] * len(keys)
        jobs: list[_Read] = []
        with self._lock:
            for i, k in enumerate(keys):
                slot = self._index.get(k)
                if slot is None:
                    continue
                length = self._slot_len[slot]
                if len(views[i]) < length or views[i].readonly:
                    raise ValueError(
                        f"out buffer {i} ({len(views[i])} bytes, "
                        f"{'read-only' if views[i].readonly else 'writable'}) cannot take "
                        f"a {length}-byte block"
                    )
                jobs.append(_Read(i, slot, k, length, self._slot_gen[slot], views[i]))
            for job in jobs:
                self._readers[job.slot] += 1
        results: list[bool | Exception] = []
        dropped: list[int] = []
        try:
            results = self._read_blocks(jobs)
        finally:
            with self._lock:
                for n, job in enumerate(jobs):
                    res = results[n] if n < len(results) else None
                    if res is True:
                        result[job.index] = job.length
                    elif (
                        res is False
                        and self._index.get(job.key) == job.slot
                        and self._slot_gen[job.slot] == job.generation
                    ):
                        # Still published as this very block, so the bytes on disk are bad.
                        self._forget(job.slot)
                        self._corrupt_dropped += 1
                        dropped.append(job.slot)
                    self._readers[job.slot] -= 1
                    if not self._readers[job.slot] and job.slot in self._awaiting_readers:
                        self._awaiting_readers.discard(job.slot)
                        self._free.append(job.slot)
        if dropped:
            log.warning(
                "disk tier %r: dropped %d corrupt block(s) in %s",
                self.label,
                len(dropped),
                self.directory,
            )
            self._wipe(dropped, "wipe of a corrupt block")
        failures = [(j.slot, r) for j, r in zip(jobs, results) if isinstance(r, Exception)]
        if failures:
            self._raise_io("read", failures)
        return result

    def _wipe(self, slots: list[int], op: str) -> None:
        """Invalidate the headers of unpublished ``slots`` on disk, then free them. A slot whose
        wipe failed is never reused (its old header might come back after a restart)."""
        results = self._run(self._invalidate, slots)
        failures: list[tuple[int, object]] = []
        with self._lock:
            for slot, res in zip(slots, results):
                if isinstance(res, Exception):
                    failures.append((slot, res))
                else:
                    self._recycle(slot)
        if failures:
            self._raise_io(op, failures)

    def delete(self, keys: Sequence[Key]) -> int:
        """Remove the present keys; their headers are wiped on disk before this returns.

        Raises:
            StorageError: a header could not be wiped (the key is gone from this tier, but may
                reappear after a restart).
        """
        self._check_open()
        slots: list[int] = []
        with self._lock:
            for k in keys:
                slot = self._index.get(k)
                if slot is not None:
                    self._forget(slot)
                    slots.append(slot)
        if slots:
            self._wipe(slots, "delete")
        return len(slots)

    def keys(self) -> list[Key]:
        self._check_open()
        with self._lock:
            return list(self._index)

    def stats(self) -> TierStats:
        with self._lock:
            used = len(self._index)
            return TierStats(
                total_blocks=self.num_slots,
                used_blocks=used,
                peak_blocks=self._peak,
                total_bytes=self.num_slots * self.slot_size,
                used_bytes=self._used_bytes,
                extra={
                    "direct_io": 1.0 if self.direct_io else 0.0,
                    "corrupt_dropped": float(self._corrupt_dropped),
                    "io_threads": float(self.io_threads),
                    "recovered_blocks": float(self._recovered),
                    "file_bytes": float(self.num_slots * self.slot_bytes),
                },
            )

    def close(self) -> None:
        """Flush (``fdatasync``) and close the slot files; idempotent.

        Raises:
            StorageError: a flush failed (the files are closed anyway).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors: list[tuple[str, OSError]] = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for fd, path in zip(self._fds, self._paths):
            try:
                os.fdatasync(fd)
            except OSError as e:
                errors.append((path, e))
        self._release()
        if errors:
            path, err = errors[0]
            raise StorageError(f"disk tier {self.label!r}: flush of {path} failed: {err}") from err

    def _release(self) -> None:
        """Close files, pool and lock without flushing (also the cleanup of a failed open)."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the fd drops the flock
            self._lock_fd = -1
