"""``lin-lens serve DIR``: a small local web server over a folder of graphs, maps and corpus runs.

The index page lists what the folder holds (recursively, a few levels deep): corpus runs
(directories with ``_lin_lens_corpus.json``), graph files (circuit-tracer's JSON or lin_lens's
export), saved ``.pt`` files (``LinearMap.save`` / ``AttributionGraph.save``) and saved
explorer pages (``.html``). Each opens in the explorer; a run opens on its summary, whose
prompts link to their map views. Standard library only (``http.server``); it listens on
127.0.0.1 by default and serves nothing outside DIR. ``.pt`` files are read with
``weights_only=True`` (tensors and plain data only), so a file cannot run code when shown.
"""

from __future__ import annotations

import html
import json
import mimetypes
import os
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from lin_lens import _explorer as page_
from lin_lens.corpus.schema import MANIFEST
from lin_lens.errors import InvalidArgumentError, LinLensError

SKIP = {"shards", "__pycache__", "node_modules"}
MAX_DEPTH = 4


def scan(root: Path) -> dict[str, list[dict]]:
    """What the index lists: ``{"runs", "graphs", "saved", "pages"}`` (paths relative to root)."""
    out: dict[str, list[dict]] = {"runs": [], "graphs": [], "saved": [], "pages": []}
    listings: dict[str, dict] = {}

    def walk(d: Path, depth: int) -> None:
        try:
            entries = sorted(d.iterdir(), key=lambda p: p.name)
        except OSError:
            return
        if (d / MANIFEST).is_file():
            out["runs"].append({"path": _rel(root, d), "info": _manifest(d / MANIFEST)})
            return
        meta = d / "graph-metadata.json"
        if meta.is_file():
            try:
                for g in json.loads(meta.read_text(encoding="utf-8")).get("graphs", []):
                    listings[_rel(root, d / f"{g.get('slug')}.json")] = g
            except (OSError, ValueError, AttributeError):
                pass
        for p in entries:
            if p.name.startswith(".") or p.name in SKIP:
                continue
            if p.is_dir() and depth < MAX_DEPTH:
                walk(p, depth + 1)
            elif p.suffix == ".json" and p.name not in ("graph-metadata.json", MANIFEST) \
                    and _looks_like_graph(p):
                out["graphs"].append({"path": _rel(root, p), "size": p.stat().st_size})
            elif p.suffix == ".pt":
                out["saved"].append({"path": _rel(root, p), "size": p.stat().st_size})
            elif p.suffix in (".html", ".htm"):
                out["pages"].append({"path": _rel(root, p), "size": p.stat().st_size})

    walk(root, 0)
    for g in out["graphs"]:
        entry = listings.get(g["path"])
        if entry:
            g["info"] = entry.get("prompt")
    return out


def _rel(root: Path, p: Path) -> str:
    return p.relative_to(root).as_posix() or "."


def _manifest(path: Path) -> str:
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    s = m.get("settings", {})
    return ", ".join(str(x) for x in (s.get("model"), s.get("dtype"), s.get("hook"),
                                       f"{m.get('n_prompts')} prompts") if x)


