"""A self-contained HTML report page: inline CSS, tables, figures linked by relative paths, no network.

    sections = [Section("Results", table_html(rows, ["point", "segmentation.mIoU"])),
                Section("Plots", figure_html("plots/seg.png", "mIoU against subset size"))]
    write_page("runs/scaling/report/index.html", "Scaling report", sections, meta={"generated": "..."})

The page needs nothing but the files next to it: images are ``<img src="plots/x.png">`` (with a link to the
SVG), so the report folder can be copied, zipped or served as is. A small inline script marks every image
after the page loads (``data-loaded="1"`` / ``"0"``, and ``data-images="loaded/total"`` on ``<body>``) and
shows a visible note under any image that failed to load; tests read these marks from a headless browser.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import io
from pipeline.report.collect import fmt

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em;
margin-top: 1.8em; } h3 { margin-bottom: 0.3em; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; }
th { background: #f4f4f4; position: sticky; top: 0; } td.text, th.text { text-align: left; }
td.text { white-space: nowrap; }
tr:nth-child(even) td { background: #fafafa; }
.scroll { overflow-x: auto; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; max-width: 540px; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #444; }
.verdict { padding: 0.6em 1em; border-left: 4px solid #888; background: #f7f7f7; }
.good { border-color: #2ca02c; } .bad { border-color: #d62728; } .mixed { border-color: #ff7f0e; }
.missing { color: #b00; } .broken-image { color: #b00; font-weight: bold; }
code { background: #f2f2f2; padding: 0 0.2em; }
nav a { margin-right: 1em; }
"""

IMAGE_CHECK_JS = """
window.addEventListener("load", function () {
  var images = document.images, ok = 0;
  for (var i = 0; i < images.length; i++) {
    var img = images[i], good = img.complete && img.naturalWidth > 0;
    img.setAttribute("data-loaded", good ? "1" : "0");
    if (good) { ok++; continue; }
    var note = document.createElement("div");
    note.className = "broken-image";
    note.textContent = "image did not load: " + img.getAttribute("src");
    img.parentNode.insertBefore(note, img.nextSibling);
  }
  document.body.setAttribute("data-images", ok + "/" + images.length);
});
"""


@dataclass
class Section:
    title: str
    body: str
    """HTML of the section's content (already escaped where needed)."""
    anchor: str = ""
    children: list[Section] = field(default_factory=list)

    def slug(self) -> str:
        return self.anchor or "".join(c if c.isalnum() else "-" for c in self.title.lower()).strip("-")


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def paragraph(text: str) -> str:
    return f"<p>{esc(text)}</p>"


def code(text: str) -> str:
    return f"<code>{esc(text)}</code>"


def bullet_list(items: Sequence[str], escape: bool = True, css: str = "") -> str:
    if not items:
        return ""
    cls = f' class="{css}"' if css else ""
    return f"<ul{cls}>" + "".join(f"<li>{esc(i) if escape else i}</li>" for i in items) + "</ul>"


def table_html(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    headers: Sequence[str] | None = None,
    formatter: Callable[[str, Any], str] | None = None,
    text_columns: Sequence[str] = (),
) -> str:
    """An HTML table; cells are formatted by ``formatter(column, value)`` (default: collect.fmt) and escaped."""
    headers = list(headers or columns)
    texts = set(text_columns)

    def cell(col: str, value: Any) -> str:
        text = formatter(col, value) if formatter else fmt(value)
        is_text = col in texts or (not isinstance(value, (int, float)) and value is not None)
        return f'<td class="text">{esc(text)}</td>' if is_text else f"<td>{esc(text)}</td>"

    head = "".join(
        f'<th class="text">{esc(h)}</th>' if c in texts else f"<th>{esc(h)}</th>"
        for c, h in zip(columns, headers)
    )
    body = "".join("<tr>" + "".join(cell(c, row.get(c)) for c in columns) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def figure_html(src: str, caption: str, alt: str = "", svg: str = "") -> str:
    """A figure whose image is ``src`` (a path relative to the page); ``svg`` adds a link to the vector file."""
    link = f' (<a href="{esc(svg)}">SVG</a>)' if svg else ""
    return (
        f'<figure><img src="{esc(src)}" alt="{esc(alt or caption)}" loading="eager">'
        f"<figcaption>{esc(caption)}{link}</figcaption></figure>"
    )


def relative(path: str | Path, start: str | Path) -> str:
    """``path`` relative to folder ``start``, with forward slashes (for src / href attributes)."""
    import os

    return os.path.relpath(Path(path).resolve(), Path(start).resolve()).replace(os.sep, "/")


def _render_section(section: Section, level: int) -> str:
    out = f'<h{level} id="{esc(section.slug())}">{esc(section.title)}</h{level}>\n{section.body}\n'
    for child in section.children:
        out += _render_section(child, min(level + 1, 4))
    return out


def render_page(
    title: str, sections: Sequence[Section], meta: dict[str, Any] | None = None, intro: str = ""
) -> str:
    """The whole page as a string."""
    meta_html = " &middot; ".join(f"{esc(k)}: {esc(v)}" for k, v in (meta or {}).items())
    nav = " ".join(f'<a href="#{esc(s.slug())}">{esc(s.title)}</a>' for s in sections)
    body = "".join(_render_section(s, 2) for s in sections)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
        f'<h1>{esc(title)}</h1>\n<div class="meta">{meta_html}</div>\n<nav>{nav}</nav>\n{intro}\n{body}'
        f"<script>{IMAGE_CHECK_JS}</script>\n</body></html>\n"
    )


def write_page(
    path: str | Path,
    title: str,
    sections: Sequence[Section],
    meta: dict[str, Any] | None = None,
    intro: str = "",
) -> Path:
    """Write the page atomically; returns its path."""
    io.write_text(str(path), render_page(title, sections, meta, intro))
    return Path(path)


__all__ = [
    "Section",
    "bullet_list",
    "code",
    "esc",
    "figure_html",
    "paragraph",
    "relative",
    "render_page",
    "table_html",
    "write_page",
]
