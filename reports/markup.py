"""HTML building blocks of the report, every text escaped: tables, sections, inlined images.

Kept apart so that the leaderboard's table fragment and the page's tables are made the same way.
"""

import base64
from html import escape


def table(headers: list[str], cells: list[list[str]], css_class: str = "", row_classes: list[str] | None = None) -> str:
    """A table of text cells; row_classes (one per row) let the page's CSS mark rows such as the teacher's."""
    classes = row_classes or [""] * len(cells)
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "\n".join(
        f'<tr class="{escape(c)}">' + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>"
        for row, c in zip(cells, classes, strict=True)
    )
    return f'<table class="{escape(css_class)}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n'


def section(title: str, body: str, level: int = 2) -> str:
    return f"<section>\n<h{level}>{escape(title)}</h{level}>\n{body}</section>\n"


def paragraph(text: str, css_class: str = "") -> str:
    return f'<p class="{escape(css_class)}">{escape(text)}</p>\n'


def bullets(items: list[str]) -> str:
    return "<ul>\n" + "".join(f"<li>{escape(item)}</li>\n" for item in items) + "</ul>\n"


def png_image(png: bytes, alt: str) -> str:
    """An <img> with the PNG inlined as a data: URI, so the page needs no other file."""
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{escape(alt)}">'
