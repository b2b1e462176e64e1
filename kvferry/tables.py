"""Tables that fit the terminal: the one rule every table kvferry prints follows.

Owns :class:`FitTable`, a rich renderable that decides its layout when it is rendered, at the
width it is given, so that no value is ever cut:

- A column of values (numbers, names, keys: ``text=False``, the default) is never narrower than
  its widest value, so a value never wraps or ends in "…". Its header may wrap at spaces.
- A column of prose (``text=True``) wraps at spaces and folds a word longer than the column;
  no character is lost either way.
- When the columns do not fit, the columns with the highest ``drop`` are left out first (0:
  never), and a note under the table names them and says how to see them (``--wide``).
- When even the columns that are never dropped do not fit, each row is printed as a block of
  ``header  value`` lines: a narrower layout that shows every column.
- ``wide=True`` keeps every column at its natural width, however wide; print it with
  :func:`print_table`, which then does not crop the lines at the console's width.

It must not compute or format values: callers hand it the strings they print today.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

PIPED_WIDTH = 160
"""Width of output that goes to a file or a pipe (logs, READMEs): wide enough for every column
of kvferry's tables, so what is captured has them all."""

WIDE_HINT = "--wide shows every column"

TEXT_MIN_WIDTHS = (20, 8)
"""How narrow a prose column may get (or its longest word, if shorter): first the comfortable
width, with columns dropped as needed; then, before a row becomes a block, the squeezed one."""

Justify = Literal["left", "center", "right"]


@dataclass(frozen=True)
class _Column:
    header: str
    text: bool
    drop: int
    justify: Justify
    style: str | None


def _width(cell: Text) -> int:
    return max((cell_len(line) for line in cell.plain.split("\n")), default=0)


def _longest_word(cell: Text) -> int:
    return max((cell_len(word) for word in cell.plain.split()), default=0)


def add_wide_option(parser: argparse._ActionsContainer) -> None:
    """Add ``--wide``: print every column of the command's tables, however wide."""
    parser.add_argument(
        "--wide",
        action="store_true",
        help="print every table column even when the terminal is narrower (default: leave "
        "out the least important columns, named under the table, so no number is cut)",
    )


