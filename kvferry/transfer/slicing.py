"""How a transfer request is cut into slices (a pure function, no I/O).

A request of ``length`` bytes becomes slices of ``slice_size`` bytes. A tail shorter than
``fragment_limit = slice_size // fragment_ratio`` is merged into the previous slice, never sent
alone (Mooncake's MC_SLICE_SIZE / MC_FRAGMENT_RATIO rule): a tiny last frame costs a whole round of
per-frame overhead for almost no bytes. So every slice is at least ``fragment_limit`` bytes unless
the whole request is shorter, and at most ``slice_size + fragment_limit - 1`` bytes.
"""

from __future__ import annotations


def plan_slices(length: int, slice_size: int, fragment_ratio: int) -> list[tuple[int, int]]:
    """Cut ``length`` bytes into ``(offset, size)`` slices.

    Args:
        length: bytes of the request (> 0).
        slice_size: nominal bytes per slice (> 0).
        fragment_ratio: tails under ``slice_size // fragment_ratio`` bytes join the previous slice.

    Returns:
        Slices in order; they tile ``[0, length)`` exactly.

    Raises:
        ValueError: a non-positive length, slice size or ratio.
    """
    if length <= 0 or slice_size <= 0 or fragment_ratio <= 0:
        raise ValueError(
            f"length, slice_size and fragment_ratio must be positive, got "
            f"{length}, {slice_size}, {fragment_ratio}"
        )
    fragment_limit = max(1, slice_size // fragment_ratio)
    full, tail = divmod(length, slice_size)
    slices = [(i * slice_size, slice_size) for i in range(full)]
    if tail:
        if slices and tail < fragment_limit:
            offset, size = slices[-1]
            slices[-1] = (offset, size + tail)
        else:
            slices.append((full * slice_size, tail))
    return slices


def count_slices(length: int, slice_size: int, fragment_ratio: int) -> int:
    """``len(plan_slices(...))`` without building the list (hot path)."""
    full, tail = divmod(length, slice_size)
    if full == 0:
        return 1
    return full + (1 if tail >= max(1, slice_size // fragment_ratio) else 0)
