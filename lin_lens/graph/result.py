"""``AttributionGraph``: the kept nodes, their exact values and the exact edges between them."""

from __future__ import annotations

import heapq
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lin_lens._numeric import relative_error
from lin_lens.errors import InvalidArgumentError, InvalidPositionError, UnknownNodeError
from lin_lens.graph.nodes import KINDS, SOURCES

if TYPE_CHECKING:  # intervene imports this module
    from lin_lens.graph.intervene import Ablation

FORMAT_VERSION = 1
_TENSORS = ("node_ids", "kind", "layer", "pos", "index", "value", "total_effect", "influence",
            "cumulative", "adjacency", "edge_mask", "incoming_total", "tokens")


class AttributionGraph:
    """An exact attribution graph of one prompt (see :func:`lin_lens.attribution_graph`).

    Nodes ``0 … K-1`` (topological order: sources, then layer by layer, targets last):
    ``labels[i]``, ``kinds[i]`` ∈ {embed, pos_embed, bias, head, attn, neuron, mlp, target},
    ``layer`` (-1 for the input, ``n_layers`` for final biases and targets), ``pos`` (-1: a bias,
    which acts at every position), ``index`` (head, neuron, token id of an embedding or logit).

    ``adjacency[b, a]`` is the exact edge a → b (all kept pairs, ``[K, K]``); ``edge_mask`` marks
    the edges kept by pruning. ``value``: each node's scalar value; ``incoming_total``: the sum of
    its incoming edges over *every* node of the full graph (NaN for sources), equal to ``value``
    to rounding; the part from pruned nodes is ``value - adjacency.sum(1)``. ``total_effect``:
    effect on the objective J over all paths. ``influence``: circuit-tracer's influence on the
    targets; ``cumulative``: its cumulative share (the JSON's ``influence``). ``readouts[i]``: for
    head / attention / MLP nodes, the vector (∂J/∂output) their value reads their output with.

    For reading (the explorer, the JSON file): ``top_tokens[i]``, what node i writes decoded to
    tokens (``lin_lens.graph.node_writes``: a dict of ``TokenList`` fields; None where not
    computed); ``qk[i]``, a head's QK attribution in Neuronpedia's ``qk_tracing_results`` form
    (node ids as in the JSON), with ``qk_only_nodes`` describing contributors that are not kept
    nodes; ``pinned``, labels of the nodes pinned into the reader's subgraph (None: the
    strongest paths' nodes).
    """

    def __init__(self, *, node_ids: Int[Tensor, " K"], kind: Int[Tensor, " K"],
                 layer: Int[Tensor, " K"], pos: Int[Tensor, " K"], index: Int[Tensor, " K"],
                 labels: list[str], value: Float[Tensor, " K"], total_effect: Float[Tensor, " K"],
                 influence: Float[Tensor, " K"], cumulative: Float[Tensor, " K"],
                 adjacency: Float[Tensor, "K K"], edge_mask: Bool[Tensor, "K K"],
                 incoming_total: Float[Tensor, " K"], readouts: dict[int, Float[Tensor, " d"]],
                 tokens: Int[Tensor, " n_src"], str_tokens: list[str], prompt: str,
                 target: dict[str, Any], meta: dict[str, Any],
                 top_tokens: dict[int, dict] | None = None, qk: dict[int, dict] | None = None,
                 qk_only_nodes: dict[str, dict] | None = None, pinned: list[str] | None = None):
        self.node_ids, self.kind, self.layer = node_ids, kind, layer
        self.pos, self.index, self.labels = pos, index, labels
        self.value, self.total_effect = value, total_effect
        self.influence, self.cumulative = influence, cumulative
        self.adjacency, self.edge_mask, self.incoming_total = adjacency, edge_mask, incoming_total
        self.readouts, self.tokens = readouts, tokens
        self.str_tokens, self.prompt = str_tokens, prompt
        self.target: dict[str, Any] = target
        self.meta = meta
        self.top_tokens, self.qk, self.qk_only_nodes = top_tokens, qk, qk_only_nodes
        self.pinned = pinned

    # -- basic facts ------------------------------------------------------------------------
    @property
    def kinds(self) -> list[str]:
        return [KINDS[k] for k in self.kind.tolist()]

    @property
    def n_nodes(self) -> int:
        return len(self.labels)

    @property
    def n_edges(self) -> int:
        return int(self.edge_mask.sum())

    @property
    def hook(self) -> str:
        return self.target["hook"]

    @property
    def targets(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == "target"]

    @property
    def relative_error(self) -> float:
        """‖T − Σ‖ / ‖T‖, how far the targets are from the sum of their incoming edges."""
        t = torch.tensor(self.targets)
        return relative_error(self.value[t], self.incoming_total[t])

    def node_errors(self) -> dict[str, float]:
        """Per receiving kind: ‖value − incoming_total‖ / ‖value‖ over the kept nodes."""
        out = {}
        kinds = self.kinds
        for k in sorted(set(kinds) - set(SOURCES)):
            idx = torch.tensor([i for i, kk in enumerate(kinds) if kk == k])
            out[k] = relative_error(self.value[idx], self.incoming_total[idx])
        return out

    def target_values(self, act: Float[Tensor, "1 pos *d"]) -> Float[Tensor, " k"]:
        """The targets ``[k]`` read from an activation ``[1, pos, ...]`` at the target hook."""
        row = act[0, self.target["pos"]].reshape(-1)
        if self.target["ids"] is not None:
            return row[self.target["ids"]]
        return (row * self.target["direction"].to(row)).sum().reshape(1)

    def index_of(self, key: int | str) -> int:
        """A node by local index, label (``"L3H5@7"``) or circuit-tracer node id."""
        if isinstance(key, int):
            if not -self.n_nodes <= key < self.n_nodes:
                raise InvalidPositionError(f"node {key} out of range ({self.n_nodes} nodes)")
            return key % self.n_nodes
        if key in self.labels:
            return self.labels.index(key)
        from lin_lens.graph.export import json_node_ids

        ids = json_node_ids(self)
        if key in ids:
            return ids.index(key)
        close = [lab for lab in self.labels if key.split("@")[0] in lab][:5]
        raise UnknownNodeError(f"no node {key!r} in this graph ({self.n_nodes} kept nodes)"
                       + (f"; similar: {', '.join(close)}" if close else ""))

    # -- edges and paths --------------------------------------------------------------------
    def edges(self, top: int | None = None) -> list[tuple[str, str, float]]:
        """Kept edges (source label, target label, weight), strongest first."""
        dst, src = self.edge_mask.nonzero(as_tuple=True)
        w = self.adjacency[dst, src]
        order = w.abs().argsort(descending=True)[:top]
        return [(self.labels[int(src[i])], self.labels[int(dst[i])], float(w[i])) for i in order]

    def incoming(self, node: int | str) -> list[tuple[str, float]]:
        i = self.index_of(node)
        src = self.edge_mask[i].nonzero().flatten()
        w = self.adjacency[i, src]
        return [(self.labels[int(s)], float(x)) for s, x in
                sorted(zip(src, w, strict=True), key=lambda p: -abs(float(p[1])))]

    def outgoing(self, node: int | str) -> list[tuple[str, float]]:
        i = self.index_of(node)
        dst = self.edge_mask[:, i].nonzero().flatten()
        w = self.adjacency[dst, i]
        return [(self.labels[int(d)], float(x)) for d, x in
                sorted(zip(dst, w, strict=True), key=lambda p: -abs(float(p[1])))]

    def top_paths(self, k: int = 5, through: str | None = None) -> list[tuple[float, list[str]]]:
        """The ``k`` strongest source → target paths over kept edges.

        A path's strength is the product of its edges' shares of their receiver's incoming
        ``|edges|`` (times the target's weight): the terms whose sum is circuit-tracer's
        influence. ``through``: only paths through a node of this kind (e.g. ``"neuron"``).
        """
        A = self.adjacency.abs().double().cpu() * self.edge_mask.cpu()
        share = A / A.sum(1, keepdim=True).clamp_min(1e-300)
        w = torch.zeros(self.n_nodes, dtype=torch.float64)
        w[torch.tensor(self.targets)] = self.target["weights"].double().cpu()
        kinds = self.kinds
        dst, src = share.nonzero(as_tuple=True)
        out: list[list[tuple[int, float]]] = [[] for _ in range(self.n_nodes)]
        for d, a, x in zip(dst.tolist(), src.tolist(), share[dst, src].tolist(), strict=True):
            out[a].append((d, x))
        # best[flag][v]: the k strongest paths v → target, flag = already through the kind
        best: list[list[list[tuple[float, tuple[int, ...]]]]] = [
            [[] for _ in range(self.n_nodes)] for _ in range(2)]
        for v in reversed(range(self.n_nodes)):
            hit = through is None or kinds[v] == through
            cands: list[list[tuple[float, tuple[int, ...]]]] = [[], []]
            if w[v] > 0:
                cands[hit].append((float(w[v]), (v,)))
            for u, x in out[v]:
                for flag in (0, 1):
                    cands[flag or hit] += [(x * sc, (v, *p)) for sc, p in best[flag][u]]
            for flag in (0, 1):
                best[flag][v] = heapq.nlargest(k, cands[flag], key=lambda c: c[0])
        paths = [c for i in range(self.n_nodes) if kinds[i] in SOURCES for c in best[1][i]]
        return [(sc, [self.labels[j] for j in p])
                for sc, p in heapq.nlargest(k, paths, key=lambda c: c[0])]

    # -- interventions, export, display -------------------------------------------------------
    def ablate(self, model: Any, node: int | str, receiver: int | str | None = None
               ) -> Ablation:
        """Zero ``node``'s output and measure the change (``lin_lens.graph.intervene.ablate``)."""
        from lin_lens.graph.intervene import ablate

        return ablate(model, self, node, receiver)

    def save_json(self, path: str | Path, slug: str | None = None, **kw: Any) -> Path:
        """circuit-tracer's graph file (schema version 1); see :mod:`lin_lens.graph.export`."""
        from lin_lens.graph.export import save_json

        return save_json(self, path, slug, **kw)

    def pruned(self, node_threshold: float = 0.8, edge_threshold: float = 0.98
               ) -> AttributionGraph:
        """This graph pruned again at other thresholds: circuit-tracer's rule (as
        :func:`attribution_graph` applies it) on the kept nodes and edges, the rule the
        explorer's sliders apply in the page (:mod:`lin_lens.graph.reprune`). A new graph;
        edges, values and influences are this one's, unchanged."""
        from lin_lens.graph.reprune import pruned_graph

        return pruned_graph(self, node_threshold, edge_threshold)

    def pin(self, *nodes: int | str) -> AttributionGraph:
        """Pin nodes (labels, JSON ids or indices) into the reader's subgraph, kept in the
        saved page and the JSON's ``pinnedIds``; returns self."""
        pins = list(self.pinned or [])
        for lab in (self.labels[self.index_of(n)] for n in nodes):
            if lab not in pins:
                pins.append(lab)
        self.pinned = pins
        return self

    def to_sparse(self) -> Any:
        """The kept nodes and edges as edge lists (:class:`lin_lens.graph.SparseGraph`)."""
        from lin_lens.graph.sparse import SparseGraph

        return SparseGraph.from_graph(self)

    def to_html(self, **kw: Any) -> str:
        """The explorer, one self-contained page (``lin_lens.graph.view.graph_page``)."""
        from lin_lens.graph.view import graph_page

        return graph_page(self, **kw)

    def save_html(self, path: str | Path, **kw: Any) -> Path:
        """Write :meth:`to_html` to ``path``: it works from ``file://``, with no network."""
        path = Path(path)
        path.write_text(self.to_html(**kw), encoding="utf-8")
        return path

    def show(self, **kw: Any) -> Path | None:
        """Open the explorer: in a notebook as the cell's output, elsewhere in the browser."""
        from lin_lens.graph.view import show

        return show(self, **kw)

    def _repr_html_(self) -> str:
        from lin_lens.graph.view import graph_fragment

        return graph_fragment(self)

    # -- persistence --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}

    def save(self, path: str | Path) -> Path:
        """``torch.save`` of every field (load with :meth:`load`)."""
        path = Path(path)
        torch.save({"format": "lin_lens.AttributionGraph", "version": FORMAT_VERSION,
                    **self.state()}, path)
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: Any = "cpu") -> AttributionGraph:
        """A graph written by :meth:`save`. Only tensors and plain data are unpickled
        (``weights_only=True``), so a file someone sent cannot run code; files of another
        format or of a later format version are refused."""
        try:
            d = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, …
            raise InvalidArgumentError(
                f"{str(path)!r} is not a lin_lens AttributionGraph file, or holds more than "
                f"tensors and plain data (refused: loading it could run code): {e}") from None
        if not isinstance(d, dict) or d.pop("format", None) != "lin_lens.AttributionGraph":
            raise InvalidArgumentError(f"{str(path)!r}: not a saved lin_lens AttributionGraph")
        version = d.pop("version", None)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise InvalidArgumentError(
                f"{str(path)!r} has format version {version!r}; this lin_lens reads up to "
                f"{FORMAT_VERSION}: upgrade lin_lens")
        params = inspect.signature(cls.__init__).parameters
        known = set(params) - {"self"}
        missing = {k for k in known if params[k].default is inspect.Parameter.empty} - d.keys()
        if missing:
            raise InvalidArgumentError(f"{str(path)!r} lacks the fields {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to(self, device: Any) -> AttributionGraph:
        """Move every tensor to ``device`` (in place; returns self)."""
        for k in _TENSORS:
            setattr(self, k, getattr(self, k).to(device))
        self.readouts = {i: v.to(device) for i, v in self.readouts.items()}
        self.target = {k: v.to(device) if isinstance(v, Tensor) else v
                       for k, v in self.target.items()}
        return self

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for k in self.kinds:
            counts[k] = counts.get(k, 0) + 1
        return {"prompt": self.prompt, "target": ", ".join(self.target["labels"]),
                "target value": [round(float(v), 6) for v in self.target["value"]],
                "nodes": counts, "edges": self.n_edges,
                "relative error": self.relative_error,
                "candidate nodes": self.meta.get("n_candidates"),
                "rows computed": self.meta.get("rows_computed"),
                "seconds": self.meta.get("seconds")}

    def __repr__(self) -> str:
        s = self.summary()
        return (f"AttributionGraph({s['target']!r} at pos {self.target['pos']}: {self.n_nodes} "
                f"nodes, {self.n_edges} edges, relative error {s['relative error']:.1e})")
