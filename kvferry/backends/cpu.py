"""The DRAM tier: a preallocated pool of fixed-size slots, lent out as zero-copy views.

The pool is one region of ``buffer_number`` slots of ``store.slot_size`` bytes (UCM's
buffer_number; or ``capacity // slot_size``), allocated and touched once at start
(``kvferry.transfer.memory``: memfd, pages populated in steps a signal can stop), so no page
fault lands on the data path and, in a store server, peers can read the pool through the
transfer engine. A pool above ``cpu.max_memory_fraction`` of the memory available at start
(MemAvailable) is refused before it is allocated, unless ``cpu.force_capacity``. A slot holds one
block; its length is kept beside it. No allocation per block: slots come from a free list.

Copies happen under the tier's lock: a memoryview slice assignment holds the GIL anyway, and a
copy under the lock is what makes ``get`` and ``delete`` from different threads safe without a
reader count per slot.

Integrity (``cpu.checksum``). A slot is written only by ``put`` (a copy under the lock) or by
the holder of a reservation, through the view ``reserve`` lent (in a store server, a same-host
client through the shared mapping). A holder that stalls past its lease may still write after
the store took the slot back (``abandon``) and gave it to another block: the one way a slot's
bytes can change behind the store's back. So an abandoned slot is *guarded* from then on: every
block later stored in it keeps :func:`~kvferry.backends.base.block_checksum` (xxh3-64 seeded with
its key) beside its length, a ``commit`` into it publishes only when the slot holds exactly the
checksum its writer declares (``REJECTED`` otherwise), and reads of it (``get``,
``views(verify=True)``, and the store server's clients, told by ``checksums``) check the bytes and
treat a mismatch as a miss, never a hit. Other slots cost nothing: no hashing on the common path.
``on`` guards every slot (end-to-end checks of every block, for those who want them whatever the
cost); ``off`` guards none.
"""

from __future__ import annotations

import logging
import threading
from array import array
from collections.abc import Sequence

from pydantic import BaseModel

from kvferry.backends.base import (
    Buffer,
    Key,
    PutStatus,
    SlotTier,
    TierContext,
    TierStats,
    block_checksum,
)
from kvferry.config.models import CpuTierConfig
from kvferry.config.units import format_size_approx
from kvferry.errors import ConfigError, StorageError
from kvferry.observe.logs import RateLimitedLog
from kvferry.transfer.memory import MemoryRegion, allocate_region

log = logging.getLogger("kvferry.backends.cpu")
_corrupt_log = RateLimitedLog(log)


