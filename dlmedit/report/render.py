"""Render a study's tables, figures and generated statements as self-contained HTML and Markdown.

Why its own module: the study decides *what* to report from the numbers; this
module only decides how it looks.  The HTML embeds every PNG as base64 so the file can
be mailed or opened offline, and carries a tiny script that counts loaded images into
``<body data-images-loaded="k/n">`` so a headless browser can verify the report.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlmedit.cache import atomic_write_bytes


@dataclass
class Block:
    kind: str
    payload: dict[str, Any]


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def text(self, text: str) -> Section:
        self.blocks.append(Block("text", {"text": text}))
        return self

    def bullets(self, items: Sequence[str]) -> Section:
        self.blocks.append(Block("bullets", {"items": list(items)}))
        return self

    def table(self, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, caption: str = "") -> Section:
        rows = list(rows)
        # every key of every row, in first-seen order: a note row with fewer keys (e.g. "skipped: …")
        # placed first must not drop the other rows' columns
        cols = list(columns) if columns else list(dict.fromkeys(k for row in rows for k in row))
        self.blocks.append(Block("table", {"rows": rows, "columns": cols, "caption": caption}))
        return self

    def figure(self, path: str | Path, caption: str = "") -> Section:
        self.blocks.append(Block("figure", {"path": Path(path), "caption": caption}))
        return self

    def code(self, text: str) -> Section:
        self.blocks.append(Block("code", {"text": text}))
        return self


def format_cell(value: Any) -> str:
    """Numbers to 3 significant decimals, NaN as an en dash, the rest as text."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    if value is None:
        return "–"
    return str(value)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}caption{caption-side:top;text-align:left;color:#555;padding:4px 0}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:0.9em}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:0.85em}
"""

_IMAGE_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
</script>"""


class Report:
    """A titled list of sections rendered to HTML (self-contained) and Markdown."""

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self.sections: list[Section] = []

    def section(self, title: str) -> Section:
        section = Section(title)
        self.sections.append(section)
        return section

    # -- HTML ------------------------------------------------------------------------
    def to_html(self) -> str:
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 f"<style>{_CSS}</style>{_IMAGE_CHECK}</head><body data-images-loaded='pending'>",
                 f"<h1>{html.escape(self.title)}</h1>"]
        if self.subtitle:
            parts.append(f"<p>{html.escape(self.subtitle)}</p>")
        for section in self.sections:
            parts.append(f"<h2>{html.escape(section.title)}</h2>")
            for block in section.blocks:
                parts.append(self._html_block(block))
        parts.append("</body></html>")
        return "\n".join(parts)

    @staticmethod
    def _html_block(block: Block) -> str:
        p = block.payload
        if block.kind == "text":
            return f"<p>{html.escape(p['text'])}</p>"
        if block.kind == "bullets":
            return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in p["items"]) + "</ul>"
        if block.kind == "code":
            return f"<pre>{html.escape(p['text'])}</pre>"
        if block.kind == "table":
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in p["columns"])
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(format_cell(r.get(c)))}</td>" for c in p["columns"]) + "</tr>"
                for r in p["rows"]
            )
            caption = f"<caption>{html.escape(p['caption'])}</caption>" if p["caption"] else ""
            return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        if block.kind == "figure":
            path: Path = p["path"]
            data = base64.b64encode(path.read_bytes()).decode()
            return (f"<figure><img alt='{html.escape(path.name)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{html.escape(p['caption'])}</figcaption></figure>")
        raise ValueError(f"unknown block kind {block.kind}")

    # -- Markdown ---------------------------------------------------------------------
    def to_markdown(self, relative_to: Path | None = None) -> str:
        lines = [f"# {self.title}", ""]
        if self.subtitle:
            lines += [self.subtitle, ""]
        for section in self.sections:
            lines += [f"## {section.title}", ""]
            for block in section.blocks:
                p = block.payload
                if block.kind == "text":
                    lines += [p["text"], ""]
                elif block.kind == "bullets":
                    lines += [f"- {i}" for i in p["items"]] + [""]
                elif block.kind == "code":
                    lines += ["```", p["text"], "```", ""]
                elif block.kind == "table":
                    if p["caption"]:
                        lines += [f"*{p['caption']}*", ""]
                    cols = p["columns"]
                    lines.append("| " + " | ".join(str(c) for c in cols) + " |")
                    lines.append("|" + "---|" * len(cols))
                    lines += ["| " + " | ".join(format_cell(r.get(c)) for c in cols) + " |" for r in p["rows"]]
                    lines.append("")
                elif block.kind == "figure":
                    path = p["path"]
                    shown = path.relative_to(relative_to) if relative_to and path.is_relative_to(relative_to) else path
                    lines += [f"![{p['caption']}]({shown.as_posix()})", ""]
        return "\n".join(lines)

    def write(self, out_dir: str | Path, stem: str = "report") -> tuple[Path, Path]:
        """Write ``report.html`` and ``report.md`` into ``out_dir`` atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        html_path, md_path = out / f"{stem}.html", out / f"{stem}.md"
        atomic_write_bytes(html_path, self.to_html().encode())
        atomic_write_bytes(md_path, self.to_markdown(relative_to=out).encode())
        return html_path, md_path
