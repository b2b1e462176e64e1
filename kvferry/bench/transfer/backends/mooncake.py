"""Mooncake's Transfer Engine as a bench backend, so ``kvferry bench transfer`` measures it with
the same harness and statistics as kvferry's own engine.

Owns the mapping of the bench contract (see ``base.py``) onto Mooncake's Python API
(``mooncake.engine.TransferEngine``): P2P-handshake metadata (no etcd/HTTP metadata server), one
registered DRAM buffer per side, one ``batch_transfer_sync_read/write`` call per batch. It must
not time anything or compute statistics: the harness does that.

Optional dependency: ``pip install 'kvferry[mooncake]'`` (the ``mooncake-transfer-engine-non-cuda``
wheel), which needs the Debian/Ubuntu packages ``libibverbs1 ibverbs-providers`` even for TCP.

Facts about Mooncake that shape this module (checked against 0.3.13):

- ``initialize(host, "P2PHANDSHAKE", protocol, "")`` with a host and no port picks a free RPC
  port (``get_rpc_port()``); the segment name a peer opens is ``"host:rpc_port"``. Mooncake's RPC
  and TCP data listeners bind every interface (0.0.0.0 / ::), whatever host is given.
- Remote addresses are absolute addresses in the target process;
  ``get_first_buffer_address(seg)`` gives the start of the target's first registered buffer.
- The API does not tell an initiator how long that buffer is. A kvferry target therefore puts a
  small header (magic + capacity) at the start of its registered buffer and serves data after
  it; against a foreign Mooncake target (e.g. Mooncake's own tebench) the capacity is found by
  probing 1-byte reads, which the target rejects outside its registered buffers (each rejection
  logs an error line on both sides).
- After every 4th failed request on a TCP session, Mooncake fails the next request at once
  (valid or not) and the one after it waits ~1 s to reconnect: after a ``TransferError`` the
  next batch may fail spuriously.
- Every call returns an int (0 or -1) instead of raising; this module turns -1 into
  ``TransferError``/``SegmentError``.
- ``batch_transfer_sync_*`` releases the GIL and then busy-polls for completion (no sleep), so
  each waiting bench thread keeps one CPU core busy; more threads than cores only adds
  contention. The per-engine segment cache is guarded by a mutex, so concurrent calls from many
  threads on one engine are safe.
- Timeouts: ``MC_TRANSFER_TIMEOUT`` (seconds, default 30, minimum 5) is read by Mooncake itself
  when the engine object is created.
"""

from __future__ import annotations

import importlib.metadata
import math
import socket
import struct
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from kvferry.bench.transfer.backends.base import Op, TransferBenchBackend
from kvferry.config.models import KvferryConfig
from kvferry.errors import (
    ConfigError,
    KvferryError,
    PeerClosed,
    SegmentError,
    TransferError,
)

__all__ = ["MooncakeBenchBackend", "find_readable_size"]

_DIST_NAMES = ("mooncake-transfer-engine-non-cuda", "mooncake-transfer-engine")
_P2P_METADATA = "P2PHANDSHAKE"
_PROTOCOLS = {"auto": "tcp", "tcp": "tcp", "rdma": "rdma"}

# Header at the start of a kvferry target's registered buffer: magic, version 1, capacity (u64 LE).
# 4 KiB keeps the data area page-aligned relative to the buffer start.
_HEADER = struct.Struct("<16sQ")
_MAGIC = b"kvferry-mc-tgt\x00\x01"
_HEADER_BYTES = 4096

# Probing a foreign target's capacity. Mooncake 0.3.13's TCP transport fails the request that
# follows every 4th failed one on a session, even a valid one, and then spends 1 s reconnecting;
# so a probe session may fail at most 4 times, and after its 4th failure it sends nothing more
# (a spurious failure would make it report too small a capacity).
_PROBE_MAX_FAILURES = 4


def _engine_class() -> Any:
    """Import ``mooncake.engine.TransferEngine`` or explain which extra to install."""
    from kvferry.backends.mooncake import import_mooncake

    return import_mooncake("engine", "TransferEngine", package="mooncake-transfer-engine-non-cuda")


def _span(probes: int, failures: int) -> int:
    """How many candidate sizes ``probes`` reads can tell apart if at most ``failures`` of them
    may fail: sum of C(probes, i) for i in 1..failures (the "egg drop" bound)."""
    return sum(math.comb(probes, i) for i in range(1, failures + 1))


