"""The report as one self-contained HTML page.

Owns :func:`render_html` and :func:`write_html`. The page needs nothing but itself: CSS inline,
figures as ``data:image/png;base64`` URIs, no script, no font or stylesheet fetched, so it opens
from ``file://`` and from an attachment. It has a table of contents, tables that scroll
sideways inside their own box when wider than the page, and figures scaled to the page. Every
string that came from a result (run names, paths, commands, config values, notes) is escaped
with :func:`html.escape`, so nothing a result holds becomes markup.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from pathlib import Path

from kvferry.report import fmt
from kvferry.report.model import Figure, Finding, ReportDoc, ReportError, Section, Table

__all__ = ["render_html", "write_html"]

CSS = """
:root { --fg: #1d2430; --muted: #5b6573; --line: #d8dde4; --bg-alt: #f5f7fa; --accent: #2358a6; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 26px; margin: 0 0 6px; }
h2 { font-size: 21px; margin: 40px 0 8px; padding-top: 8px; border-top: 2px solid var(--line); }
h3 { font-size: 17px; margin: 28px 0 6px; }
h4, h5 { font-size: 15px; margin: 20px 0 6px; }
a { color: var(--accent); }
p { margin: 6px 0 10px; }
.meta { color: var(--muted); margin: 0; }
.meta b { color: var(--fg); font-weight: 600; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 18px 0 6px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; min-width: 200px;
        max-width: 360px; background: var(--bg-alt); }
.card .v { font-size: 19px; font-weight: 600; }
.card .k { font-size: 12px; color: var(--muted); }
nav.toc { border: 1px solid var(--line); border-radius: 6px; padding: 10px 16px; margin: 18px 0;
          background: var(--bg-alt); }
nav.toc ol { margin: 4px 0; padding-left: 22px; }
nav.toc li { margin: 2px 0; }
.table-wrap { overflow-x: auto; margin: 10px 0 16px; border: 1px solid var(--line);
              border-radius: 4px; }
table { border-collapse: collapse; font-size: 13px; width: 100%; }
caption { text-align: left; font-weight: 600; padding: 6px 8px; background: var(--bg-alt);
          border-bottom: 1px solid var(--line); }
th, td { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: left;
         vertical-align: top; }
td { max-width: 520px; overflow-wrap: break-word; }
th { background: #eef1f5; position: sticky; top: 0; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
.note { font-size: 12.5px; color: var(--muted); margin: 0; padding: 6px 8px; }
figure { margin: 14px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { font-size: 13px; color: var(--muted); }
.finding { border-left: 5px solid #8a94a3; background: var(--bg-alt); padding: 8px 14px;
           margin: 10px 0; border-radius: 0 4px 4px 0; }
.finding h4 { margin: 2px 0 4px; }
.finding p { margin: 3px 0; }
.finding.bad { border-color: #c62828; } .finding.warn { border-color: #e08a00; }
.finding.info { border-color: #2f6fba; } .finding.good { border-color: #2e7d32; }
.sev { display: inline-block; font-size: 11px; font-weight: 700; text-transform: uppercase;
       padding: 0 6px; border-radius: 3px; color: #fff; background: #8a94a3; margin-right: 6px; }
.bad .sev { background: #c62828; } .warn .sev { background: #b86e00; }
.info .sev { background: #2f6fba; } .good .sev { background: #2e7d32; }
.evidence { font-size: 13px; color: var(--muted); }
footer { color: var(--muted); font-size: 12.5px; margin-top: 48px; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(t: Table) -> str:
    numeric = list(t.numeric) + [False] * (len(t.columns) - len(t.numeric))
    out = ['<div class="table-wrap"><table>']
    if t.title:
        out.append(f"<caption>{_e(t.title)}</caption>")
    num = ' class="num"'
    head = "".join(
        f'<th{num if numeric[i] else ""} scope="col">{_e(c)}</th>' for i, c in enumerate(t.columns)
    )
    out.append(f"<thead><tr>{head}</tr></thead><tbody>")
    for row in t.rows:
        cells = "".join(
            f"<td{num if i < len(numeric) and numeric[i] else ''}>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    if t.note:
        out.append(f'<p class="note">{_e(t.note)}</p>')
    out.append("</div>")
    return "".join(out)


def _figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    caption = f"<b>{_e(f.title)}</b>" + (f". {_e(f.caption)}" if f.caption else "")
    return (
        f'<figure id="fig-{_e(f.name)}"><img src="data:image/png;base64,{data}" '
        f'alt="{_e(f.title)}"><figcaption>{caption}</figcaption></figure>'
    )


def _finding(f: Finding) -> str:
    parts = [
        f'<div class="finding {_e(f.severity)}"><h4><span class="sev">{_e(f.severity)}</span>'
        f"{_e(f.title)}</h4><p>{_e(f.detail)}</p>",
        f'<p class="evidence"><b>Evidence:</b> {_e(f.evidence)}</p>',
    ]
    if f.recommendation:
        parts.append(f"<p><b>Try:</b> {_e(f.recommendation)}</p>")
    if f.candidates:
        items = "".join(
            f"<li><code>{_e(c.label)}</code>: <code>{_e(c.command)}</code></li>"
            for c in f.candidates
        )
        parts.append(
            "<p><b>Measure before changing</b> (<code>kvferry advise --verify</code> runs "
            f"these and keeps what helped):</p><ul>{items}</ul>"
        )
    parts.append("</div>")
    return "".join(parts)


def _section(s: Section, depth: int) -> str:
    level = min(depth + 2, 5)
    out = [f'<section id="{_e(s.anchor)}"><h{level}>{_e(s.title)}</h{level}>']
    if s.intro:
        out.append(f"<p>{_e(s.intro)}</p>")
    out.extend(_finding(f) for f in s.findings)
    out.extend(_table(t) for t in s.tables)
    out.extend(_figure(f) for f in s.figures)
    out.extend(_section(sub, depth + 1) for sub in s.subsections)
    out.append("</section>")
    return "\n".join(out)


def _toc(sections: Sequence[Section], depth: int = 0) -> str:
    if not sections:
        return ""
    items = []
    for s in sections:
        nested = _toc(s.subsections, depth + 1) if depth < 1 else ""
        items.append(f'<li><a href="#{_e(s.anchor)}">{_e(s.title)}</a>{nested}</li>')
    return "<ol>" + "".join(items) + "</ol>"


def render_html(doc: ReportDoc) -> str:
    """The whole page as a string (module docstring)."""
    meta = "".join(f'<p class="meta"><b>{_e(k)}:</b> {_e(v)}</p>' for k, v in doc.meta)
    if not doc.meta:
        meta = f'<p class="meta"><b>Generated:</b> {_e(fmt.utc(doc.generated_at))}</p>'
    cards = "".join(
        f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
        for k, v in doc.headline
    )
    body = "\n".join(_section(s, 0) for s in doc.sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(doc.title)}</title><style>{CSS}</style></head>\n"
        f"<body><main><header><h1>{_e(doc.title)}</h1>{meta}"
        + (f'<div class="cards">{cards}</div>' if cards else "")
        + "</header>\n"
        f'<nav class="toc" aria-label="Contents"><b>Contents</b>{_toc(doc.sections)}</nav>\n'
        f"{body}\n"
        f"<footer>Built {_e(fmt.utc(doc.generated_at))} from {len(doc.sources)} result file(s); "
        "every number on this page is read from them (see Sources).</footer>"
        "</main></body></html>\n"
    )


def write_html(doc: ReportDoc, path: str | os.PathLike[str]) -> None:
    """Write :func:`render_html` to ``path``.

    Raises:
        ReportError: the file cannot be written.
    """
    try:
        Path(path).write_text(render_html(doc), encoding="utf-8")
    except OSError as e:
        raise ReportError(f"cannot write the report to {path}: {e.strerror or e}") from e
