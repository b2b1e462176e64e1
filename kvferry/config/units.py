"""Size and duration values that users write as text ("64KiB", "1GB", "500ms").

Owns parsing and formatting only; it knows nothing about which key a value belongs to (the
loader adds the key to the error message).
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}

_DURATION_UNITS: dict[str, float] = {
    "": 1.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "ns": 1e-9,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
}

MAX_SIZE = (1 << 63) - 1
"""The largest size accepted (8 EiB less a byte): the largest file offset, far above any memory."""

MAX_SECONDS = 1e9
"""The longest duration accepted (about 31.7 years): finite, and below ``threading.TIMEOUT_MAX``
so that every wait kvferry does with it is valid. Text like "1e999" overflows a float to
infinity, which would otherwise slip through as "never" (a lease that never expires)."""

_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Parse a byte size: an int, or text like ``"4096"``, ``"64KiB"``, ``"1.5GB"``, ``"2M"``.

    Binary suffixes (KiB, MiB, GiB, TiB, and bare K/M/G/T) are powers of 1024; decimal ones (KB,
    MB, GB, TB) are powers of 1000, as in the GB/s of the benchmarks.

    Raises:
        ValueError: the value is not a whole number of bytes in [0, MAX_SIZE].
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 65536 or '64KiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        _size_in_range(value, value)
        return value
    if isinstance(value, float):
        _size_in_range(value, value)
        if value < 0 or value != int(value):
            raise ValueError(f"a size must be a whole number of bytes, got {value}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a size like 65536 or '64KiB', got {value!r}")
    match = _NUMBER_UNIT.match(value)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(
            f"expected a size like 65536, '64KiB', '1MiB' or '4GB', got {value!r} "
            f"(units: {', '.join(u for u in _SIZE_UNITS if u)})"
        )
    number = _size_in_range(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()], value)
    if number != int(number):
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(number)


def _size_in_range(number: float, value: object) -> float:
    if math.isnan(number):
        raise ValueError(f"a size must be a number of bytes, got {value!r} (not a number)")
    if number > MAX_SIZE:  # also infinity, from text like "1e400"
        raise ValueError(f"{value!r} is too large: a size is at most {MAX_SIZE} bytes (8EiB)")
    return number


def parse_duration(value: object) -> float:
    """Parse a duration in seconds: a number, or text like ``"5s"``, ``"500ms"``, ``"50us"``.

    Raises:
        ValueError: the value is not a duration in [0, MAX_SECONDS] seconds.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 5, '5s' or '500ms', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value}")
        return _duration_in_range(float(value), value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration like 5, '5s' or '500ms', got {value!r}")
    match = _NUMBER_UNIT.match(value)
    if match is None or match.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(
            f"expected a duration like 5, '5s', '500ms' or '50us', got {value!r} "
            f"(units: {', '.join(u for u in _DURATION_UNITS if u)})"
        )
    return _duration_in_range(
        float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()], value
    )


def _duration_in_range(seconds: float, value: object) -> float:
    if math.isnan(seconds):
        raise ValueError(f"a duration must be a number of seconds, got {value!r} (not a number)")
    if seconds > MAX_SECONDS:  # also infinity, from text like "1e999s"
        raise ValueError(
            f"{value!r} is too long: a duration is at most {MAX_SECONDS:.0f} seconds "
            "(about 31 years)"
        )
    return seconds


def format_size(n: int) -> str:
    """Format bytes with the largest binary unit that divides them exactly (65536 -> '64KiB')."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def format_size_approx(n: int) -> str:
    """Bytes in the largest binary unit they reach, to 4 significant digits, for messages
    ('22.53GiB', '1024TiB'); not meant to be parsed back exactly."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:.4g}{unit}"
    return f"{n}B"


def format_duration(seconds: float) -> str:
    """Format seconds compactly ('5s', '500ms', '50us')."""
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        scaled = seconds / factor
        if seconds >= factor and abs(scaled - round(scaled)) < 1e-9:
            return f"{round(scaled)}{unit}"
    return f"{seconds:g}s"


ByteSize = Annotated[
    int, BeforeValidator(parse_size), PlainSerializer(format_size, return_type=str)
]
"""A byte count; accepts ints and suffixed text, serialises back to the shortest exact text."""

Seconds = Annotated[
    float, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)
]
"""A duration in seconds; accepts numbers and suffixed text ("500ms")."""