def _looks_like_graph(p: Path) -> bool:
    try:
        with open(p, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return False
    return '"nodes"' in head or ('"metadata"' in head and '"prompt_tokens"' in head)


def index_page(root: Path) -> str:
    found = scan(root)
    parts = [f"<h1>lin_lens explorer: {html.escape(str(root))}</h1>"]
    titles = {"runs": "Corpus runs", "graphs": "Attribution graphs (JSON)",
              "saved": "Saved maps and graphs (.pt)", "pages": "Saved pages (.html)"}
    for key, title in titles.items():
        items = found[key]
        parts.append(f"<h2>{title} ({len(items)})</h2>")
        if not items:
            parts.append("<p class='ll-muted'>none</p>")
            continue
        lis = []
        for it in items:
            href = ("/file/" if key == "pages" else "/view/") + quote(it["path"])
            extra = it.get("info") or (f"{it['size'] / 1e6:.2f} MB" if "size" in it else "")
            lis.append(f"<li><a href='{href}'>{html.escape(it['path'])}</a> "
                       f"<span class='ll-muted'>{html.escape(str(extra))}</span></li>")
        parts.append(f"<ul class='ll-index'>{''.join(lis)}</ul>")
    return page_.document("lin_lens explorer", "".join(parts))


class Pages:
    """Builds (and caches, by path and modification time) the page of each item."""

    def __init__(self, root: Path, size: int = 8):
        self.root, self.size = root, size
        self.cache: OrderedDict[tuple, str] = OrderedDict()
        self.lock = threading.Lock()

    def path(self, rel: str) -> Path:
        p = (self.root / unquote(rel)).resolve()
        if p != self.root and self.root not in p.parents:
            raise InvalidArgumentError(f"{rel!r} is outside the served folder")
        if not p.exists():
            raise FileNotFoundError(f"{rel!r} does not exist in the served folder")
        return p

    def _cached(self, key: tuple, build) -> str:
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        page = build()
        with self.lock:
            self.cache[key] = page
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return page

    def view(self, rel: str) -> str:
        p = self.path(rel)
        if p.is_dir() and not (p / MANIFEST).is_file():
            raise InvalidArgumentError(f"{rel!r} is a folder but not a corpus run")
        stamp = (p / MANIFEST).stat().st_mtime if p.is_dir() else p.stat().st_mtime
        return self._cached(("view", str(p), stamp), lambda: self._view(p, rel))

    def _view(self, p: Path, rel: str) -> str:
        if p.is_dir():
            from lin_lens.explorer.corpus import corpus_page, row_key

            return corpus_page(p, link=lambda r: f"/run/{quote(rel)}/{row_key(r)}",
                               title=f"corpus run {rel}", back={"href": "/", "label": "index"})
        if p.suffix == ".json":
            from lin_lens.graph import load_json

            return load_json(p).to_html()
        if p.suffix == ".pt":
            return _saved(p)
        raise InvalidArgumentError(f"{rel!r}: not a graph (.json), saved map or graph (.pt) "
                                   "or corpus run")

    def run_row(self, rel: str, key: str) -> str:
        p = self.path(rel)
        from lin_lens.explorer.corpus import row_key, rows
        from lin_lens.explorer.maps import row_data

        def build() -> str:
            for r in rows(p):
                if row_key(r) == key:
                    data = row_data(r, back={"href": f"/view/{quote(rel)}", "label": "the run"})
                    return page_.page(data, data["meta"]["title"])
            raise FileNotFoundError(f"no prompt {key!r} in the run {rel!r}")

        return self._cached(("row", str(p), key, (p / MANIFEST).stat().st_mtime), build)


def _saved(p: Path) -> str:
    """A ``.pt`` file: a LinearMap (read with weights_only) or an AttributionGraph."""
    from lin_lens.explorer.maps import map_page
    from lin_lens.maps.result import LinearMap

    try:
        lm = LinearMap.load(p)
    except Exception as e:  # noqa: BLE001 - not a LinearMap: try the other format
        first = e
    else:
        return map_page(lm, title=f"linear map {p.name}: {lm.hook} ← {lm.source}")
    from lin_lens.graph.result import AttributionGraph

    try:
        return AttributionGraph.load(p).to_html()
    except Exception as e:  # noqa: BLE001 - report both
        raise InvalidArgumentError(f"{p.name}: neither a saved LinearMap ({first}) nor a saved "
                                   f"AttributionGraph ({e})") from e


def make_server(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000
                ) -> ThreadingHTTPServer:
    """The server (not started: call ``serve_forever``); ``port=0`` picks a free port."""
    root_path = Path(root).resolve()
    if not root_path.is_dir():
        raise InvalidArgumentError(f"serve: {os.fspath(root)!r} is not a folder")
    pages = Pages(root_path)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name  # quiet: one line per error only
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = urlsplit(self.path).path
            try:
                if path in ("/", "/index.html"):
                    self._send(200, index_page(root_path))
                elif path == "/favicon.ico":  # browsers ask; nothing to show
                    self._send(204, b"", "image/x-icon")
                elif path.startswith("/view/"):
                    self._send(200, pages.view(path[len("/view/"):]))
                elif path.startswith("/run/"):
                    rel, _, key = path[len("/run/"):].rpartition("/")
                    self._send(200, pages.run_row(rel, unquote(key)))
                elif path.startswith("/file/"):
                    p = pages.path(path[len("/file/"):])
                    if not p.is_file():
                        raise FileNotFoundError(path)
                    ctype = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
                    self._send(200, p.read_bytes(), ctype)
                else:
                    self._send(404, _error("not found", path))
            except FileNotFoundError as e:
                self._send(404, _error("not found", str(e)))
            except (LinLensError, ValueError, OSError) as e:
                self._send(400 if isinstance(e, InvalidArgumentError) else 500,
                           _error(type(e).__name__, str(e)))

        def _send(self, code: int, body: str | bytes, ctype: str = "text/html") -> None:
            data = body.encode("utf-8") if isinstance(body, str) else body
            self.send_response(code)
            self.send_header("Content-Type", f"{ctype}; charset=utf-8"
                             if ctype.startswith("text/") else ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return ThreadingHTTPServer((host, port), Handler)


def _error(title: str, message: str) -> str:
    return page_.document(title, f"<h2>{html.escape(title)}</h2><pre class='ll-error'>"
                                 f"{html.escape(message)}</pre><p><a href='/'>index</a></p>")


def serve(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          open_browser: bool = False) -> None:
    """Serve ``root`` until interrupted (Ctrl-C)."""
    server = make_server(root, host, port)
    url = f"http://{server.server_address[0]}:{server.server_address[1]}/"
    print(f"lin-lens serve: {Path(root).resolve()} at {url} (Ctrl-C to stop)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
