"""An offline view of an attribution graph: one inline SVG and a few lines of plain JavaScript.

Columns are token positions, rows the stages of the network (embeddings at the bottom, then each
layer's attention and MLP, the targets on top; only rows with a shown node are drawn). Colours:
embeddings grey, constants purple, heads blue, neurons / MLPs orange, targets red; edges blue
(positive) or red (negative), their width the edge's share of its receiver's incoming |edges|.
Hover a node for its numbers; click it to keep only its edges in view. Nothing is loaded from
the network, so the page works from ``file://`` and in a notebook.
"""

from __future__ import annotations

import html
import json
import uuid
from typing import Any

import torch

_COLOURS = {"embed": "#8a8a8a", "pos_embed": "#b0b0b0", "bias": "#9467bd", "head": "#1f77b4",
            "attn": "#1f77b4", "neuron": "#ff7f0e", "mlp": "#ff7f0e", "target": "#d62728"}
_STYLE = """
.llg{font:12px sans-serif;color:#222}.llg svg{background:#fff}
.llg .e{fill:none;stroke-linecap:round}.llg .n{stroke:#333;stroke-width:.6;cursor:pointer}
.llg.picked .e{opacity:.04}.llg.picked .e.hi{opacity:.9}.llg .n.sel{stroke:#000;stroke-width:2}
.llg .info{min-height:1.4em;margin:4px 0;font-family:monospace;white-space:pre}
"""
_SCRIPT = """
(function(){var r=document.getElementById(%s);if(!r)return;var info=r.querySelector('.info');
var es=r.querySelectorAll('.e'),ns=r.querySelectorAll('.n');
function pick(n){var id=n.getAttribute('data-i'),on=n.classList.contains('sel');
ns.forEach(function(m){m.classList.remove('sel')});es.forEach(function(e){e.classList.remove('hi')});
if(on){r.classList.remove('picked');info.textContent='';return}
n.classList.add('sel');r.classList.add('picked');
es.forEach(function(e){if(e.getAttribute('data-s')===id||e.getAttribute('data-t')===id)
e.classList.add('hi')});info.textContent=n.getAttribute('data-info')}
ns.forEach(function(n){n.addEventListener('click',function(){pick(n)})});
r.setAttribute('data-ready','1')})();
"""


def _shown(graph: Any, max_nodes: int) -> list[int]:
    kinds = graph.kinds
    must = [i for i, k in enumerate(kinds) if k in ("embed", "target")]
    rest = [i for i in torch.argsort(graph.influence, descending=True).tolist() if i not in must]
    return sorted(must + rest[:max(0, max_nodes - len(must))])


def _level(kind: str, layer: int, n_layers: int) -> int:
    if kind in ("embed", "pos_embed"):
        return 0
    if kind == "target":
        return 2 * n_layers + 2
    if kind == "bias":
        return 2 * min(layer, n_layers) + 1
    return 2 * layer + (1 if kind in ("head", "attn") else 2)