class CpuTier(SlotTier):
    """DRAM slots; see the module docstring."""

    name = "cpu"
    config_section = "cpu"

    def __init__(self, config: CpuTierConfig, context: TierContext) -> None:
        super().__init__(config, context)
        slot = context.slot_size
        n = _slots(config, slot)
        if n <= 0:
            raise StorageError(
                f"cpu tier: capacity {config.capacity} bytes holds no slot of {slot} bytes; "
                "raise cpu.capacity or cpu.buffer_number"
            )
        self.check(config, context)
        size = n * slot
        try:
            if context.allocate is not None:
                self.region: MemoryRegion = context.allocate(size)
            else:
                self.region = allocate_region(0, size, use_hugepages=config.use_hugepages)
        except Exception as e:
            raise StorageError(f"cpu tier: cannot allocate {size} bytes: {e}") from e
        self._pinned = config.pinned and _pin_with_torch(self.region)
        self.slot_size = slot
        self.n_slots = n
        self._pool = self.region.view
        self._lock = threading.Lock()
        self._index: dict[Key, int] = {}  # key -> slot
        self._reserved: dict[Key, int] = {}
        # Lengths in an array (4 bytes a slot). The free list holds the slot numbers as int
        # objects made once here, so the index's values share them: no int object per block.
        self._lengths = array("I", bytes(4 * n))
        mode = config.checksum
        self._guard_all = mode == "on"
        self._guarding = mode != "off"
        self._sums = array("Q", bytes(8 * n)) if self._guarding else array("Q")
        # Slots once lent to a writer that did not finish: it may still write there.
        self._tainted: set[int] = set()
        self._corrupt = 0
        self._free = list(range(n - 1, -1, -1))  # pop() hands out slot 0 first
        self._peak = 0
        self._closed = False

    @classmethod
    def check(cls, config: BaseModel, context: TierContext) -> None:
        """Refuse a pool above ``max_memory_fraction`` of the memory available now (unless
        ``force_capacity``): touching it would end in the OOM killer, not in an error."""
        if not isinstance(config, CpuTierConfig):
            raise TypeError(f"cpu tier: expected a CpuTierConfig, got {type(config).__name__}")
        size = _slots(config, context.slot_size) * context.slot_size
        available = available_memory()
        if config.force_capacity or available is None:
            return
        limit = int(available * config.max_memory_fraction)
        if size > limit:
            asked = (
                f"cpu.capacity {format_size_approx(config.capacity)}"
                if not config.buffer_number
                else f"cpu.buffer_number {config.buffer_number} x {context.slot_size} bytes"
            )
            raise ConfigError(
                f"cpu tier: a pool of {format_size_approx(size)} ({asked}) is more than "
                f"{config.max_memory_fraction * 100:g}% of the memory available now "
                f"({format_size_approx(available)} MemAvailable); lower cpu.capacity "
                "(--capacity), or set cpu.force_capacity (--force-capacity) to allocate it anyway"
            )

    # -- sizes ----------------------------------------------------------------------------
    @property
    def capacity_blocks(self) -> int:
        return self.n_slots

    @property
    def used_blocks(self) -> int:
        return self.n_slots - len(self._free)

    # -- primitives -----------------------------------------------------------------------
    def contains(self, keys: Sequence[Key]) -> list[bool]:
        index = self._index
        return [k in index for k in keys]

    def put(self, keys: Sequence[Key], values: Sequence[Buffer]) -> list[PutStatus]:
        slot_size = self.slot_size
        for v in values:
            if len(v) > slot_size:
                raise ValueError(
                    f"cpu tier: a {len(v)}-byte block does not fit a {slot_size}-byte slot "
                    "(store.slot_size)"
                )
        out: list[PutStatus] = []
        pool, lengths, index, free = self._pool, self._lengths, self._index, self._free
        sums, tainted, guard_all = self._sums, self._tainted, self._guard_all
        with self._lock:
            self._check_open()
            for k, v in zip(keys, values):
                if k in index or k in self._reserved:
                    out.append(PutStatus.EXISTS)
                    continue
                if not free:
                    out.append(PutStatus.NO_SPACE)
                    continue
                slot = free.pop()
                n = len(v)
                start = slot * slot_size
                pool[start : start + n] = v
                lengths[slot] = n
                if guard_all or (tainted and slot in tainted):
                    sums[slot] = block_checksum(k, v)
                index[k] = slot
                out.append(PutStatus.STORED)
            self._note_peak()
        return out

    def get(self, keys: Sequence[Key], outs: Sequence[memoryview]) -> list[int | None]:
        res: list[int | None] = []
        pool, lengths, index, slot_size = self._pool, self._lengths, self._index, self.slot_size
        tainted, guard_all = self._tainted, self._guard_all
        with self._lock:
            self._check_open()
            for k, out in zip(keys, outs):
                slot = index.get(k)
                if slot is None:
                    res.append(None)
                    continue
                n = lengths[slot]
                if len(out) < n:
                    raise ValueError(
                        f"cpu tier: output buffer of {len(out)} bytes is smaller than the "
                        f"{n}-byte block"
                    )
                start = slot * slot_size
                out[:n] = pool[start : start + n]
                if (guard_all or (tainted and slot in tainted)) and block_checksum(
                    k, out[:n]
                ) != self._sums[slot]:
                    self._drop_corrupt(k, slot)
                    res.append(None)
                    continue
                res.append(n)
        return res

    def delete(self, keys: Sequence[Key]) -> int:
        removed = 0
        with self._lock:
            for k in keys:
                slot = self._index.pop(k, None)
                if slot is not None:
                    self._free.append(slot)
                    removed += 1
        return removed

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._index)

    # -- zero-copy ------------------------------------------------------------------------
    def reserve(self, keys: Sequence[Key], sizes: Sequence[int]) -> list[memoryview | None]:
        slot_size = self.slot_size
        for size in sizes:
            if not 0 < size <= slot_size:
                raise ValueError(f"cpu tier: block size {size} is not in (0, {slot_size}]")
        out: list[memoryview | None] = []
        with self._lock:
            self._check_open()
            for k in keys:
                if k in self._index or k in self._reserved:
                    raise ValueError(f"cpu tier: block {k.hex()} is already present or reserved")
            for k, size in zip(keys, sizes):
                if not self._free:
                    out.append(None)
                    continue
                slot = self._free.pop()
                self._reserved[k] = slot
                self._lengths[slot] = size
                start = slot * slot_size
                out.append(self._pool[start : start + size])
            self._note_peak()
        return out

    def commit(
        self, keys: Sequence[Key], ok: Sequence[bool], checksums: Sequence[int] | None = None
    ) -> list[bool]:
        if checksums is not None and len(checksums) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(checksums)} checksums")
        published: list[bool] = []
        pool, lengths, slot_size = self._pool, self._lengths, self.slot_size
        with self._lock:
            for i, (k, good) in enumerate(zip(keys, ok)):
                slot = self._reserved.pop(k, None)
                if slot is None:
                    published.append(False)
                    continue  # never reserved (no space) or already aborted
                if good and self._guarded(slot):
                    start = slot * slot_size
                    actual = block_checksum(k, pool[start : start + lengths[slot]])
                    if checksums is not None and actual != checksums[i]:
                        self._corrupt += 1
                        good = False
                    else:
                        self._sums[slot] = actual
                if good:
                    self._index[k] = slot
                else:
                    self._free.append(slot)
                published.append(good)
        return published

    def abandon(self, keys: Sequence[Key]) -> None:
        with self._lock:
            for k in keys:
                slot = self._reserved.pop(k, None)
                if slot is None:
                    continue
                if self._guarding:
                    self._tainted.add(slot)
                self._free.append(slot)

    def needs_checksum(self, keys: Sequence[Key]) -> list[bool]:
        if not self._guard_all and not self._tainted:
            return [False] * len(keys)  # the common case, without the lock
        with self._lock:
            reserved, guard_all, tainted = self._reserved, self._guard_all, self._tainted
            return [k in reserved and (guard_all or reserved[k] in tainted) for k in keys]

    def views(self, keys: Sequence[Key], *, verify: bool = False) -> list[memoryview | None]:
        out: list[memoryview | None] = []
        pool, lengths, index, slot_size = self._pool, self._lengths, self._index, self.slot_size
        check = verify and self._guarding
        with self._lock:
            self._check_open()
            for k in keys:
                slot = index.get(k)
                if slot is None:
                    out.append(None)
                else:
                    start = slot * slot_size
                    view = pool[start : start + lengths[slot]].toreadonly()
                    if (
                        check
                        and self._guarded(slot)
                        and block_checksum(k, view) != self._sums[slot]
                    ):
                        self._drop_corrupt(k, slot)
                        out.append(None)
                        continue
                    out.append(view)
        return out

    def checksums(self, keys: Sequence[Key]) -> list[int | None]:
        if not self._guarding:
            return [None] * len(keys)
        sums, index = self._sums, self._index
        with self._lock:
            if not self._guard_all and not self._tainted:
                return [None] * len(keys)  # the common case: nothing can have changed
            out: list[int | None] = []
            for k in keys:
                slot = index.get(k)
                out.append(None if slot is None or not self._guarded(slot) else sums[slot])
            return out

    def _guarded(self, slot: int) -> bool:
        return self._guard_all or slot in self._tainted

    def verify(self, keys: Sequence[Key]) -> list[Key]:
        if not self._guarding:
            return []
        dropped: list[Key] = []
        pool, lengths, slot_size = self._pool, self._lengths, self.slot_size
        with self._lock:
            for k in keys:
                slot = self._index.get(k)
                if slot is None or not self._guarded(slot):
                    continue
                start = slot * slot_size
                if block_checksum(k, pool[start : start + lengths[slot]]) != self._sums[slot]:
                    self._drop_corrupt(k, slot)
                    dropped.append(k)
        return dropped

    def _drop_corrupt(self, key: Key, slot: int) -> None:
        """Forget a block whose bytes no longer match its checksum; caller holds the lock. The
        store learns it from the miss (``get`` None / ``views`` None) and drops its index entry."""
        _corrupt_log.warning(
            "corrupt", "cpu tier: block %s failed its checksum; dropped", key.hex()
        )
        del self._index[key]
        self._free.append(slot)
        self._corrupt += 1

    def locate(self, keys: Sequence[Key]) -> list[tuple[int, int] | None]:
        """(byte offset in ``region``, length) of each present block; None for a miss. Used by
        the store server, whose peers read the region directly."""
        out: list[tuple[int, int] | None] = []
        with self._lock:
            for k in keys:
                slot = self._index.get(k, self._reserved.get(k))
                out.append(None if slot is None else (slot * self.slot_size, self._lengths[slot]))
        return out

    # -- housekeeping ---------------------------------------------------------------------
    def stats(self) -> TierStats:
        with self._lock:
            used = self.used_blocks
            used_bytes = sum(self._lengths[s] for s in self._index.values())
            return TierStats(
                total_blocks=self.n_slots,
                used_blocks=used,
                peak_blocks=self._peak,
                total_bytes=self.n_slots * self.slot_size,
                used_bytes=used_bytes,
                extra={
                    "reserved": float(len(self._reserved)),
                    "corrupt_dropped": float(self._corrupt),
                    "guarded_slots": float(self.n_slots if self._guard_all else len(self._tainted)),
                },
            )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._index.clear()
            self._reserved.clear()
        if self._pinned:
            # Unpin before the memory goes: the registration is CUDA state on this address
            # range, which a later pool may be mapped at again.
            _unpin_with_torch(self.region)
        if self.context.allocate is None:
            self.region.close()

    def _note_peak(self) -> None:
        used = self.n_slots - len(self._free)
        if used > self._peak:
            self._peak = used

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("cpu tier is closed")


