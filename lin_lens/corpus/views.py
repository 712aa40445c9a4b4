"""Population views of corpus runs: stable rank by token position (the paper's Fig. 3) and a
side-by-side offline HTML report of several runs (its Sec. 3.4)."""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lin_lens.corpus.store import read
from lin_lens.errors import InvalidArgumentError

Run = Any  # a run directory / URI, or a table from :func:`lin_lens.corpus.read`

_COLS = ["text", "model", "dtype", "backend", "hook", "target_pos", "n_tokens", "prediction",
         "prediction_id", "probability", "relative_error", "relative_error_ordinary",
         "stable_rank", "stable_rank_stacked", "u_stacked_tokens", "u_stacked_ids", "status"]


def _table(run: Run) -> pa.Table:
    if isinstance(run, pa.Table):
        return run
    return read(run, columns=_COLS)


def _runs(runs: Sequence[Run] | Mapping[str, Run] | Run,
          labels: Sequence[str] | None) -> list[tuple[str, pa.Table]]:
    if isinstance(runs, Mapping):
        labels, runs = list(runs), list(runs.values())
    elif isinstance(runs, (str, os.PathLike, pa.Table)):
        runs = [runs]
    tables = [_table(r) for r in runs]
    if labels is None:
        labels = [_label(t, r) for t, r in zip(tables, runs, strict=True)]
    if len(labels) != len(tables):
        raise InvalidArgumentError(f"labels: {len(labels)} given for {len(tables)} runs")
    seen: dict[str, int] = {}
    unique = []
    for label in labels:  # two runs of one model (other hooks, say) keep apart
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return list(zip(unique, tables, strict=True))


def _label(t: pa.Table, run: Run) -> str:
    if t.num_rows:
        r = t.slice(0, 1).to_pylist()[0]
        return f"{r['model']} ({r['dtype']}, {r['backend']})"
    return str(run)


def _ok(t: pa.Table) -> list[dict]:
    return [r for r in t.to_pylist() if r["status"] == "ok"]


def by_position(t: pa.Table) -> dict[int, list[float]]:
    """Stable ranks of the per-token operators J_i grouped by source position i (ok rows)."""
    out: dict[int, list[float]] = {}
    for r in _ok(t):
        if r["stable_rank"] is None:
            continue
        for i, v in enumerate(r["stable_rank"]):
            out.setdefault(i, []).append(v)
    return dict(sorted(out.items()))


