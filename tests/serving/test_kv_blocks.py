"""Whole KV blocks between a paged KV cache and host staging (kvferry/serving/vllm/kv_blocks.py), on
the CPU and, where one exists, on a GPU (the vLLM connector's data path on either)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvferry.serving.vllm.kv_blocks import (  # noqa: E402
    KvLayer,
    gather_blocks,
    host_staging,
    scatter_blocks,
)

SHAPES = [  # vLLM-like: (blocks, 2 for K and V, block size, kv heads, head dim)
    ((12, 2, 16, 2, 8), torch.float16),
    ((12, 2, 16, 1, 16), torch.float32),
    ((12, 2, 16, 4, 4), torch.bfloat16),
]


@pytest.fixture(params=["cpu", "cuda"])
def device(request: pytest.FixtureRequest) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here (this case runs on a GPU machine)")
    return str(request.param)


def make_layers(device: str, seed: int) -> tuple[list[KvLayer], int]:
    gen = torch.Generator().manual_seed(seed)
    layers, offset = [], 0
    for i, (shape, dtype) in enumerate(SHAPES):
        t = torch.randn(shape, generator=gen).to(dtype).to(device)
        size = t[0].numel() * t.element_size()
        layers.append(KvLayer(f"layer.{i}", t, offset, size))
        offset += size
    return layers, offset


def block_bytes(layers: list[KvLayer], block: int) -> bytes:
    return b"".join(
        layer.tensor[block].contiguous().cpu().view(torch.uint8).numpy().tobytes()
        for layer in layers
    )


def test_gather_then_scatter_moves_every_byte(device: str) -> None:
    src, bb = make_layers(device, 1)
    ids = [3, 0, 11, 7]
    staging = host_staging(len(ids), bb, src)
    assert staging.device.type == "cpu"
    assert staging.is_pinned() == (device == "cuda")
    gather_blocks(src, ids, staging)
    for row, block in enumerate(ids):
        assert staging[row].numpy().tobytes() == block_bytes(src, block), (row, block)
    dst, _ = make_layers(device, 2)
    untouched = block_bytes(dst, 4)
    targets = [1, 5, 2, 9]
    scatter_blocks(dst, targets, staging)
    for block, target in zip(ids, targets):
        assert block_bytes(dst, target) == block_bytes(src, block), (block, target)
    assert block_bytes(dst, 4) == untouched


def test_scatter_takes_a_prefix_of_the_staging(device: str) -> None:
    src, bb = make_layers(device, 3)
    staging = host_staging(3, bb, src)
    gather_blocks(src, [6, 8, 10], staging)
    dst, _ = make_layers(device, 4)
    last = block_bytes(dst, 2)
    scatter_blocks(dst, [0, 1], staging[:2])  # the connector loads the good prefix only
    assert block_bytes(dst, 0) == block_bytes(src, 6)
    assert block_bytes(dst, 1) == block_bytes(src, 8)
    assert block_bytes(dst, 2) == last
