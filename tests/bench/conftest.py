"""Shared fixtures of the bench tests."""

from __future__ import annotations

import pytest

from kvferry.bench.traces import Trace, read_trace


@pytest.fixture(scope="session")
def mooncake() -> Trace:
    """The bundled Mooncake FAST'25 synthetic trace (read once)."""
    return read_trace("mooncake-synthetic")
