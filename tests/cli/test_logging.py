"""The CLI's log handler never blocks a thread on a stderr pipe that nobody reads."""

from __future__ import annotations

import io
import logging
import os
import time

import pytest

from kvferry.cli import main as cli_main


def test_a_full_stderr_pipe_drops_lines_instead_of_blocking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"x" * 65536)
    except BlockingIOError:
        pass  # the pipe is full
    os.set_blocking(write_end, True)  # as a real stderr is: a plain write would block for good
    stream = io.TextIOWrapper(io.FileIO(write_end, "w", closefd=False), write_through=True)
    monkeypatch.setattr("sys.stderr", stream)
    handler = cli_main._StderrHandler()
    record = logging.LogRecord("kvferry.t", logging.WARNING, __file__, 1, "refused %d", (1,), None)
    started = time.monotonic()
    handler.emit(record)
    handler.emit(record)
    assert time.monotonic() - started < 2.0, "returned instead of waiting for a reader"
    assert handler.dropped == 2
    while True:  # a reader drains the pipe: the next line goes out and says what was lost
        os.set_blocking(read_end, False)
        try:
            if not os.read(read_end, 1 << 20):
                break
        except BlockingIOError:
            break
    handler.emit(record)
    os.set_blocking(read_end, True)
    assert handler.dropped == 0
    assert b"refused 1 (2 earlier log lines dropped: stderr was not read)" in os.read(
        read_end, 4096
    )
    os.close(read_end)
    os.close(write_end)
