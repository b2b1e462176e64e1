"""kvferry's own TransferEngine as a tebench backend (drives only the public engine API)."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvferry.bench.transfer.backends.base import Op, TransferBenchBackend
from kvferry.config.models import KvferryConfig
from kvferry.errors import ConfigError, SegmentError
from kvferry.transfer import (
    MemoryRegion,
    OpCode,
    SegmentHandle,
    TransferEngine,
    TransferRequest,
    TransferState,
)
from kvferry.transfer.memory import DeviceRegion

__all__ = ["KvferryBenchBackend"]


class KvferryBenchBackend(TransferBenchBackend):
    name = "kvferry"

    def __init__(
        self, transport: str = "auto", seg_type: str = "DRAM", config: KvferryConfig | None = None
    ) -> None:
        super().__init__(transport, seg_type)
        self._location = _location(seg_type)
        config = config or KvferryConfig()
        if transport != "auto":
            config = config.model_copy(
                update={"transfer": config.transfer.model_copy(update={"transport": transport})}
            )
        self.config = config
        self.engine = TransferEngine(config)
        self._local: MemoryRegion | DeviceRegion | None = None
        self._target: MemoryRegion | DeviceRegion | None = None
        self._handle: SegmentHandle | None = None

    def start_target(self, total_buffer_size: int) -> str:
        self._target = self.engine.allocate(total_buffer_size, self._location)
        return self.engine.listen()

    def connect(self, target_seg: str, local_buffer_size: int) -> None:
        self._local = self.engine.allocate(local_buffer_size, self._location)
        self._handle = self.engine.open_segment(target_seg)
        self.transport = self._handle.transport

    def local_buffer(self) -> memoryview:
        local = self._connected()
        if isinstance(local, DeviceRegion):
            raise SegmentError("the local buffer is GPU memory; use write_local / read_local")
        return local.view

    def write_local(self, offset: int, data: np.ndarray[Any, np.dtype[np.uint8]]) -> None:
        local = self._connected()
        if isinstance(local, DeviceRegion):
            local.from_host(offset, data)
        else:
            local.array[offset : offset + data.size] = data

    def read_local(self, offset: int, n: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        local = self._connected()
        out = np.empty(n, dtype=np.uint8)
        if isinstance(local, DeviceRegion):
            local.to_host(offset, out)
        else:
            out[:] = local.array[offset : offset + n]
        return out

    def _connected(self) -> MemoryRegion | DeviceRegion:
        if self._local is None:
            raise SegmentError("connect() first")
        return self._local

    def target_capacity(self) -> int:
        if self._handle is None:
            raise SegmentError("connect() first")
        return self._handle.size

    def run_batch(
        self, op: Op, local_offsets: list[int], target_offsets: list[int], block_size: int
    ) -> None:
        engine, local, handle = self.engine, self._local, self._handle
        assert local is not None and handle is not None
        opcode = OpCode.READ if op == "read" else OpCode.WRITE
        batch = engine.allocate_batch(len(local_offsets))
        engine.submit(
            batch,
            [
                TransferRequest(opcode, local, lo, handle, to, block_size)
                for lo, to in zip(local_offsets, target_offsets, strict=True)
            ],
        )
        status = engine.wait(batch)
        if status.state is not TransferState.COMPLETED:
            raise status.errors[0]
        engine.free_batch(batch)

    def describe(self) -> dict[str, object]:
        from kvferry.version import __version__

        return {
            "backend": self.name,
            "version": __version__,
            "transport": self.transport,
            "seg_type": self.seg_type,
            "config": self.config.transfer.model_dump(mode="json"),
        }

    def close(self) -> None:
        self.engine.close()


def _location(seg_type: str) -> str:
    """Where the buffers live: DRAM is host memory, VRAM the first CUDA device.

    Raises:
        ConfigError: VRAM where torch or a CUDA device is missing.
    """
    if seg_type == "DRAM":
        return "cpu"
    if seg_type != "VRAM":
        raise ConfigError(f"--seg-type {seg_type!r} is not valid; use DRAM or VRAM")
    try:
        import torch
    except ImportError:
        raise ConfigError(
            "--seg-type VRAM needs torch with CUDA (and a GPU); torch is not installed"
        ) from None
    if not torch.cuda.is_available():
        raise ConfigError(
            "--seg-type VRAM needs a CUDA GPU; torch sees none on this machine (use DRAM)"
        )
    return "cuda:0"
