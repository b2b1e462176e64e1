"""RateLimitedLog: a peer that provokes thousands of warnings gets a few lines and a count."""

from __future__ import annotations

import logging
import time

import pytest

from kvferry.observe.logs import RateLimitedLog


def test_a_burst_then_a_count_of_what_was_held(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("kvferry.test.ratelimit")
    limited = RateLimitedLog(logger, interval=0.3, burst=3)
    with caplog.at_level(logging.WARNING, logger="kvferry.test.ratelimit"):
        for i in range(3000):
            limited.warning("refused", "refused frame %d", i)
        limited.warning("other", "another kind has its own budget")
        assert [r.getMessage() for r in caplog.records] == [
            "refused frame 0",
            "refused frame 1",
            "refused frame 2",
            "another kind has its own budget",
        ]
        assert limited.held("refused") == 2997
        time.sleep(0.35)
        limited.warning("refused", "refused frame %d", 3000)
        assert caplog.records[-1].getMessage() == (
            "refused frame 3000 (2997 more like this were not logged in the 0.3s before)"
        )
        assert limited.held("refused") == 0
