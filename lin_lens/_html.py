"""The one HTML table every result's ``_repr_html_`` uses."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any


def fmt(v: Any) -> str:
    """A cell value as text: floats to 4 significant digits, lists joined, None as a dash."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return " ".join(fmt(x) for x in v)
    return "–" if v is None else str(v)


def table(rows: Iterable[Sequence[Any]], header: Sequence[str] | None = None,
          caption: str = "", cls: str = "") -> str:
    """An escaped ``<table>``: ``rows`` of cells; a row of two with no header reads key: value
    (the key as a row header)."""
    head = "" if header is None else (
        "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    body = []
    for r in rows:
        cells = [html.escape(fmt(c)) for c in r]
        if header is None and len(cells) == 2:
            body.append(f"<tr><th style='text-align:left'>{cells[0]}</th>"
                        f"<td style='text-align:left'>{cells[1]}</td></tr>")
        else:
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    attr = f" class='{cls}'" if cls else ""
    return f"<table{attr}>{cap}{head}{''.join(body)}</table>"
