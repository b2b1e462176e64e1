"""Moving whole KV blocks between vLLM's paged KV cache and a host staging buffer.

A block's bytes in the store are every layer's page of that block, one after another (layer
order of the connector). vLLM's KV cache may live on a GPU or, with the CPU build, in host memory;
these helpers work on both: on a GPU the gather and scatter run on the device and the staging
buffer crosses the bus in one copy each way, in pinned memory (a pageable copy runs at a third of
the speed). Imports torch only (no vLLM), so the GPU path is tested without vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class KvLayer:
    """One attention layer's KV cache, indexed by block id on its first dimension.

    Attributes:
        name: vLLM's layer name.
        tensor: the layer's KV cache (blocks first).
        offset: where the layer's page starts in a store block.
        size: bytes of one block of this layer.
    """

    name: str
    tensor: torch.Tensor
    offset: int
    size: int


def _rows(staging: torch.Tensor, layer: KvLayer) -> torch.Tensor:
    """The part of each staged block that belongs to ``layer``, as that layer's blocks."""
    t = layer.tensor
    part = staging[:, layer.offset : layer.offset + layer.size]
    return part.view(t.dtype).view((staging.shape[0], *t.shape[1:]))


def _device(layers: Sequence[KvLayer]) -> torch.device:
    return layers[0].tensor.device if layers else torch.device("cpu")


def host_staging(n: int, block_bytes: int, layers: Sequence[KvLayer]) -> torch.Tensor:
    """An uninitialised ``(n, block_bytes)`` uint8 host buffer, pinned when the cache is on a
    GPU."""
    pin = _device(layers).type == "cuda"
    return torch.empty((n, block_bytes), dtype=torch.uint8, pin_memory=pin)


def gather_blocks(
    layers: Sequence[KvLayer], block_ids: Sequence[int], staging: torch.Tensor
) -> None:
    """Copy blocks ``block_ids`` of every layer into host ``staging`` (one row per block)."""
    device = _device(layers)
    ids = torch.tensor(list(block_ids), dtype=torch.long, device=device)
    if device.type == "cpu":
        for layer in layers:
            _rows(staging, layer).copy_(layer.tensor[ids])
        return
    on_device = torch.empty(staging.shape, dtype=torch.uint8, device=device)
    for layer in layers:
        _rows(on_device, layer).copy_(layer.tensor[ids])
    staging.copy_(on_device)  # one device -> host copy; synchronous


def scatter_blocks(layers: Sequence[KvLayer], block_ids: Sequence[int], staging: Any) -> None:
    """Copy host ``staging`` rows into blocks ``block_ids`` of every layer."""
    device = _device(layers)
    ids = torch.tensor(list(block_ids), dtype=torch.long, device=device)
    rows = staging if device.type == "cpu" else staging.to(device)  # one host -> device copy
    for layer in layers:
        layer.tensor[ids] = _rows(rows, layer)
