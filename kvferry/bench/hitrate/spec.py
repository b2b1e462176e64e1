"""What a hit-rate run is given, parsed: the KV geometry, capacities, tier pipelines and a
published reference curve.

Owns :class:`HitRateError`, :class:`TierSpec` and the parsers of the lab's text inputs
(``"32,8,128,bf16"``, ``"4GiB"``, ``"cpu:5000,disk"``, a reference CSV). Each bad input is a
one-line :class:`~kvferry.errors.ConfigError` naming it and what would be valid. It runs nothing.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

from kvferry.config.units import parse_size
from kvferry.errors import ConfigError, KvferryError

__all__ = [
    "DTYPE_BYTES",
    "HitRateError",
    "TierSpec",
    "kv_bytes_per_token",
    "parse_capacity",
    "parse_tiers",
    "read_reference",
]

DTYPE_BYTES = {
    "fp32": 4,
    "float32": 4,
    "fp16": 2,
    "float16": 2,
    "bf16": 2,
    "bfloat16": 2,
    "fp8": 1,
    "float8": 1,
    "int8": 1,
}


class HitRateError(KvferryError):
    """A hit-rate run cannot start (bad capacities, tiers, geometry) or went wrong."""


# -- sizes -------------------------------------------------------------------------------------


def kv_bytes_per_token(model_kv: str) -> int:
    """Bytes of K and V per token from ``"layers,kv_heads,head_dim,dtype"``.

    ``2 * layers * kv_heads * head_dim * bytes(dtype)``; e.g. Llama-3-8B is
    ``"32,8,128,bf16"`` = 131072 bytes (128 KiB) per token.

    Raises:
        ConfigError: not four fields, a field not a positive number, or an unknown dtype.
    """
    parts = [p.strip() for p in model_kv.split(",")]
    if len(parts) != 4:
        raise ConfigError(
            f"--model-kv {model_kv!r}: expected layers,kv_heads,head_dim,dtype (e.g. 32,8,128,bf16)"
        )
    dims: list[int] = []
    for name, text in zip(("layers", "kv_heads", "head_dim"), parts[:3]):
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(f"--model-kv {model_kv!r}: {name} must be a whole number >= 1")
        dims.append(value)
    dtype = parts[3].lower()
    if dtype not in DTYPE_BYTES:
        raise ConfigError(
            f"--model-kv {model_kv!r}: unknown dtype {parts[3]!r}; valid: {', '.join(DTYPE_BYTES)}"
        )
    return 2 * dims[0] * dims[1] * dims[2] * DTYPE_BYTES[dtype]


def parse_capacity(text: str, block_bytes: int | None) -> int:
    """Blocks from ``"5000"`` (blocks) or ``"4GiB"`` (bytes, which need the block size).

    Raises:
        ConfigError: not a count or size, a size without ``block_bytes``, or less than a block.
    """
    text = text.strip()
    if text.isdigit():
        blocks = int(text)
    else:
        try:
            nbytes = parse_size(text)
        except ValueError as e:
            raise ConfigError(
                f"capacity {text!r} is neither a block count (5000) nor a size (4GiB): {e}"
            ) from e
        if block_bytes is None:
            raise ConfigError(
                f"capacity {text!r} is a size; give the KV geometry (--kv-bytes-per-token or "
                "--model-kv) so it can be turned into blocks, or give blocks"
            )
        blocks = nbytes // block_bytes
    if blocks < 1:
        raise ConfigError(f"capacity {text!r} holds no block; give at least 1 block")
    return blocks


@dataclass(frozen=True)
class TierSpec:
    """One simulated tier: a name (for the report) and its capacity in blocks (None: as large
    as the trace needs; only the last tier may be so)."""

    name: str
    capacity_blocks: int | None


def parse_tiers(text: str, block_bytes: int | None) -> list[TierSpec]:
    """``"cpu:5000,disk:50000"`` (capacities as for :func:`parse_capacity`); the last tier may
    leave its capacity out (``"cpu:5000,disk"``): unbounded, or searched by capacity advice.

    Raises:
        ConfigError: an empty or repeated name, a bad capacity, or a missing one before the last.
    """
    specs: list[TierSpec] = []
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"--tiers {text!r}: expected NAME:CAPACITY,... e.g. cpu:5000,disk:50000")
    for i, item in enumerate(items):
        name, sep, cap = item.partition(":")
        name = name.strip()
        if not name:
            raise ConfigError(f"--tiers {text!r}: a tier without a name in {item!r}")
        if any(s.name == name for s in specs):
            raise ConfigError(f"--tiers {text!r}: tier {name!r} named twice")
        if not sep or not cap.strip():
            if i != len(items) - 1:
                raise ConfigError(
                    f"--tiers {text!r}: tier {name!r} needs a capacity (only the last may omit it)"
                )
            specs.append(TierSpec(name, None))
        else:
            specs.append(TierSpec(name, parse_capacity(cap, block_bytes)))
    return specs


def read_reference(path: str, block_tokens: int) -> list[tuple[float, float]]:
    """A published curve from CSV: a ``hit_rate`` column and ``capacity_blocks`` or
    ``capacity_tokens`` (turned into blocks of ``block_tokens``).

    Raises:
        HitRateError: unreadable, or without those columns.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise HitRateError(f"cannot read reference curve {path!r}: {e.strerror or e}") from e
    out: list[tuple[float, float]] = []
    for i, row in enumerate(rows, start=2):
        try:
            rate = float(row["hit_rate"])
            if row.get("capacity_blocks"):
                cap = float(row["capacity_blocks"])
            else:
                cap = float(row["capacity_tokens"]) / block_tokens
        except (KeyError, TypeError, ValueError) as e:
            raise HitRateError(
                f"{path}:{i}: a reference curve needs hit_rate and capacity_blocks or "
                f"capacity_tokens columns ({e!r})"
            ) from e
        out.append((cap, rate))
    if not out:
        raise HitRateError(f"reference curve {path!r} has no rows")
    return sorted(out)
