"""The report as Markdown: the same content as the HTML page, for a pull request or a wiki.

Owns :func:`render_markdown` and :func:`write_markdown`. Figures are written as PNG files next
to the ``.md`` (``<stem>_files/NAME.png``) and linked relatively, so the directory moves as one.
Headings carry an explicit anchor (``<a id="...">``) that the table of contents links to.
Strings from results are escaped: ``<``, ``>`` and ``&`` as HTML entities (Markdown passes HTML
through) and the characters Markdown gives meaning (``\\ ` * _ [ ] |``) with a backslash.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from kvferry.report import fmt
from kvferry.report.model import Finding, ReportDoc, ReportError, Section, Table

__all__ = ["figures_dir", "render_markdown", "write_markdown"]

_SPECIAL = re.compile(r"([\\`*_\[\]|])")


def _m(text: object) -> str:
    """One line of text from a result, safe in Markdown (module docstring)."""
    one_line = " ".join(str(text).split())
    return _SPECIAL.sub(r"\\\1", html.escape(one_line, quote=False))


def figures_dir(path: str | os.PathLike[str]) -> Path:
    """Where :func:`write_markdown` puts the figures of the report at ``path``."""
    p = Path(path)
    return p.with_name(f"{p.stem}_files")


def _table(t: Table) -> list[str]:
    numeric = list(t.numeric) + [False] * (len(t.columns) - len(t.numeric))
    out = []
    if t.title:
        out.append(f"**{_m(t.title)}**")
        out.append("")
    out.append("| " + " | ".join(_m(c) for c in t.columns) + " |")
    out.append("|" + "|".join("---:" if n else "---" for n in numeric[: len(t.columns)]) + "|")
    for row in t.rows:
        cells = [_m(c) for c in row] + [""] * (len(t.columns) - len(row))
        out.append("| " + " | ".join(cells) + " |")
    if t.note:
        out.append("")
        out.append(f"*{_m(t.note)}*")
    out.append("")
    return out


def _finding(f: Finding) -> list[str]:
    out = [
        f"> **{f.severity.upper()}: {_m(f.title)}**",
        ">",
        f"> {_m(f.detail)}",
        ">",
        f"> Evidence: {_m(f.evidence)}",
    ]
    if f.recommendation:
        out += [">", f"> Try: {_m(f.recommendation)}"]
    if f.candidates:
        out += [">", "> Measure before changing (`kvferry advise --verify` keeps what helped):"]
        out += [f"> - {_m(c.label)}: `{' '.join(c.command.split())}`" for c in f.candidates]
    out.append("")
    return out


def _section(s: Section, depth: int, images: str) -> list[str]:
    level = "#" * min(depth + 2, 6)
    out = [f'<a id="{html.escape(s.anchor, quote=True)}"></a>', "", f"{level} {_m(s.title)}", ""]
    if s.intro:
        out += [_m(s.intro), ""]
    for f in s.findings:
        out += _finding(f)
    for t in s.tables:
        out += _table(t)
    for fig in s.figures:
        out.append(f"![{_m(fig.title)}]({quote(images)}/{quote(fig.name)}.png)")
        out.append("")
        out.append(f"*{_m(fig.title)}" + (f". {_m(fig.caption)}*" if fig.caption else "*"))
        out.append("")
    for sub in s.subsections:
        out += _section(sub, depth + 1, images)
    return out


def _toc(sections: Sequence[Section], depth: int = 0) -> list[str]:
    out = []
    for s in sections:
        out.append(f"{'   ' * depth}1. [{_m(s.title)}](#{s.anchor})")
        if depth < 1:
            out += _toc(s.subsections, depth + 1)
    return out


def _figures(sections: Sequence[Section]) -> list[tuple[str, bytes]]:
    out = []
    for s in sections:
        out += [(f.name, f.png) for f in s.figures]
        out += _figures(s.subsections)
    return out


def render_markdown(doc: ReportDoc, images: str = "figures") -> str:
    """The document as Markdown, its figures linked as ``images/NAME.png``."""
    out = [f"# {_m(doc.title)}", ""]
    meta = doc.meta or [("Generated", fmt.utc(doc.generated_at))]
    out += [f"- **{_m(k)}:** {_m(v)}" for k, v in meta]
    out.append("")
    if doc.headline:
        out += ["| Headline | Value |", "|---|---:|"]
        out += [f"| {_m(k)} | {_m(v)} |" for k, v in doc.headline]
        out.append("")
    out += ["**Contents**", "", *_toc(doc.sections), ""]
    for s in doc.sections:
        out += _section(s, 0, images)
    out.append(
        f"*Built {fmt.utc(doc.generated_at)} from {len(doc.sources)} result file(s); every "
        "number here is read from them (see Sources).*"
    )
    return "\n".join(out) + "\n"


def write_markdown(doc: ReportDoc, path: str | os.PathLike[str]) -> None:
    """Write the report to ``path`` and its figures to ``<stem>_files/`` beside it.

    Raises:
        ReportError: a file cannot be written.
    """
    target = Path(path)
    folder = figures_dir(target)
    try:
        figures = _figures(doc.sections)
        if figures:
            folder.mkdir(parents=True, exist_ok=True)
            for name, png in figures:
                (folder / f"{name}.png").write_bytes(png)
        target.write_text(render_markdown(doc, folder.name), encoding="utf-8")
    except OSError as e:
        raise ReportError(f"cannot write the Markdown report to {path}: {e.strerror or e}") from e
