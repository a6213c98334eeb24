"""HTML helpers of the report: escaping, number formats, tables, figures and the page around them.

The page's CSS is ``style.css`` beside this module (package data), inlined
into the page so that the report stays one static file.
"""
from __future__ import annotations

import functools
import html
from importlib import resources

import numpy as np


@functools.cache
def stylesheet() -> str:
    return resources.files("searchspace.report").joinpath("style.css").read_text(encoding="utf-8")


def document(title: str, *parts: str) -> str:
    """The whole page: its head with the inline CSS, then the parts, one a line."""
    head = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{esc(title)}</title><style>\n{stylesheet()}</style></head><body><main>")
    return lines(head, *parts) + "</main></body></html>"


def lines(*parts: str | None) -> str:
    """The parts that are not empty (a figure that was not drawn is ""), one a line."""
    return "\n".join(p for p in parts if p)


def esc(v) -> str:
    return html.escape(str(v))


def fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{digits}g}"
    return str(v)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def duration(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds):
        return "?"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def table(rows: list[dict], left: set[str] = frozenset(), row_class: list[str] | None = None,
          titles: list[str] | None = None) -> str:
    if not rows:
        return "<p class='muted'>(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th class='{'l' if c in left else ''}'>{esc(c)}</th>" for c in cols)
    body = []
    for i, r in enumerate(rows):
        cls = f" class='{row_class[i]}'" if row_class and row_class[i] else ""
        title = f" title='{esc(titles[i])}'" if titles and titles[i] else ""
        cells = "".join(f"<td class='{'l' if c in left else ''}'>{esc(fmt(r[c]))}</td>" for c in cols)
        body.append(f"<tr{cls}{title}>{cells}</tr>")
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def figure(name: str | None, caption: str, alt: str) -> str:
    if name is None:
        return ""
    return f"<figure><img src='{esc(name)}' alt='{esc(alt)}'><figcaption>{caption}</figcaption></figure>"
