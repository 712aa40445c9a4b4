"""A corpus run's summary in the explorer's page: its numbers, the stable rank of J_i by token
position (the paper's Fig. 3, drawn in the page) and a sortable table of the prompts, each
linked to its own map view (:func:`lin_lens.explorer.maps.row_data`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lin_lens import _explorer as page_
from lin_lens.corpus.store import read
from lin_lens.corpus.views import by_position, summary
from lin_lens.explorer.maps import row_data

MAX_ROWS = 5000  # prompts listed in the page (the figure and the summary use every row)


def rows(run: Any) -> list[dict]:
    """Every row of a run (a directory / URI, or a table from ``lin_lens.corpus.read``)."""
    table = run if hasattr(run, "to_pylist") else read(run)
    return table.to_pylist()


def row_key(row: dict) -> str:
    """A file-name-safe key of one (prompt, target position) row."""
    return f"{row['prompt_id']}-{row['target_pos']}"


def corpus_data(run: Any, link: Callable[[dict], str | None] | None = None,
                title: str | None = None, back: dict | None = None,
                max_rows: int = MAX_ROWS) -> dict:
    """The page's data for a run; ``link(row)`` gives each prompt's map-view address."""
    import pyarrow as pa

    all_rows = rows(run)
    table = pa.Table.from_pylist(all_rows) if all_rows else None
    first = all_rows[0] if all_rows else {}
    s = summary(table) if table is not None else {"rows": 0, "ok": 0, "failed": 0}
    s.pop("median_by_position", None)
    name = title or (f"corpus run {os.fspath(run)}" if isinstance(run, (str, os.PathLike))
                     else "corpus run")
    listed = []
    for r in all_rows[:max_rows]:
        u = r.get("u_stacked_tokens") or []
        listed.append({
            "prompt_index": r["prompt_index"], "prompt_id": r["prompt_id"], "text": r["text"],
            "target_pos": r["target_pos"], "n_tokens": r["n_tokens"],
            "prediction": r.get("prediction"), "probability": r.get("probability"),
            "relative_error": r.get("relative_error"),
            "stable_rank_stacked": r.get("stable_rank_stacked"), "status": r["status"],
            "u0": u[0] if u else None, "href": link(r) if link else None})
    data = {"kind": "corpus",
            "meta": {"title": name, "model": first.get("model"), "dtype": first.get("dtype"),
                     "backend": first.get("backend"), "hook": first.get("hook"), "summary": s,
                     "listed": len(listed)},
            "by_position": {str(k): v for k, v in by_position(table).items()}
            if table is not None else {},
            "rows": listed}
    if back:
        data["back"] = back
    return data


def corpus_page(run: Any, link: Callable[[dict], str | None] | None = None, **kw: Any) -> str:
    data = corpus_data(run, link, **kw)
    return page_.page(data, data["meta"]["title"])


def save_corpus_html(run: Any, out: str | os.PathLike, title: str | None = None) -> Path:
    """The run as a folder of static pages: ``out/index.html`` (the summary) and
    ``out/maps/<prompt_id>-<pos>.html`` (each prompt's map), working from ``file://``."""
    out = Path(out)
    all_rows = rows(run)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    for r in all_rows:
        page = page_.page(row_data(r, back={"href": "../index.html", "label": "the run"}),
                          f"{r['text']!r}")
        page_.write(page, out / "maps" / f"{row_key(r)}.html")
    import pyarrow as pa

    table = pa.Table.from_pylist(all_rows) if all_rows else run
    index = corpus_page(table, link=lambda r: f"maps/{row_key(r)}.html",
                        title=title or f"corpus run {os.fspath(run)}"
                        if isinstance(run, (str, os.PathLike)) else title)
    return page_.write(index, out / "index.html")