def _fig(figsize=(6.5, 4.0)):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def stable_rank_plot(runs: Sequence[Run] | Mapping[str, Run] | Run,
                     labels: Sequence[str] | None = None, *, max_pos: int | None = None,
                     title: str | None = None):
    """Stable rank of each J_i against its token position i, across the population: every
    prompt's value as a dot, the median as a line, the inter-quartile range as a band; one
    colour per run (``runs``: directories, tables, or a ``{label: run}`` dict). Returns the
    matplotlib ``Figure``."""
    fig, ax = _fig()
    rng = np.random.default_rng(0)
    for c, (label, t) in enumerate(_runs(runs, labels)):
        groups = by_position(t)
        if max_pos is not None:
            groups = {i: v for i, v in groups.items() if i <= max_pos}
        if not groups:
            continue
        color = f"C{c % 10}"
        xs = np.array(list(groups))
        for i, v in groups.items():
            jitter = rng.uniform(-0.12, 0.12, len(v)) + (c - 0.5) * 0.08
            ax.scatter(i + jitter, v, s=6, alpha=0.25, color=color, linewidths=0)
        med = np.array([np.median(v) for v in groups.values()])
        q1 = np.array([np.percentile(v, 25) for v in groups.values()])
        q3 = np.array([np.percentile(v, 75) for v in groups.values()])
        n = len(_ok(t))
        ax.plot(xs, med, "-o", color=color, ms=4, lw=1.5, label=f"{label}: median (n={n})")
        ax.fill_between(xs, q1, q3, color=color, alpha=0.15, lw=0)
    ax.set_xlabel("token position i")
    ax.set_ylabel("stable rank of J_i  (Σ s² / s_max²)")
    ax.set_title(title or "Stable rank by token position")
    ax.set_ylim(bottom=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def error_plot(runs: Sequence[Run] | Mapping[str, Run] | Run,
               labels: Sequence[str] | None = None):
    """Distribution of log10 relative reconstruction errors, one colour per run."""
    fig, ax = _fig((6.5, 3.2))
    for c, (label, t) in enumerate(_runs(runs, labels)):
        e = [r["relative_error"] for r in _ok(t) if r["relative_error"]]
        if e:
            ax.hist(np.log10(np.maximum(e, 1e-300)), bins=30, alpha=0.5, color=f"C{c % 10}",
                    label=label)
    ax.set_xlabel("log10 relative error (detached map)")
    ax.set_ylabel("prompts")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def png_base64(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def summary(t: pa.Table) -> dict[str, Any]:
    """The numbers of one run that the report's table shows."""
    rows = t.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    err = [r["relative_error"] for r in ok if r["relative_error"] is not None]
    hits = [r["prediction_id"] in r["u_stacked_ids"][0] for r in ok
            if r["u_stacked_ids"] and r["u_stacked_ids"][0] is not None]
    srs = [r["stable_rank_stacked"] for r in ok if r["stable_rank_stacked"] is not None]
    return {
        "rows": len(rows), "ok": len(ok), "failed": len(rows) - len(ok),
        "u0_top5_share": (sum(hits) / len(hits)) if hits else math.nan,
        "error_median": float(np.median(err)) if err else math.nan,
        "error_max": float(np.max(err)) if err else math.nan,
        "stacked_stable_rank_median": float(np.median(srs)) if srs else math.nan,
        "median_by_position": {i: float(np.median(v)) for i, v in by_position(t).items()},
    }


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:10px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
code{background:#f6f6f6;padding:0 2px} .u{color:#1a5fb4} img{max-width:100%}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else (f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}")
    return html.escape(str(v))


def _vec(tokens: list | None) -> str:
    if not tokens:
        return "–"
    return " ".join(f"<code>{html.escape(t)}</code>" for t in tokens)


def compare(*runs: Run, out: str | os.PathLike = "compare.html",
            labels: Sequence[str] | None = None, max_prompts: int | None = 200,
            title: str = "lin_lens corpus comparison") -> Path:
    """One self-contained HTML report (no scripts, no network) comparing corpus runs, e.g. two
    model families over the same phrases: a summary table (median stable rank per position,
    share of prompts whose first output singular vector of the stacked operator has the
    predicted token in its top 5, error distribution), the distribution plots as PNGs, and
    each prompt's decoded U₀/U₁/U₂ side by side (prompts joined on their text)."""
    if not runs:
        raise InvalidArgumentError("compare: give at least one run")
    named = _runs(list(runs), labels)
    sums = [(label, summary(t)) for label, t in named]
    parts = [f"<h1>{html.escape(title)}</h1>"]
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _ in sums)
    keys = [("rows", "rows (prompt, position)"), ("ok", "ok"), ("failed", "failed"),
            ("u0_top5_share", "U₀ has the prediction in its top 5 (share)"),
            ("error_median", "relative error, median"), ("error_max", "relative error, max"),
            ("stacked_stable_rank_median", "stacked stable rank, median")]
    body = "".join(f"<tr><th>{html.escape(name)}</th>"
                   + "".join(f"<td class='num'>{_fmt(s[k])}</td>" for _, s in sums) + "</tr>"
                   for k, name in keys)
    parts.append(f"<h2>Summary</h2><table><tr><th></th>{head}</tr>{body}</table>")
    positions = sorted({i for _, s in sums for i in s["median_by_position"]})
    rows = "".join(
        f"<tr><td class='num'>{i}</td>"
        + "".join(f"<td class='num'>{_fmt(s['median_by_position'].get(i, math.nan))}</td>"
                  for _, s in sums) + "</tr>" for i in positions)
    parts.append("<h3>Median stable rank of J_i by token position</h3>"
                 f"<table><tr><th>position</th>{head}</tr>{rows}</table>")
    for name, fig in (("Stable rank by token position", stable_rank_plot(dict(named))),
                      ("Relative errors", error_plot(dict(named)))):
        parts.append(f"<h2>{name}</h2><img alt='{name}' "
                     f"src='data:image/png;base64,{png_base64(fig)}'>")
    parts.append(_side_by_side(named, max_prompts))
    doc = ("<!doctype html>\n<html><head><meta charset='utf-8'>"
           f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
           + "\n".join(parts) + "\n</body></html>\n")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _side_by_side(named: list[tuple[str, pa.Table]], max_prompts: int | None) -> str:
    per_run = []
    order: dict[str, None] = {}
    for _, t in named:
        d: dict[str, dict] = {}
        for r in t.to_pylist():
            d.setdefault(r["text"], r)  # first target position of each prompt
            order.setdefault(r["text"], None)
        per_run.append(d)
    texts = list(order)
    shown = texts if max_prompts is None else texts[:max_prompts]
    head = "<tr><th>prompt</th>" + "".join(
        f"<th>{html.escape(label)}: prediction</th><th>U₀</th><th>U₁</th><th>U₂</th>"
        for label, _ in named) + "</tr>"
    body = []
    for text in shown:
        cells = [f"<td>{html.escape(text)}</td>"]
        for d in per_run:
            r = d.get(text)
            if r is None or r["status"] != "ok":
                msg = "missing" if r is None else r["status"]
                cells.append(f"<td colspan='4'><i>{msg}</i></td>")
                continue
            u = (r["u_stacked_tokens"] or []) + [None] * 3
            cells.append(f"<td><code>{html.escape(r['prediction'])}</code> "
                         f"({r['probability']:.2f})</td>"
                         + "".join(f"<td class='u'>{_vec(u[j])}</td>" for j in range(3)))
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = "" if len(shown) == len(texts) else f"<p>{len(texts) - len(shown)} more not shown.</p>"
    return ("<h2>Decoded singular vectors, side by side</h2><p>Top tokens of the first three "
            "output singular vectors of the stacked operator [J_0 | J_1 | …], decoded through "
            "the final norm and W_U.</p><table>" + head + "".join(body) + "</table>" + more)
