"""The check every printed table must pass (see :mod:`kvferry.tables`): no value cut.

Tests render a command's output on a console of a fixed width and hand the text here with the
values the table was built from.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

from rich.console import Console

from kvferry.tables import FitTable, print_table

__all__ = [
    "assert_fits",
    "assert_values_whole",
    "dropped_columns",
    "narrow_console",
    "printed",
    "table_cells",
]


def narrow_console(width: int) -> Console:
    """A console of ``width`` columns that writes plain text into a buffer (see :func:`printed`)."""
    return Console(file=io.StringIO(), width=width, color_system=None, highlight=False)


def printed(console: Console) -> str:
    """What was printed on a :func:`narrow_console`."""
    file = console.file
    if not isinstance(file, io.StringIO):
        raise TypeError("printed() reads what a narrow_console() printed")
    return file.getvalue()


def table_cells(text: str) -> list[str]:
    """Every cell of the tables in ``text``, one line of it each, stripped."""
    cells = []
    for line in text.splitlines():
        cells += [part.strip() for part in re.split("[│┃]", line)[1:-1]]
    return cells


def dropped_columns(text: str) -> list[str]:
    """The headers a table's note says were left out (none: an empty list)."""
    note = " ".join(text.split())
    found = re.findall(r"left out to fit \d+ columns: (.*?); ", note)
    return [h for names in found for h in names.split(", ")]


def assert_values_whole(
    text: str, width: int, headers: Sequence[str], rows: Sequence[Sequence[str]]
) -> list[str]:
    """Assert no line is wider than ``width``, nothing ends in "…", and every value of
    ``rows`` (a cell under each of ``headers``, "" to skip one) of a column not named as
    left out is printed whole, as one cell.

    Returns:
        The headers left out.
    """
    lines = text.splitlines()
    assert "…" not in text, text
    assert max(len(line) for line in lines) <= width, text
    dropped = dropped_columns(text)
    cells = set(table_cells(text))
    for row in rows:
        for header, value in zip(headers, row, strict=True):
            if value and header not in dropped:
                assert value in cells, f"{header}: {value!r} is not printed whole:\n{text}"
    return dropped


def assert_fits(table: FitTable, width: int) -> tuple[str, list[str]]:
    """Print ``table`` on a :func:`narrow_console` of ``width`` and check it with
    :func:`assert_values_whole` against its own cells (those of value columns: prose may wrap).

    Returns:
        What was printed and the headers left out.
    """
    console = narrow_console(width)
    print_table(console, table)
    text = printed(console)
    headers = [c.header for c in table.columns]
    rows = [
        [cell.plain if not c.text else "" for c, cell in zip(table.columns, cells, strict=True)]
        for cells, _ in table.rows
    ]
    return text, assert_values_whole(text, width, headers, rows)