def find_readable_size(
    readable: Callable[[int], bool],
    *,
    max_failures: int,
    start: int = 4096,
    limit: int = 1 << 48,
) -> int:
    """The largest ``n`` for which ``readable(n)`` holds, with few failed probes.

    ``readable(n)`` says whether the first ``n`` bytes can be read; it must hold for ``n = 1``
    and be monotone (true up to the size, false after it). A failed probe is what is expensive
    here (see ``_PROBE_MAX_FAILURES``), so instead of bisecting (one failure per two probes)
    this doubles up to the first failure, then spends the remaining failures as in the egg-drop
    puzzle: with 3 failures left, at most about (6 * size) ** (1/3) cheap successful probes
    (~1,400 for a size just under 1 GiB, a few dozen for round sizes), and never more than
    ``max_failures`` failures, the last of which ends the search.

    Args:
        readable: the probe.
        max_failures: failures allowed (at least 2: one ends the doubling).
        start: first size tried after 1.
        limit: sizes above this are not tried; the answer is at most ``limit``.
    """
    if max_failures < 2:
        raise ValueError(f"max_failures={max_failures} is too small; expected at least 2")
    good = 1  # readable(good) holds
    n = start
    while n <= limit and readable(n):
        good = n
        n *= 2
    if n > limit:
        return good
    bad = n  # readable(bad) failed: the size lies in [good, bad)
    eggs = max_failures - 1
    unknown = bad - good - 1
    probes = 0
    while _span(probes, eggs) < unknown:
        probes += 1
    while bad - good > 1:
        # Invariant: bad - good - 1 <= _span(probes, eggs). Probe just high enough that a
        # failure leaves a range the remaining probes and failures can still resolve.
        n = min(good + _span(probes - 1, eggs - 1) + 1, bad - 1)
        probes -= 1
        if readable(n):
            good = n
        else:
            bad = n
            eggs -= 1
    return good


def _mooncake_version() -> str:
    for dist in _DIST_NAMES:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _touched_buffer(size: int) -> npt.NDArray[np.uint8]:
    """A zeroed byte array whose pages are all faulted in now, not on the first transfer."""
    buf = np.empty(size, dtype=np.uint8)
    buf.fill(0)  # writes every page: first-touch page faults stay out of the measurements
    return buf