def graph_svg(graph: Any, max_nodes: int = 150, max_edges: int = 800, col_w: int = 120,
              row_h: int = 22) -> tuple[str, str]:
    """(element id, HTML of the view); see the module docstring."""
    root = f"llg-{uuid.uuid4().hex[:10]}"
    kinds, L = graph.kinds, graph.meta["n_layers"]
    shown = _shown(graph, max_nodes)
    target_pos = int(graph.target["pos"])
    cells: dict[tuple[int, int], list[int]] = {}
    for i in shown:
        p = int(graph.pos[i])
        cells.setdefault((_level(kinds[i], int(graph.layer[i]), L), p if p >= 0 else target_pos),
                         []).append(i)
    levels = sorted({lv for lv, _ in cells})
    row = {lv: k for k, lv in enumerate(reversed(levels))}
    n_pos = len(graph.str_tokens)
    left, top = 70, 14
    width, height = left + n_pos * col_w + 10, top + len(levels) * row_h + 40
    xy: dict[int, tuple[float, float]] = {}
    for (lv, p), members in cells.items():
        gap = min(13.0, (col_w - 16) / max(len(members), 1))
        for j, i in enumerate(sorted(members, key=lambda i: -float(graph.influence[i]))):
            xy[i] = (left + p * col_w + 10 + j * gap, top + row[lv] * row_h + row_h / 2)
    A = graph.adjacency.abs().double().cpu() * graph.edge_mask.cpu()
    share = A / A.sum(1, keepdim=True).clamp_min(1e-300)
    sub = torch.tensor(shown)
    s = share[sub][:, sub]
    dst, src = s.nonzero(as_tuple=True)
    order = s[dst, src].argsort(descending=True)[:max_edges].tolist()
    parts = [f'<svg width="{width}" height="{height}">']
    for lv in levels:
        y = top + row[lv] * row_h + row_h / 2
        name = ("input" if lv == 0 else "target" if lv == 2 * L + 2 else
                "final" if lv == 2 * L + 1 else f"L{(lv - 1) // 2} {'attn' if lv % 2 else 'mlp'}")
        parts.append(f'<text x="4" y="{y + 4:.1f}" fill="#666">{name}</text>'
                     f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#f0f0f0"/>')
    for p, tok in enumerate(graph.str_tokens):
        parts.append(f'<text x="{left + p * col_w + 10}" y="{height - 12}" fill="#333">'
                     f'{html.escape(repr(tok)[1:-1][:14])}</text>')
    for k in order:
        d, a = shown[int(dst[k])], shown[int(src[k])]
        (x1, y1), (x2, y2) = xy[a], xy[d]
        w = float(graph.adjacency[d, a])
        colour = "#2166ac" if w > 0 else "#b2182b"
        width_px = 0.4 + 4.0 * float(s[dst[k], src[k]])
        parts.append(f'<path class="e" data-s="{a}" data-t="{d}" d="M{x1:.1f},{y1:.1f} '
                     f'C{x1:.1f},{(y1 + y2) / 2:.1f} {x2:.1f},{(y1 + y2) / 2:.1f} '
                     f'{x2:.1f},{y2:.1f}" stroke="{colour}" stroke-width="{width_px:.2f}" '
                     f'opacity="0.55"><title>{html.escape(graph.labels[a])} → '
                     f'{html.escape(graph.labels[d])}: {w:+.4g}</title></path>')
    for i in shown:
        x, y = xy[i]
        info = (f"{graph.labels[i]} ({kinds[i]})  value {float(graph.value[i]):+.4g}  "
                f"total effect {float(graph.total_effect[i]):+.4g}  "
                f"influence {float(graph.influence[i]):.3g}")
        r = 6 if kinds[i] in ("embed", "target") else 4.5
        parts.append(f'<circle class="n" data-i="{i}" data-info="{html.escape(info)}" '
                     f'cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{_COLOURS[kinds[i]]}">'
                     f'<title>{html.escape(info)}</title></circle>')
    parts.append("</svg>")
    caption = (f"{html.escape(', '.join(graph.target['labels']))} at position {target_pos}: "
               f"{len(shown)} of {graph.n_nodes} nodes, {len(order)} of {graph.n_edges} edges "
               f"shown (relative error {graph.relative_error:.1e}). Click a node.")
    body = (f'<div class="llg" id="{root}"><style>{_STYLE}</style><div>{caption}</div>'
            f'<div class="info"></div>{"".join(parts)}</div>')
    return root, body


def graph_fragment(graph: Any, **kw: Any) -> str:
    """The view for a notebook cell (inline SVG + script, no network)."""
    root, body = graph_svg(graph, **kw)
    return body + f"<script>{_SCRIPT % json.dumps(root)}</script>"


def graph_page(graph: Any, title: str | None = None, **kw: Any) -> str:
    """A complete, self-contained HTML document of the view."""
    title = title or f"lin_lens attribution graph: {graph.prompt}"
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title></head>\n<body>\n"
            f"<h3>{html.escape(title)}</h3>\n{graph_fragment(graph, **kw)}\n</body></html>\n")