def output_console() -> Console:
    """The console a command prints its results on: the terminal's width, or
    :data:`PIPED_WIDTH` when stdout is a file or a pipe."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = PIPED_WIDTH
    return console


class FitTable:
    """A table whose columns are chosen at render time to fit the width (module docstring).

    Args:
        title: shown above the table.
        wide: keep every column at its natural width (print with :func:`print_table`).
        hint: what the note under a table with dropped columns says to see them.
        table_options: passed to :class:`rich.table.Table` (``show_header``,
            ``title_justify``, ``show_lines``, ...).
    """

    def __init__(
        self,
        title: str | None = None,
        *,
        wide: bool = False,
        hint: str = WIDE_HINT,
        **table_options: Any,
    ) -> None:
        self.title = title
        self.wide = wide
        self.hint = hint
        self.table_options = table_options
        self.columns: list[_Column] = []
        self.rows: list[tuple[list[Text], str | None]] = []

    def add_column(
        self,
        header: str,
        *,
        text: bool = False,
        drop: int = 0,
        justify: Justify | None = None,
        style: str | None = None,
    ) -> None:
        """Add a column.

        Args:
            header: the column's header.
            text: the cells are prose that may wrap; otherwise every cell stays whole on one
                line (numbers, names).
            drop: 0: always shown; otherwise, when the table is too wide, the columns with
                the highest ``drop`` are left out first (the rightmost of equals first).
            justify: default right for values, left for prose.
            style: rich style of the column's cells.
        """
        if justify is None:
            justify = "left" if text else "right"
        self.columns.append(_Column(header, text, drop, justify, style))

    def add_row(self, *cells: str | Text, style: str | None = None) -> None:
        """Add a row; a ``str`` cell is printed as written (no rich markup)."""
        if len(cells) != len(self.columns):
            raise ValueError(f"a row of {len(cells)} cells in a table of {len(self.columns)}")
        row = [c if isinstance(c, Text) else Text(c) for c in cells]
        self.rows.append((row, style))

    # -- layout ---------------------------------------------------------------------------------
    def _natural(self, i: int) -> int:
        header = cell_len(self.columns[i].header)
        return max([header, *(_width(row[i]) for row, _ in self.rows)])

    def _minimum(self, i: int, text_min: int) -> int:
        column = self.columns[i]
        header_word = _longest_word(Text(column.header))
        if column.text:
            longest = max([1, *(_longest_word(row[i]) for row, _ in self.rows)])
            return max(header_word, min(longest, text_min))
        return max([header_word, 1, *(_width(row[i]) for row, _ in self.rows)])

    def _overhead(self, console: Console, options: ConsoleOptions, count: int) -> int:
        """Borders and padding of a table of ``count`` columns, measured on rich's own table."""
        probe = self._table(list(range(count)), [1] * count, rows=False)
        return Measurement.get(console, options.update_width(1 << 20), probe).maximum - count

    def layout(
        self, console: Console, options: ConsoleOptions
    ) -> tuple[list[int], list[int]] | None:
        """The columns kept and their widths for ``options.max_width``; None when even the
        columns never dropped do not fit (the row-per-block layout)."""
        n = len(self.columns)
        if self.wide:
            return list(range(n)), [self._natural(i) for i in range(n)]
        overhead = [self._overhead(console, options, count) for count in range(n + 1)]
        for text_min in TEXT_MIN_WIDTHS:
            minimum = [self._minimum(i, text_min) for i in range(n)]
            kept = list(range(n))
            spare = options.max_width - sum(minimum) - overhead[n]
            while spare < 0:
                droppable = [i for i in kept if self.columns[i].drop > 0]
                if not droppable:
                    break
                drop = max(droppable, key=lambda i: (self.columns[i].drop, i))
                kept.remove(drop)
                spare += minimum[drop] + overhead[len(kept) + 1] - overhead[len(kept)]
            if spare >= 0:
                return kept, self._widen(kept, minimum, spare)
        return None

    def _widen(self, kept: list[int], minimum: list[int], spare: int) -> list[int]:
        """The widths of ``kept``: their minimum, with ``spare`` columns given out."""
        widths = {i: minimum[i] for i in kept}
        # Prose first (it wraps worst), then headers that would otherwise wrap.
        for i in sorted(kept, key=lambda i: not self.columns[i].text):
            grow = min(spare, self._natural(i) - widths[i])
            if grow > 0:
                widths[i] += grow
                spare -= grow
        return [widths[i] for i in kept]

    def dropped(self, kept: Iterable[int]) -> list[str]:
        """Headers of the columns not in ``kept``."""
        keep = set(kept)
        return [c.header for i, c in enumerate(self.columns) if i not in keep]

    def _table(self, kept: Sequence[int], widths: Sequence[int], *, rows: bool = True) -> Table:
        table = Table(title=self.title, **self.table_options)
        for i, width in zip(kept, widths):
            c = self.columns[i]
            table.add_column(
                c.header, justify=c.justify, style=c.style, width=width, overflow="fold"
            )
        if rows:
            for row, style in self.rows:
                table.add_row(*(row[i] for i in kept), style=style)
        return table

    def _blocks(self) -> Table:
        """Each row as a block of ``header  value`` lines (for consoles too narrow for a row)."""
        options = {k: v for k, v in self.table_options.items() if k != "show_header"}
        table = Table(title=self.title, show_header=False, **options)
        table.add_column(overflow="fold")
        table.add_column(overflow="fold")
        for r, (row, style) in enumerate(self.rows):
            for i, (column, cell) in enumerate(zip(self.columns, row)):
                last = i == len(row) - 1 and r < len(self.rows) - 1
                table.add_row(column.header, cell, style=style, end_section=last)
        return table

    # -- rich protocol --------------------------------------------------------------------------
    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        fit = self.layout(console, options)
        if fit is None:
            yield self._blocks()
            return
        kept, widths = fit
        table = self._table(kept, widths)
        if self.wide:
            # Rendered at its own width: rich would otherwise squeeze it back to the console's.
            full = Measurement.get(console, options.update_width(1 << 20), table).maximum
            yield from console.render(table, options.update_width(full))
            return
        yield table
        dropped = self.dropped(kept)
        if dropped:
            yield Text(
                f"({len(dropped)} column(s) left out to fit {options.max_width} columns: "
                f"{', '.join(dropped)}; {self.hint})",
                style="dim",
            )

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        n = len(self.columns)
        natural = sum(self._natural(i) for i in range(n)) + self._overhead(console, options, n)
        fit = self.layout(console, options)
        if fit is None:
            return Measurement(min(natural, options.max_width), natural)
        kept, widths = fit
        fitted = sum(widths) + self._overhead(console, options, len(kept))
        return Measurement(fitted, natural)


def print_table(console: Console, table: FitTable) -> None:
    """Print ``table``; a ``wide`` one is not cropped at the console's width."""
    console.print(table, crop=not table.wide)