class MooncakeBenchBackend(TransferBenchBackend):
    """Mooncake Transfer Engine (TCP by default) behind the tebench harness.

    One instance plays one role: target (``start_target``) or initiator (``connect``).
    """

    name: ClassVar[str] = "mooncake"

    def __init__(
        self,
        transport: str = "auto",
        seg_type: str = "DRAM",
        config: KvferryConfig | None = None,
    ) -> None:
        """Args:
        transport: "auto" (= "tcp"), "tcp" or "rdma" (Mooncake's protocol name).
        seg_type: only "DRAM"; the non-CUDA wheel registers host memory only.
        config: kvferry's config; ``listen.bind_address`` is the address this engine advertises
            in its segment name (loopback by default; "0.0.0.0" advertises the hostname).

        Raises:
            ConfigError: an unsupported ``transport`` or ``seg_type``.
        """
        if transport not in _PROTOCOLS:
            raise ConfigError(
                f"transport={transport!r} is not supported by the mooncake bench backend; "
                f"valid: {', '.join(_PROTOCOLS)}"
            )
        if seg_type != "DRAM":
            raise ConfigError(
                f"seg_type={seg_type!r} is not supported by the mooncake bench backend; valid: DRAM"
            )
        super().__init__(transport, seg_type)
        self.protocol = _PROTOCOLS[transport]
        bind = (config or KvferryConfig()).listen.bind_address
        self.host = socket.gethostname() if bind in ("0.0.0.0", "::") else bind
        self._engine: Any = None
        # Every buffer we registered, kept alive here until close() unregisters it.
        self._registered: list[npt.NDArray[np.uint8]] = []
        self._local: npt.NDArray[np.uint8] | None = None
        self._local_addr = 0
        self._local_size = 0
        self._target_seg: str | None = None
        self._target_data_addr = 0
        self._target_capacity = 0
        self._served_seg: str | None = None

    # --- shared ---------------------------------------------------------------------------

    def _new_engine(self) -> Any:
        engine = _engine_class()()
        rc = engine.initialize(self.host, _P2P_METADATA, self.protocol, "")
        if rc != 0:
            raise TransferError(
                f"mooncake TransferEngine.initialize({self.host!r}, {_P2P_METADATA!r}, "
                f"{self.protocol!r}, '') returned {rc}"
            )
        return engine

    def _start_engine(self) -> Any:
        if self._engine is not None:
            raise KvferryError(
                "this MooncakeBenchBackend already started an engine; use one instance per role"
            )
        self._engine = self._new_engine()
        return self._engine

    def _register(self, buf: npt.NDArray[np.uint8]) -> int:
        addr = int(buf.ctypes.data)
        rc = self._engine.register_memory(addr, buf.nbytes)
        if rc != 0:
            raise SegmentError(f"mooncake register_memory({addr:#x}, {buf.nbytes}) returned {rc}")
        self._registered.append(buf)
        return addr

    # --- target side ----------------------------------------------------------------------

    def start_target(self, total_buffer_size: int) -> str:
        """Register ``total_buffer_size`` bytes (plus a 4 KiB header) and serve them.

        Returns:
            The segment name ``"host:rpc_port"`` an initiator passes to ``connect``.

        Raises:
            ConfigError: ``total_buffer_size`` is not positive.
            MissingDependency: mooncake is not installed.
            TransferError, SegmentError: Mooncake failed to start or to register the buffer.
        """
        if total_buffer_size <= 0:
            raise ConfigError(
                f"total_buffer_size={total_buffer_size} is invalid; expected a positive size"
            )
        engine = self._start_engine()
        buf = _touched_buffer(_HEADER_BYTES + total_buffer_size)
        _HEADER.pack_into(buf.data, 0, _MAGIC, total_buffer_size)
        self._register(buf)
        self._served_seg = f"{self.host}:{engine.get_rpc_port()}"
        return self._served_seg

    # --- initiator side -------------------------------------------------------------------

    def connect(self, target_seg: str, local_buffer_size: int) -> None:
        """Register a local buffer and open ``target_seg`` (P2P handshake).

        Raises:
            ConfigError: ``local_buffer_size`` is not positive.
            PeerClosed: the target segment cannot be opened.
            SegmentError, TransferError: registration or the first read failed.
        """
        if local_buffer_size <= 0:
            raise ConfigError(
                f"local_buffer_size={local_buffer_size} is invalid; expected a positive size"
            )
        engine = self._start_engine()
        local = _touched_buffer(local_buffer_size)
        self._local_addr = self._register(local)
        self._local = local
        self._local_size = local_buffer_size
        base = int(engine.get_first_buffer_address(target_seg))
        if base == 0:
            raise PeerClosed(
                f"could not open mooncake segment {target_seg!r} (no handshake reply, or the "
                "target has no registered buffer)"
            )
        self._target_seg = target_seg
        self._target_data_addr, self._target_capacity = self._learn_target_layout(
            target_seg, base, local
        )
        local[:] = 0  # the layout reads landed here; hand the harness a clean buffer

    def _read_one(self, remote_addr: int, length: int) -> int:
        return int(
            self._engine.transfer_sync_read(self._target_seg, self._local_addr, remote_addr, length)
        )

    def _learn_target_layout(
        self, seg: str, base: int, local: npt.NDArray[np.uint8]
    ) -> tuple[int, int]:
        """(address of target offset 0, usable bytes) of the opened target.

        The header read lands at the start of ``local``, the registered local buffer.
        """
        if local.nbytes >= _HEADER.size and self._read_one(base, _HEADER.size) == 0:
            magic, capacity = _HEADER.unpack_from(local.data, 0)
            if magic == _MAGIC:
                return base + _HEADER_BYTES, int(capacity)
        # A foreign Mooncake target: no header, so find where its registered buffer ends.
        return base, self._probe_capacity(seg, base)

    def _probe_capacity(self, seg: str, base: int) -> int:
        """Length of the readable range starting at ``base``, found by 1-byte reads.

        Probes run on a throwaway engine: their failures count against its session, not the
        one the bench uses (see ``_PROBE_MAX_FAILURES``).
        """
        engine = self._new_engine()
        buf = np.zeros(64, dtype=np.uint8)  # every 1-byte read lands here
        addr = int(buf.ctypes.data)
        if engine.register_memory(addr, buf.nbytes) != 0:
            raise SegmentError(f"mooncake register_memory({addr:#x}, {buf.nbytes}) failed")
        try:

            def readable(n: int) -> bool:
                return int(engine.transfer_sync_read(seg, addr, base + n - 1, 1)) == 0

            if not readable(1):
                raise SegmentError(f"mooncake segment {seg!r}: cannot read its first buffer")
            return find_readable_size(readable, max_failures=_PROBE_MAX_FAILURES)
        finally:
            engine.unregister_memory(addr)
            engine = None  # the last reference: stops its listeners now, not at some later GC

    def local_buffer(self) -> memoryview:
        """The registered local buffer as a writable byte view (valid until ``close``)."""
        if self._local is None:
            raise SegmentError("no local buffer: call connect() first")
        return self._local.data

    def target_capacity(self) -> int:
        """Usable bytes of the opened target segment, from offset 0."""
        if self._target_seg is None:
            raise SegmentError("no target segment: call connect() first")
        return self._target_capacity

    def run_batch(
        self, op: Op, local_offsets: list[int], target_offsets: list[int], block_size: int
    ) -> None:
        """Move one batch with a single ``batch_transfer_sync_read/write`` call.

        Thread-safe: Mooncake releases the GIL for the whole call and guards its own state.

        Raises:
            ValueError: ``op`` unknown, list lengths differ, or ``block_size`` not positive.
            SegmentError: an offset range falls outside the local buffer or the target capacity
                (checked here: Mooncake would read or write any local address it is given).
            TransferError: Mooncake reported the batch failed (its return code in the message).
        """
        seg = self._target_seg
        if seg is None:
            raise SegmentError("no target segment: call connect() first")
        n = len(local_offsets)
        if n != len(target_offsets):
            raise ValueError(
                f"local_offsets has {n} entries but target_offsets has {len(target_offsets)}"
            )
        if block_size <= 0:
            raise ValueError(f"block_size={block_size} is invalid; expected a positive size")
        if n == 0:
            return
        if min(local_offsets) < 0 or max(local_offsets) + block_size > self._local_size:
            raise SegmentError(
                f"a local block [offset, offset+{block_size}) lies outside the local buffer of "
                f"{self._local_size} bytes"
            )
        if min(target_offsets) < 0 or max(target_offsets) + block_size > self._target_capacity:
            raise SegmentError(
                f"a target block [offset, offset+{block_size}) lies outside the target capacity "
                f"of {self._target_capacity} bytes"
            )
        la = self._local_addr
        ta = self._target_data_addr
        local_addrs = [la + o for o in local_offsets]
        target_addrs = [ta + o for o in target_offsets]
        lengths = [block_size] * n
        if op == "read":
            rc = self._engine.batch_transfer_sync_read(seg, local_addrs, target_addrs, lengths)
        elif op == "write":
            rc = self._engine.batch_transfer_sync_write(seg, local_addrs, target_addrs, lengths)
        else:
            raise ValueError(f"op={op!r} is invalid; expected 'read' or 'write'")
        if rc != 0:
            raise TransferError(
                f"mooncake batch_transfer_sync_{op} to {seg!r} failed with code {rc} "
                f"({n} blocks of {block_size} bytes)"
            )

    # --- both -----------------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        """Engine facts for the JSON report: version, protocol, metadata mode, segment."""
        info = super().describe()
        info.update(
            {
                "mooncake_version": _mooncake_version(),
                "protocol": self.protocol,
                "metadata": _P2P_METADATA,
                "seg_type": self.seg_type,
            }
        )
        if self._served_seg is not None:
            info["segment"] = self._served_seg
        if self._target_seg is not None:
            info["target_segment"] = self._target_seg
            info["target_capacity"] = self._target_capacity
        return info

    def close(self) -> None:
        """Unregister every buffer and stop the engine; safe to call twice."""
        engine, self._engine = self._engine, None
        registered, self._registered = self._registered, []
        self._local = None
        self._target_seg = None
        self._served_seg = None
        if engine is None:
            return
        for buf in registered:
            # Best effort: the engine is going away either way, and a failed unregister must
            # not keep the rest from being released.
            engine.unregister_memory(int(buf.ctypes.data))
        # Dropping the last reference runs Mooncake's destructor: closes segments, stops the
        # RPC and TCP listeners. Buffers are freed only after that (they stay in `registered`
        # until this function returns).
        del engine