def _slots(config: CpuTierConfig, slot_size: int) -> int:
    """Slots of the pool: ``buffer_number``, else as many as ``capacity`` holds."""
    return config.buffer_number or config.capacity // slot_size


def available_memory() -> int | None:
    """Bytes the kernel can give without swapping (``MemAvailable`` of /proc/meminfo), or None
    where that is not known (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _pin_with_torch(region: MemoryRegion) -> bool:
    """Page-lock the pool through CUDA when torch and a GPU are present; say so otherwise.
    True when the pool is pinned."""
    try:
        import torch
    except ImportError:
        log.warning("cpu.pinned is set but torch is not installed; the pool stays pageable")
        return False
    if not torch.cuda.is_available():
        log.warning("cpu.pinned is set but no CUDA device is present; the pool stays pageable")
        return False
    result = torch.cuda.cudart().cudaHostRegister(region.address, region.size, 0)
    if int(result) != 0:
        log.warning("cudaHostRegister of the cpu pool failed (%s); it stays pageable", result)
        return False
    return True


def _unpin_with_torch(region: MemoryRegion) -> None:
    import torch

    result = torch.cuda.cudart().cudaHostUnregister(region.address)
    if int(result) != 0:
        log.warning("cudaHostUnregister of the cpu pool failed (%s)", result)
