"""The circuit explorer for attribution graphs (:class:`SparseGraph` packs the data; the page is
:mod:`lin_lens._explorer`'s: one self-contained HTML file, no network).

In the page: nodes by display row (input at the bottom, then each layer's attention and MLP,
the targets on top) and token position, coloured by kind, edges on a canvas; click a node for
its panel (label, value, total effect, incoming and outgoing edges by |weight|, what it writes
decoded to tokens, a head's QK attribution when the graph has one); hover for its strongest
paths to the target; pin nodes into a subgraph (kept in the page when it is saved from the
browser); search labels; node and edge thresholds re-prune in the page with
:mod:`lin_lens.graph.reprune`'s rule.

The page's data: per node, typed arrays as base64 (row, position, value, total effect,
cumulative influence, target weight, pruning flags) and lists of ids and labels; per edge,
int32 endpoints and a float64 weight as base64 (about 21 characters an edge, against about 70
in the JSON file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lin_lens.graph.sparse import SparseGraph


def sparse(graph: Any) -> SparseGraph:
    return graph if isinstance(graph, SparseGraph) else SparseGraph.from_graph(graph)


def explorer_data(graph: Any) -> dict:
    """The page's data for an :class:`AttributionGraph` or a :class:`SparseGraph`."""
    return sparse(graph).explorer_data()


def graph_page(graph: Any, title: str | None = None) -> str:
    """The explorer as one complete HTML document."""
    return sparse(graph).to_html(title)


def graph_fragment(graph: Any) -> str:
    """The explorer for a notebook cell (the page in an ``<iframe srcdoc>``)."""
    return sparse(graph)._repr_html_()


def show(graph: Any, height: int = 760, title: str | None = None) -> Path | None:
    """In a notebook, the explorer as the cell's output; elsewhere opened in the browser."""
    return sparse(graph).show(height, title)
