"""Size and duration text: parsing, errors, and formatting that parses back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvferry.config.units import (
    MAX_SECONDS,
    MAX_SIZE,
    format_duration,
    format_size,
    format_size_approx,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        (0, 0),
        (4096.0, 4096),
        ("4096", 4096),
        (" 4096 ", 4096),
        ("512B", 512),
        ("64KiB", 65536),
        ("64kib", 65536),
        ("64K", 65536),
        ("64KB", 64_000),
        ("2M", 2 * 1024**2),
        ("1MiB", 1024**2),
        ("1.5GiB", 3 * 1024**3 // 2),
        ("4GB", 4 * 1000**3),
        ("1TiB", 1024**4),
        ("0.5KiB", 512),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (-1, "negative"),
        (1.5, "whole number"),
        (True, "expected a size"),
        (None, "expected a size"),
        ("lots", "expected a size"),
        ("64XiB", "units:"),
        ("0.3B", "not a whole number"),
        ("-5KiB", "expected a size"),
        ("1e400", "too large"),  # float overflow to inf must not leak out as OverflowError
        (float("inf"), "too large"),
        (float("nan"), "not a number"),
        ("1e30", "too large"),
        (1 << 64, "too large"),
    ],
)
def test_parse_size_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_size(value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (5, 5.0),
        (0.25, 0.25),
        ("5", 5.0),
        ("5s", 5.0),
        ("500ms", 0.5),
        ("50us", 50e-6),
        ("100ns", 100e-9),
        ("2m", 120.0),
        ("2min", 120.0),
        ("1h", 3600.0),
        ("1.5S", 1.5),
    ],
)
def test_parse_duration(text: object, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (-1, "negative"),
        (False, "expected a duration"),
        (None, "expected a duration"),
        ("soon", "expected a duration"),
        ("5 parsecs", "units:"),
        ("1e999s", "too long"),  # float overflow to inf: refused like 'inf' itself
        ("1e999", "too long"),
        (float("inf"), "too long"),
        (float("nan"), "not a number"),
        ("inf", "expected a duration"),
        (2e9, "too long"),
    ],
)
def test_parse_duration_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_duration(value)


def test_the_largest_values_are_accepted() -> None:
    assert parse_size(MAX_SIZE) == MAX_SIZE
    assert parse_duration(MAX_SECONDS) == MAX_SECONDS
    assert parse_duration("1000000000s") == 1e9


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0"), (1000, "1000"), (65536, "64KiB"), (131072, "128KiB"), (3 * 1024**3, "3GiB")],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_round_trips(n: int) -> None:
    assert parse_size(format_size(n)) == n


@pytest.mark.parametrize(
    ("seconds", "text"), [(5.0, "5s"), (0.5, "500ms"), (50e-6, "50us"), (0.0, "0s")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0.0, 1e-9, 50e-6, 0.001, 0.25, 5.0, 90.0, 3600.0])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0B"), (1000, "1000B"), (1536, "1.5KiB"), (1 << 50, "1024TiB"), (5 * 10**14, "454.7TiB")],
)
def test_format_size_approx(n: int, text: str) -> None:
    assert format_size_approx(n) == text
