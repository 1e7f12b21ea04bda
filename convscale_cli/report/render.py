"""A tiny document model rendered to Markdown and to one self-contained HTML file.

The report is written once as a list of blocks and rendered twice, so ``report.md`` and ``report.html`` can never
disagree. The HTML embeds every PNG as a base64 data URI and carries its CSS inline: it can be mailed or attached to
an issue as a single file with no external assets.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    """A section title (level 2 or 3; level 1 is the document title)."""

    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """Plain text; ``**bold**`` spans are kept in Markdown and rendered as <strong> in HTML."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """An unordered list of plain-text items."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A table of already formatted cells."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class Image:
    """A PNG written next to the report, referenced by file name."""

    file: str
    alt: str


Block = Heading | Paragraph | Bullets | Table | Image


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, blocks: Sequence[Block]) -> str:
    """Render the blocks as GitHub-flavoured Markdown with images referenced by relative path."""
    lines = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Bullets):
            lines += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            if block.caption:
                lines += [f"*{block.caption}*", ""]
            lines.append("| " + " | ".join(_md_cell(c) for c in block.columns) + " |")
            lines.append("|" + "|".join("---" for _ in block.columns) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        elif isinstance(block, Image):
            lines += [f"![{block.alt}]({block.file})", ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body { font: 15px/1.5 -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1000px; margin: 2em auto;
       padding: 0 1em; color: #1f2328; }
h1 { border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #eaeef2; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: .3em; }
img { max-width: 100%; border: 1px solid #eaeef2; }
.supported { color: #1a7f37; font-weight: 600; }
.not-supported { color: #cf222e; font-weight: 600; }
.inconclusive { color: #9a6700; font-weight: 600; }
"""

_STATUS_CLASSES = (("not supported", "not-supported"), ("supported", "supported"), ("inconclusive", "inconclusive"))


def _inline(text: str) -> str:
    """Escape text, then turn ``**x**`` into <strong> and colour verdict words."""
    escaped = html.escape(text)
    parts = escaped.split("**")
    out = "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))
    for word, css in _STATUS_CLASSES:
        marker = f"<strong>{word}</strong>"
        if marker in out:
            return out.replace(marker, f'<span class="{css}">{word}</span>', 1)
    return out


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(title: str, blocks: Sequence[Block], image_dir: Path) -> str:
    """Render the blocks as one self-contained HTML page, embedding the PNGs found in ``image_dir``."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            caption = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block.columns)
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(block, Image):
            src = _data_uri(image_dir / block.file)
            body.append(f'<p><img src="{src}" alt="{html.escape(block.alt)}"></p>')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
