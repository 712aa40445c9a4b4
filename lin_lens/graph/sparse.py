"""``SparseGraph``: an attribution graph's kept nodes and edges as flat arrays, whatever made it.

The explorer's one input, and what :func:`lin_lens.graph.load_json` returns for a graph file
(lin_lens's own export or circuit-tracer's, transcoder and error nodes included). From an
:class:`AttributionGraph` it is :meth:`SparseGraph.from_graph` (``graph.to_sparse()``); the
edges are the kept ones (``edge_mask``), so 200,000 edges take a few megabytes, not ``[N, N]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lin_lens import _explorer as page_
from lin_lens.errors import InvalidPositionError, UnknownNodeError
from lin_lens.graph import reprune

# node groups: what the explorer colours and how pruning treats a node
GROUPS = ("embed", "pos_embed", "bias", "head", "attn", "neuron", "mlp", "feature", "error",
          "target", "other")
RECEIVERS = ("head", "attn", "neuron", "mlp", "feature")  # must keep an incoming edge


@dataclass
class SparseGraph:
    """Nodes ``0 … n-1`` and edges ``src[e] → dst[e]`` of weight ``weight[e]``.

    Per node: ``ids`` (the graph file's node ids), ``labels`` (short names such as
    ``"L3H5@7"``, ``"L12F3571@4"``), ``groups`` (one of ``GROUPS``), ``types`` (the file's
    ``feature_type``), ``row`` (display level, input 0 up to the targets), ``pos`` (token
    position), ``value``, ``total_effect`` (NaN where unknown), ``cumulative`` (circuit-tracer's
    cumulative influence share), ``target_weight`` (non-zero on targets), ``always`` (kept by
    any pruning: token embeddings and targets), ``receiver`` (must keep an incoming edge),
    ``notes`` (a free-text description: circuit-tracer's ``clerp``). ``top_tokens``: node →
    what it writes, decoded; ``qk``: head node → ``qk_tracing_results``; ``pinned``: nodes of
    the reader's subgraph.
    """

    ids: list[str]
    labels: list[str]
    groups: list[str]
    types: list[str]
    row: Tensor
    pos: Tensor
    value: Tensor
    total_effect: Tensor
    cumulative: Tensor
    target_weight: Tensor
    always: Tensor
    receiver: Tensor
    src: Tensor
    dst: Tensor
    weight: Tensor
    tokens: list[str]
    prompt: str
    row_names: dict[int, str]
    meta: dict = field(default_factory=dict)
    notes: list[str] | None = None
    top_tokens: dict[int, dict] = field(default_factory=dict)
    qk: dict[int, dict] = field(default_factory=dict)
    qk_only_nodes: dict[str, dict] = field(default_factory=dict)
    pinned: list[int] = field(default_factory=list)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_graph(cls, graph: Any) -> SparseGraph:
        """The kept nodes and kept edges of an :class:`~lin_lens.AttributionGraph`."""
        from lin_lens.graph.export import json_node_ids

        kinds = graph.kinds
        n_layers = graph.meta["n_layers"]
        n = graph.n_nodes
        dst, src = graph.edge_mask.nonzero(as_tuple=True)
        w = torch.zeros(n, dtype=torch.float64)
        w[torch.tensor(graph.targets)] = graph.target["weights"].double().cpu()
        t_pos = int(graph.target["pos"])
        rows = [level(k, int(graph.layer[i]), n_layers) for i, k in enumerate(kinds)]
        pinned = graph.pinned
        if pinned is None:
            pinned = []
            for _, path in graph.top_paths(3):
                pinned += [lab for lab in path if lab not in pinned]
        index = {lab: i for i, lab in enumerate(graph.labels)}
        t = graph.target
        return cls(
            ids=json_node_ids(graph), labels=list(graph.labels), groups=list(kinds),
            types=list(kinds), row=torch.tensor(rows),
            pos=torch.where(graph.pos.cpu() >= 0, graph.pos.cpu(), t_pos),
            value=graph.value.double().cpu(), total_effect=graph.total_effect.double().cpu(),
            cumulative=graph.cumulative.double().cpu(), target_weight=w,
            always=torch.tensor([k in ("embed", "target") for k in kinds]),
            receiver=torch.tensor([k in RECEIVERS for k in kinds]),
            src=src.cpu(), dst=dst.cpu(), weight=graph.adjacency[dst, src].double().cpu(),
            tokens=list(graph.str_tokens), prompt=graph.prompt,
            row_names=row_names(set(rows), n_layers, lin_lens=True),
            meta={"source": "lin_lens", "exact": True, "model": graph.meta.get("model"),
                  "dtype": graph.meta.get("dtype"), "backend": graph.meta.get("backend"),
                  "target": list(t["labels"]), "target_pos": t_pos, "hook": t["hook"],
                  "relative_error": graph.relative_error,
                  "node_threshold": graph.meta.get("node_threshold"),
                  "edge_threshold": graph.meta.get("edge_threshold"),
                  "repruned": graph.meta.get("repruned")},
            top_tokens=dict(graph.top_tokens or {}), qk=dict(graph.qk or {}),
            qk_only_nodes=dict(graph.qk_only_nodes or {}),
            pinned=[index[lab] for lab in pinned if lab in index])

    # -- facts ------------------------------------------------------------------------------
    @property
    def n_nodes(self) -> int:
        return len(self.ids)

    @property
    def n_edges(self) -> int:
        return len(self.src)

    @property
    def targets(self) -> list[int]:
        return [i for i, g in enumerate(self.groups) if g == "target"]

    def index_of(self, key: int | str) -> int:
        """A node by index, label or node id."""
        if isinstance(key, int):
            if not -self.n_nodes <= key < self.n_nodes:
                raise InvalidPositionError(f"node {key} out of range ({self.n_nodes} nodes)")
            return key % self.n_nodes
        for names in (self.labels, self.ids):
            if key in names:
                return names.index(key)
        raise UnknownNodeError(f"no node {key!r} in this graph ({self.n_nodes} nodes)")

    def _edges(self, mask: Tensor, other: Tensor) -> list[tuple[str, float]]:
        idx = mask.nonzero().flatten()
        order = self.weight[idx].abs().argsort(descending=True, stable=True)
        return [(self.labels[int(other[idx[o]])], float(self.weight[idx[o]])) for o in order]

    def incoming(self, node: int | str) -> list[tuple[str, float]]:
        """(source label, weight) of the node's incoming edges, strongest first."""
        return self._edges(self.dst == self.index_of(node), self.src)

    def outgoing(self, node: int | str) -> list[tuple[str, float]]:
        """(receiver label, weight) of the node's outgoing edges, strongest first."""
        return self._edges(self.src == self.index_of(node), self.dst)

    def edges(self, top: int | None = None) -> list[tuple[str, str, float]]:
        order = self.weight.abs().argsort(descending=True, stable=True)[:top]
        return [(self.labels[int(self.src[e])], self.labels[int(self.dst[e])],
                 float(self.weight[e])) for e in order]

    # -- pruning ----------------------------------------------------------------------------
    def pruned(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> SparseGraph:
        """Pruned again at other thresholds (:mod:`lin_lens.graph.reprune`'s rule, the one the
        explorer's sliders apply)."""
        node, edge = reprune.prune_edges(self.n_nodes, self.src, self.dst, self.weight,
                                         self.target_weight, self.always, self.receiver,
                                         node_threshold, edge_threshold)
        return self.subset(node, edge, repruned=[node_threshold, edge_threshold])

    def subset(self, node: Tensor, edge: Tensor, **meta: Any) -> SparseGraph:
        """The nodes ``node`` (bool mask) with the edges ``edge`` (bool mask, both ends kept)."""
        keep = node.nonzero().flatten()
        new = torch.full((self.n_nodes,), -1, dtype=torch.long)
        new[keep] = torch.arange(len(keep))
        k = keep.tolist()
        remap = {i: j for j, i in enumerate(k)}
        return replace(
            self, ids=[self.ids[i] for i in k], labels=[self.labels[i] for i in k],
            groups=[self.groups[i] for i in k], types=[self.types[i] for i in k],
            notes=None if self.notes is None else [self.notes[i] for i in k],
            **{f: getattr(self, f)[keep] for f in ("row", "pos", "value", "total_effect",
                                                   "cumulative", "target_weight", "always",
                                                   "receiver")},
            src=new[self.src[edge]], dst=new[self.dst[edge]], weight=self.weight[edge],
            top_tokens={remap[i]: v for i, v in self.top_tokens.items() if i in remap},
            qk={remap[i]: v for i, v in self.qk.items() if i in remap},
            pinned=[remap[i] for i in self.pinned if i in remap],
            meta={**self.meta, **meta})

    # -- display (the explorer's page, lin_lens._explorer) -----------------------------------
    def explorer_data(self) -> dict:
        """The page's data (see :mod:`lin_lens.graph.view`)."""
        types = sorted(set(self.types))
        code = {t: i for i, t in enumerate(types)}
        b64, tdt = page_.b64, ("u1", "u1") if len(types) < 256 else ("<i4", "i4")
        meta = {k: v for k, v in self.meta.items() if v is not None}
        return {
            "kind": "graph",
            "meta": {**meta, "prompt": self.prompt, "tokens": self.tokens,
                     "row_names": {str(r): name for r, name in self.row_names.items()}},
            "nodes": {
                "n": self.n_nodes, "id": self.ids, "label": self.labels, "groups": list(GROUPS),
                "group": b64([GROUPS.index(x) for x in self.groups], "u1"),
                "types": types, "type": b64([code[t] for t in self.types], tdt[0]),
                "type_dtype": tdt[1], "row": b64(self.row, "<i4"), "pos": b64(self.pos, "<i4"),
                "value": b64(self.value, "<f8"), "effect": b64(self.total_effect, "<f8"),
                "cum": b64(self.cumulative, "<f8"), "tw": b64(self.target_weight, "<f8"),
                "always": b64(self.always, "u1"), "receiver": b64(self.receiver, "u1"),
                "note": self.notes if self.notes and any(self.notes) else None,
                "writes": {str(i): [t["tokens"], t["scores"], t["neg_tokens"], t["neg_scores"]]
                           for i, t in self.top_tokens.items()},
                "qk": {str(i): q for i, q in self.qk.items()},
            },
            "qk_only_nodes": self.qk_only_nodes,
            "edges": {"m": self.n_edges, "src": b64(self.src, "<i4"),
                      "dst": b64(self.dst, "<i4"), "w": b64(self.weight, "<f8")},
        }

    def to_html(self, title: str | None = None) -> str:
        """The explorer, one self-contained page (pins in its saved state)."""
        if title is None:
            what = "lin_lens attribution graph" if self.meta.get("source") == "lin_lens" \
                else f"{self.meta.get('source', 'attribution')} graph"
            title = f"{what}: {self.prompt}" if self.prompt else what
        return page_.page(self.explorer_data(), title,
                          state={"pinned": [self.ids[i] for i in self.pinned]})

    def save_html(self, path: str | Path, title: str | None = None) -> Path:
        """Write :meth:`to_html` to ``path`` (works from ``file://``, with no network)."""
        return page_.write(self.to_html(title), path)

    def show(self, height: int = 760, title: str | None = None) -> Path | None:
        """In a notebook, the explorer as the cell's output; elsewhere opened in the browser."""
        return page_.show(self.to_html(title), height)

    def _repr_html_(self) -> str:
        return page_.frame(self.to_html())

    def __repr__(self) -> str:
        return (f"SparseGraph({self.meta.get('source', '?')}, {self.prompt!r}: {self.n_nodes} "
                f"nodes, {self.n_edges} edges)")


def level(kind: str, layer: int, n_layers: int) -> int:
    """Display row of a node: input 0, layer l's attention 2l+1 and MLP 2l+2, targets on top
    (a bias on its layer's attention row, the final ones on their own row)."""
    if kind in ("embed", "pos_embed"):
        return 0
    if kind == "target":
        return 2 * n_layers + 3
    if kind == "bias":
        return 2 * min(layer, n_layers) + 1
    return 2 * layer + (1 if kind in ("head", "attn") else 2)


def row_names(rows: set[int], n_layers: int, lin_lens: bool) -> dict[int, str]:
    """Names of the display rows in use."""
    out = {}
    for r in sorted(rows):
        if r == 0:
            out[r] = "input"
        elif r >= 2 * n_layers + 3:
            out[r] = "target" if lin_lens else "logits"
        elif r == 2 * n_layers + 1:
            out[r] = "final"
        elif lin_lens:
            out[r] = f"L{(r - 1) // 2} {'attn' if r % 2 else 'mlp'}"
        else:
            out[r] = f"L{(r - 1) // 2}" + (" attn" if r % 2 else "")
    return out
