"""Memory regions: the bytes a transfer engine may move, and who may map them.

A region is either *allocated* by kvferry (a ``memfd`` mapping, pages touched up front, shareable
with other processes on the same host) or *registered* from a caller's buffer (numpy array,
memoryview, bytearray, mmap, CPU torch tensor). Only allocated regions can be reached by the shm
transport; registered ones are reached over tcp (or local within one process).

GPU memory (a CUDA tensor, or ``allocate(size, location="cuda:N")``) is a ``DeviceRegion``: no
socket or memmove can reach it, so every transfer that touches it is staged through a pinned host
buffer with a synchronous copy (``stage``, ``to_host``, ``from_host``), the way Mooncake's tcp
transport stages GPU memory. Peers see it as a region like any other (its location says where
it lives) and reach it over tcp or local, never shm.

This module owns buffer plumbing (addresses, views, mapping a peer's memfd) and does no socket I/O.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvferry.errors import SegmentError

PAGE_SIZE = mmap.PAGESIZE

memmove = ctypes.memmove
"""memmove(dst_addr, src_addr, n): a ctypes foreign call, so it releases the GIL while copying."""


@dataclass(frozen=True, slots=True)
class ShmInfo:
    """How a process on the same host maps an allocated region: /proc/<pid>/fd/<fd>."""

    pid: int
    fd: int
    inode: int
    device: int

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "fd": self.fd, "inode": self.inode, "device": self.device}


class MemoryRegion:
    """A registered span of bytes with a stable address.

    Attributes:
        region_id: id unique within its engine; peers address the region by it.
        size: bytes.
        location: "cpu" (device memory is a ``DeviceRegion``).
        view: writable ``memoryview`` of format "B" over the bytes.
        address: the address of byte 0 (for memmove).
        shm: how another local process can map it, or None for registered buffers.
        peer_writable: peers may WRITE into it over the wire (False: the target refuses WRITE
            and WRITEV frames for it, e.g. a store server's pool, whose blocks are immutable).
    """

    __slots__ = (
        "_array",
        "_keep",
        "_mmap",
        "address",
        "location",
        "peer_writable",
        "region_id",
        "shm",
        "size",
        "view",
    )

    def __init__(
        self,
        region_id: int,
        array: np.ndarray[Any, np.dtype[np.uint8]],
        *,
        location: str = "cpu",
        shm: ShmInfo | None = None,
        keep: object = None,
        mapping: mmap.mmap | None = None,
    ) -> None:
        self.region_id = region_id
        self._array = array
        self.size = int(array.nbytes)
        self.view = memoryview(array.data).cast("B")
        self.address = int(array.ctypes.data)
        self.location = location
        self.shm = shm
        self.peer_writable = True
        self._keep = keep
        self._mmap = mapping

    @property
    def array(self) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """The region as a flat uint8 numpy array (no copy)."""
        return self._array

    def close(self) -> None:
        """Drop this object's references; the memory is freed once no view remains."""
        self.view.release()
        self._keep = None
        if self.shm is not None:
            try:
                os.close(self.shm.fd)
            except OSError:
                pass
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # A caller still holds a view of the region; the mapping goes when it does.
                pass

    def __repr__(self) -> str:
        kind = "shm" if self.shm else "registered"
        return f"MemoryRegion(id={self.region_id}, size={self.size}, {kind}, {self.location})"


POPULATE_CHUNK = 64 << 20
"""Bytes touched per step when an allocation populates its pages: between steps Python runs
pending signal handlers, so a SIGINT/SIGTERM ends a large allocation within one step."""

# MADV_POPULATE_WRITE (Linux 5.14): fault a range in writable, as MAP_POPULATE does at mmap
# time, but per call. Python 3.11's mmap module does not name it; the value is Linux's.
_MADV_POPULATE_WRITE: int = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def allocate_region(region_id: int, size: int, *, use_hugepages: bool = False) -> MemoryRegion:
    """Allocate ``size`` bytes of shareable memory with every page touched.

    A fresh page costs a fault on first touch (about 3x the copy cost on this class of machine), so
    the pages are populated here, not on the first transfer. They are populated in steps of
    :data:`POPULATE_CHUNK` bytes (not one ``MAP_POPULATE`` that no signal can stop), so a signal
    handler that raises (Ctrl-C, a server's SIGTERM while starting) ends a large allocation
    promptly; the partial mapping is released and the exception propagates.

    Raises:
        SegmentError: size is not positive or the memory cannot be allocated.
    """
    if size <= 0:
        raise SegmentError(f"allocation size must be positive, got {size}")
    try:
        fd = os.memfd_create("kvferry-segment", os.MFD_CLOEXEC)
    except OSError as e:
        raise SegmentError(f"cannot allocate {size} bytes of shared memory: {e}") from e
    mapping: mmap.mmap | None = None
    try:
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        if use_hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mapping.madvise(mmap.MADV_HUGEPAGE)  # before the pages exist, so it applies
            except OSError:
                pass  # advice only: THP for shmem may be disabled on this kernel
        _populate(mapping, size)
        st = os.fstat(fd)
    except OSError as e:
        _release(mapping, fd)
        raise SegmentError(f"cannot allocate {size} bytes of shared memory: {e}") from e
    except BaseException:  # a signal handler's exception mid-populate: give the memory back
        _release(mapping, fd)
        raise
    # The first view is made only now: a mapping with no view can be closed (its memory given
    # back at once) on any failure above.
    array = np.frombuffer(mapping, dtype=np.uint8)
    shm = ShmInfo(pid=os.getpid(), fd=fd, inode=st.st_ino, device=st.st_dev)
    return MemoryRegion(region_id, array, shm=shm, keep=mapping, mapping=mapping)


def _populate(mapping: mmap.mmap, size: int) -> None:
    """Fault in every page of ``mapping``, one :data:`POPULATE_CHUNK` at a time."""
    advise = True
    for start in range(0, size, POPULATE_CHUNK):
        length = min(POPULATE_CHUNK, size - start)
        while advise:
            try:
                mapping.madvise(_MADV_POPULATE_WRITE, start, length)
                break
            except InterruptedError:
                continue  # a signal arrived: its handler has run (and may have raised)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise  # ENOMEM and the like: the memory is not there
                advise = False  # a kernel before 5.14: touch the pages instead
        if not advise:
            pages = range(start, start + length, PAGE_SIZE)
            mapping[start : start + length : PAGE_SIZE] = bytes(len(pages))


def _release(mapping: mmap.mmap | None, fd: int) -> None:
    if mapping is not None:
        mapping.close()
    os.close(fd)


def register_buffer(region_id: int, buffer: object) -> MemoryRegion | DeviceRegion:
    """Wrap a caller's writable, contiguous buffer as a region (no copy).

    Accepts numpy arrays, memoryview, bytearray, mmap and torch tensors (a CUDA tensor becomes a
    ``DeviceRegion``). The caller keeps the buffer alive and unchanged in size until it is
    unregistered.

    Raises:
        SegmentError: the buffer is read-only, not contiguous, empty, or of an unsupported type.
    """
    location = "cpu"
    obj: Any = buffer
    if type(buffer).__module__.startswith("torch"):
        if getattr(buffer, "is_cuda", False):
            return DeviceRegion(region_id, buffer)
        obj, location = _torch_to_numpy(buffer)
    try:
        if isinstance(obj, np.ndarray):
            if not obj.flags.c_contiguous:
                raise SegmentError("numpy array must be C-contiguous to be registered")
            if not obj.flags.writeable:
                raise SegmentError("numpy array must be writable to be registered")
            array = obj.reshape(-1).view(np.uint8)
        else:
            mv = memoryview(obj)
            if mv.readonly:
                raise SegmentError(
                    f"{type(buffer).__name__} buffer is read-only; register a writable one"
                )
            if not mv.c_contiguous:
                raise SegmentError("buffer must be C-contiguous to be registered")
            array = np.frombuffer(mv.cast("B"), dtype=np.uint8)
    except TypeError as e:
        raise SegmentError(
            f"cannot register {type(buffer).__name__}: expected a numpy array, memoryview, "
            "bytearray, mmap or CPU torch tensor"
        ) from e
    if array.nbytes == 0:
        raise SegmentError("cannot register an empty buffer")
    return MemoryRegion(region_id, array, location=location, keep=buffer)


def _torch_to_numpy(tensor: Any) -> tuple[np.ndarray[Any, np.dtype[np.uint8]], str]:
    if not tensor.is_contiguous():
        raise SegmentError("torch tensor must be contiguous to be registered")
    flat = tensor.detach().reshape(-1).view(__import__("torch").uint8)
    return flat.numpy(), "cpu"


class DeviceRegion:
    """A registered span of device (GPU) memory, reached only by copies through host memory.

    Made from a contiguous CUDA tensor (``register``) or by ``allocate(size, "cuda:N")``. The
    engine stages an initiator's device bytes through a pinned host buffer per submit (one copy
    per run of adjacent requests, ``kvferry.transfer.staging``); a target stages each request or
    stretch of a vector it serves. Copies are synchronous: when ``to_host`` or
    ``from_host`` returns, the bytes are where they were sent.

    The constructor takes any contiguous torch tensor; on a CPU tensor every staging step runs
    with CPU copies (tests use that to exercise the staging paths where no GPU exists).

    Attributes:
        region_id: id unique within its engine.
        size: bytes.
        location: the tensor's device, e.g. "cuda:0".
        tensor: the region as a flat uint8 tensor on its device (no copy).
    """

    __slots__ = ("_pinned", "_torch", "location", "peer_writable", "region_id", "size", "tensor")

    shm: ShmInfo | None = None  # device memory is never mapped by a peer

    def __init__(self, region_id: int, tensor: Any) -> None:
        import torch

        if not tensor.is_contiguous():
            raise SegmentError("torch tensor must be contiguous to be registered")
        if tensor.numel() == 0:
            raise SegmentError("cannot register an empty buffer")
        self._torch = torch
        self.region_id = region_id
        self.tensor = tensor.detach().reshape(-1).view(torch.uint8)
        self.size = int(self.tensor.numel())
        self.location = str(tensor.device)
        self.peer_writable = True
        self._pinned = bool(tensor.is_cuda)

    @property
    def pinned(self) -> bool:
        """True when the region is on a GPU (its staging buffers are pinned host memory)."""
        return self._pinned

    def stage(self, size: int) -> MemoryRegion:
        """A host buffer of ``size`` bytes to move this region's bytes through (pinned when the
        region is on a GPU; torch's host allocator caches and reuses the pinned blocks)."""
        host = self._torch.empty(size, dtype=self._torch.uint8, pin_memory=self._pinned)
        return MemoryRegion(-1, host.numpy(), keep=host)

    def to_host(self, offset: int, dst: np.ndarray[Any, np.dtype[np.uint8]]) -> None:
        """Copy ``dst.size`` bytes at ``offset`` of this region into host memory ``dst``."""
        n = dst.size
        self._torch.from_numpy(dst).copy_(self.tensor[offset : offset + n])

    def from_host(self, offset: int, src: np.ndarray[Any, np.dtype[np.uint8]]) -> None:
        """Copy host memory ``src`` to ``offset`` of this region."""
        n = src.size
        self.tensor[offset : offset + n].copy_(self._torch.from_numpy(src))

    def close(self) -> None:
        """Nothing to release here: the caller (or the engine, for ``allocate``) owns the
        tensor, which is freed with its last reference."""

    def __repr__(self) -> str:
        return f"DeviceRegion(id={self.region_id}, size={self.size}, {self.location})"


def allocate_device(region_id: int, size: int, location: str) -> DeviceRegion:
    """Allocate ``size`` zeroed bytes of GPU memory at ``location`` ("cuda" or "cuda:N").

    Raises:
        SegmentError: bad size, torch or a CUDA device is missing, or the memory cannot be had.
    """
    if size <= 0:
        raise SegmentError(f"allocation size must be positive, got {size}")
    try:
        import torch
    except ImportError as e:
        raise SegmentError(
            f"location {location!r} needs torch with CUDA; torch is not installed"
        ) from e
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(location[5:]) if location.startswith("cuda:") else 0
    if index >= count:
        raise SegmentError(
            f"location {location!r}: this machine has {count} CUDA device(s); "
            + ("use 'cpu'" if count == 0 else f"use cuda:0 .. cuda:{count - 1}")
        )
    try:
        tensor = torch.zeros(size, dtype=torch.uint8, device=location)
    except RuntimeError as e:  # out of memory, device busy
        raise SegmentError(f"cannot allocate {size} bytes on {location}: {e}") from e
    return DeviceRegion(region_id, tensor)


class PeerMapping:
    """A same-host peer's allocated region, mapped into this process (the shm transport's view)."""

    __slots__ = ("_array", "_mmap", "address", "size", "view")

    def __init__(self, info: ShmInfo, size: int) -> None:
        path = f"/proc/{info.pid}/fd/{info.fd}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise SegmentError(f"cannot open peer memory {path}: {e}") from e
        try:
            st = os.fstat(fd)
            # The pid/fd pair may name another file if the peer is in another pid namespace or
            # restarted; the inode check makes sure we map the region we were told about.
            if (st.st_ino, st.st_dev) != (info.inode, info.device) or st.st_size < size:
                raise SegmentError(f"{path} is not the peer's region (inode or size differs)")
            self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except OSError as e:
            raise SegmentError(f"cannot map peer memory {path}: {e}") from e
        finally:
            os.close(fd)
        self._array = np.frombuffer(self._mmap, dtype=np.uint8)
        self.address = int(self._array.ctypes.data)
        self.size = size
        self.view = memoryview(self._array.data).cast("B")

    def close(self) -> None:
        self.view.release()
        del self._array
        try:
            self._mmap.close()
        except BufferError:
            pass
