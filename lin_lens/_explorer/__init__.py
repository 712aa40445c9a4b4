"""The explorer's page: one self-contained HTML document around plain data.

This package knows nothing of graphs, maps or corpora: a caller hands it a JSON-able dict (with
``"kind"``: ``"graph"``, ``"map"`` or ``"corpus"``) and gets back a complete HTML page that
inlines the data, the explorer's JavaScript and CSS (``static/``) and the vendored d3 modules it
uses for pan and zoom (``static/vendor/``, npm registry releases, ISC licences embedded in the
page). Nothing is loaded from the network, so the page works from ``file://``, in a notebook
(an ``<iframe srcdoc>``, see :func:`frame`) and from ``lin-lens serve``.

It sits low in the layering so that every result object (``AttributionGraph`` in the graph layer,
the pages of :mod:`lin_lens.explorer` above) can render into it; the data builders live with
the objects they read.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from lin_lens.errors import InvalidArgumentError

FORMAT_VERSION = 1
# vendored d3 modules, in dependency order (each UMD build reads the earlier ones from d3)
VENDOR = ("d3-dispatch", "d3-selection", "d3-color", "d3-interpolate", "d3-ease", "d3-timer",
          "d3-transition", "d3-drag", "d3-zoom")
SCRIPTS = ("core.js", "prune.js", "graph_draw.js", "graph_panel.js", "graph.js", "maps.js",
           "corpus.js", "app.js")
KINDS = ("graph", "map", "corpus")


@functools.cache
def _asset(name: str) -> str:
    return resources.files(__name__).joinpath("static").joinpath(name).read_text(encoding="utf-8")


def css() -> str:
    return _asset("explorer.css")


def document(title: str, body: str) -> str:
    """A plain page (no script) in the explorer's style: ``body`` is trusted HTML."""
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{css()}</style></head><body>"
            f"<div class=\"ll ll-doc\">{body}</div></body></html>\n")


def vendor_js() -> str:
    """The vendored d3 modules, one after the other, as published."""
    return "\n".join(_asset(f"vendor/{m}.min.js") for m in VENDOR)


def licences() -> str:
    """The vendored modules' licence texts (each distinct text once, with the modules it covers)."""
    texts: dict[str, list[str]] = {}
    for m in VENDOR:
        texts.setdefault(_asset(f"vendor/{m}.LICENSE").strip(), []).append(m)
    return "\n\n".join(f"{', '.join(ms)}:\n{t}" for t, ms in texts.items())


def b64(values: Any, dtype: str) -> str:
    """A flat array as base64 of its little-endian bytes (``dtype``: a numpy dtype name such as
    ``"<f8"``, ``"<i4"``, ``"u1"``); the page decodes it into a typed array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    a = np.ascontiguousarray(np.asarray(values).reshape(-1), dtype=np.dtype(dtype))
    return base64.b64encode(a.tobytes()).decode("ascii")


def clean(obj: Any) -> Any:
    """``obj`` with non-finite floats as None, tuples as lists, numpy scalars as Python ones:
    what ``JSON.parse`` accepts."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def script_json(obj: Any) -> str:
    """JSON safe inside ``<script type="application/json">`` (every ``<`` escaped)."""
    return json.dumps(clean(obj), ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).replace("<", "\\u003c")


def page(data: dict, title: str, state: dict | None = None) -> str:
    """The complete, self-contained HTML page showing ``data`` (see the module docstring).

    ``state``: what the reader can change and save with the page (pinned nodes, thresholds);
    kept in its own small ``<script>`` so the page's "Save" rewrites only that.
    """
    if data.get("kind") not in KINDS:
        raise InvalidArgumentError(
            f"explorer data kind {data.get('kind')!r}; expected one of {KINDS}")
    data = {**data, "format": "lin_lens.explorer", "version": FORMAT_VERSION}
    scripts = "\n".join(f"<script>{_asset(s)}</script>" for s in SCRIPTS)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_asset('explorer.css')}</style>\n"
        f"<!-- lin_lens explorer. Bundled d3 modules ({', '.join(VENDOR)}), from the npm "
        f"registry; their licences:\n{html.escape(licences())}\n-->\n"
        "</head><body>\n<div id=\"ll-app\" class=\"ll\"></div>\n"
        f"<script type=\"application/json\" id=\"ll-data\">{script_json(data)}</script>\n"
        f"<script type=\"application/json\" id=\"ll-state\">{script_json(state or {})}"
        "</script>\n"
        f"<script>{vendor_js()}</script>\n{scripts}\n</body></html>\n")


def frame(page_html: str, height: int = 760) -> str:
    """The page inside an ``<iframe srcdoc>``: a notebook cell's HTML (its scripts and styles
    stay in their own document, so several explorers in one notebook do not interfere)."""
    return (f"<iframe srcdoc=\"{html.escape(page_html, quote=True)}\" "
            f"style=\"width:100%;height:{int(height)}px;border:1px solid #ddd\" "
            "title=\"lin_lens explorer\"></iframe>")


def show(page_html: str, height: int = 760) -> Path | None:
    """Display the page: in a running notebook as an output cell; elsewhere written to a
    temporary file opened in the default browser (its path is returned)."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is not None and getattr(shell, "kernel", None) is not None:
        from IPython.display import HTML, display

        display(HTML(frame(page_html, height)))
        return None
    fd, name = tempfile.mkstemp(prefix="lin_lens_explorer_", suffix=".html")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(page_html)
    path = Path(name)
    import webbrowser

    webbrowser.open(path.as_uri())
    return path


def write(page_html: str, path: str | os.PathLike) -> Path:
    """Write a page (UTF-8), creating the parent folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page_html, encoding="utf-8")
    return path
