"""FitTable: no value is ever cut, whatever the console's width; columns drop in order and are
named; --wide keeps them all; a console narrower than one row gets one block per row."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from kvferry.tables import FitTable, print_table

HEADERS = ("Phase", "Op", "Ops", "Ops/s", "Blocks/s", "GB/s", "Mean (us)", "P99 (us)")
DROP = {"Blocks/s": 3, "Mean (us)": 2, "Ops": 1}
ROWS = (
    ("fill", "put", "1234567", "223,456", "11,634,567", "24.5123", "24.5", "456.7"),
    ("read_perf", "get", "7654321", "1,223,456", "158,024,576", "124.5123", "1,024.5", "9,456.7"),
)


def store_like(wide: bool = False) -> FitTable:
    table = FitTable("a store bench", wide=wide)
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i < 2 else "right", drop=DROP.get(header, 0))
    for row in ROWS:
        table.add_row(*row)
    return table


def render(table: FitTable, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    print_table(console, table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def cells(text: str) -> set[str]:
    """Every cell of a rendered table, as printed on one line."""
    out = set()
    for line in text.splitlines():
        out.update(part.strip() for part in line.replace("┃", "│").split("│"))
    return out


@pytest.mark.parametrize("width", [200, 100, 80, 60])
def test_values_are_whole_and_dropped_columns_are_named(width: int) -> None:
    text = render(store_like(), width)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    printed = cells(text)
    dropped = [h for h in HEADERS if all(row[HEADERS.index(h)] not in printed for row in ROWS)]
    for i, header in enumerate(HEADERS):
        if header not in dropped:
            assert {row[i] for row in ROWS} <= printed, header
    if dropped:
        note = " ".join(text.split())
        assert f"left out to fit {width} columns: {', '.join(dropped)}" in note
        assert "--wide shows every column" in note
    else:
        assert "left out" not in text


def test_the_highest_drop_goes_first() -> None:
    # 70 columns hold all but the two least important ones
    table = store_like()
    text = " ".join(render(table, 70).split())
    assert "left out to fit 70 columns: Blocks/s, Mean (us);" in text
    assert "1234567" in text  # Ops (drop 1) is still there


def test_wide_keeps_every_column_past_the_console_width() -> None:
    text = render(store_like(wide=True), 60)
    assert "…" not in text and "left out" not in text
    assert max(len(line) for line in text.splitlines()) > 60  # not cropped, not squeezed
    for row in ROWS:
        line = next(line for line in text.splitlines() if f" {row[0]} " in line)
        assert [c.strip() for c in line.split("│") if c.strip()] == list(row)


def test_a_console_narrower_than_one_row_prints_a_block_per_row() -> None:
    text = render(store_like(), 30)
    assert "…" not in text and "left out" not in text
    printed = cells(text)
    for row in ROWS:
        assert set(row) <= printed
    assert "Blocks/s" in printed  # every column, each value beside its header


def test_prose_wraps_without_losing_characters() -> None:
    table = FitTable("config")
    table.add_column("Key", justify="left")
    table.add_column("Value", text=True)
    value = "a long value with many words " * 4 + "/and/a/path/longer/than/the/column"
    table.add_row("transfer.slice_size", value)
    text = render(table, 50)
    assert "transfer.slice_size" in text and "…" not in text
    joined = "".join(
        line.split("│")[2].strip() for line in text.splitlines() if line.count("│") == 3
    )
    assert joined.replace(" ", "") == value.replace(" ", "")


def test_cells_are_printed_as_written_not_as_markup() -> None:
    table = FitTable()
    table.add_column("value", justify="left")
    table.add_row("[red]x[/red]")
    assert "[red]x[/red]" in render(table, 80)


def test_a_row_of_the_wrong_length_is_refused() -> None:
    table = FitTable()
    table.add_column("a")
    with pytest.raises(ValueError, match="a row of 2 cells in a table of 1"):
        table.add_row("1", "2")
