"""Pruning a graph again, at other thresholds, with :mod:`lin_lens.graph.prune`'s rule on its kept
nodes and edges held as edge lists (no ``[N, N]`` matrix, so 200,000 edges cost nothing).

This is what the explorer's threshold sliders do in the page (``static/prune.js`` is the same
rule, line for line), and what :meth:`AttributionGraph.pruned` does in Python:

1. Influence on the graph as given: its edges made non-negative and row-normalised
   (``|A| / Σ_src |A|``, :func:`prune.normalize_abs`), ``infl = w (Â + Â² + …)`` with ``w`` the
   targets' weights; keep the nodes whose influence reaches :func:`prune.find_threshold` at
   ``node_threshold``, and the *always* nodes (token embeddings and targets), whatever.
2. On the sub-graph of kept nodes, :func:`prune.prune_edges`: edges re-normalised there, edge
   scores ``Â[dst, src] · (infl(dst) + w(dst))``, kept while they reach ``edge_threshold``; then
   nodes without an outgoing edge (or, for a *receiver*, without an incoming one) go until
   nothing changes.

As in :func:`attribution_graph`'s last step, except that step 1 there runs on every candidate
node; here it runs on the graph as shown, so ``pruned(t, e)`` can only keep a subset.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lin_lens.errors import InvalidArgumentError
from lin_lens.graph import prune as P


def row_normalized(n: int, dst: Tensor, weight: Tensor) -> Tensor:
    """``|w_e| / Σ_{e' into dst(e)} |w_e'|`` per edge (:func:`prune.normalize_abs` on edges)."""
    a = weight.abs()
    rows = torch.zeros(n, dtype=a.dtype).index_add_(0, dst, a)
    return a / rows.clamp_min(1e-30)[dst]


def influence(n: int, src: Tensor, dst: Tensor, a_norm: Tensor, w: Tensor,
              max_iter: int = 10_000) -> Tensor:
    """``w (Â + Â² + …)`` for a normalised adjacency given by its edges (as
    :func:`prune.influence_dense`: the same power series, stopped when a power vanishes)."""
    def step(p: Tensor) -> Tensor:
        return torch.zeros(n, dtype=p.dtype).index_add_(0, src, p[dst] * a_norm)

    return P._series(step, w, max_iter)


def prune_edges(n: int, src: Tensor, dst: Tensor, weight: Tensor, w: Tensor, always: Tensor,
                receiver: Tensor, node_threshold: float, edge_threshold: float
                ) -> tuple[Tensor, Tensor]:
    """``(node mask [n], edge mask [m])`` of the graph pruned at the two thresholds (module
    docstring). ``src``, ``dst``: edge endpoints ``[m]`` (int64); ``weight`` the edges; ``w``
    the targets' weights ``[n]``; ``always``, ``receiver``: bool masks ``[n]``."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise InvalidArgumentError(f"{name}={v!r} must be in [0, 1]")
    src, dst = src.long().cpu(), dst.long().cpu()
    weight, w = weight.double().cpu(), w.double().cpu()
    always, receiver = always.bool().cpu(), receiver.bool().cpu()
    infl = influence(n, src, dst, row_normalized(n, dst, weight), w)
    node = (infl >= P.find_threshold(infl, node_threshold)) | always
    sub = node[src] & node[dst]
    s, d, x = src[sub], dst[sub], weight[sub]
    a = row_normalized(n, d, x)
    score = a * (influence(n, s, d, a, w) + w)[d]
    # prune_edges thresholds all [K, K] entries; the absent ones are zeros, which sort last and
    # add nothing to the cumulative sum: one zero stands for them all (there is always one,
    # the diagonal)
    kept = (score >= P.find_threshold(torch.cat([score, score.new_zeros(1)]),
                                      edge_threshold)) & (x != 0)
    while True:
        before = node.clone()
        has_out = torch.zeros(n, dtype=torch.bool)
        has_out[s[kept]] = True
        has_in = torch.zeros(n, dtype=torch.bool)
        has_in[d[kept]] = True
        node &= always | has_out
        node &= always | ~receiver | has_in
        kept &= node[s] & node[d]
        if bool((node == before).all()):
            break
    edge = torch.zeros(len(src), dtype=torch.bool)
    edge[sub.nonzero().flatten()[kept]] = True
    return node, edge


def pruned_graph(graph: Any, node_threshold: float, edge_threshold: float) -> Any:
    """An :class:`AttributionGraph` pruned again (see :meth:`AttributionGraph.pruned`)."""
    dst, src = graph.edge_mask.nonzero(as_tuple=True)
    weight = graph.adjacency[dst, src]
    kinds = graph.kinds
    n = graph.n_nodes
    w = torch.zeros(n, dtype=torch.float64)
    w[torch.tensor(graph.targets)] = graph.target["weights"].double().cpu()
    always = torch.tensor([k in ("embed", "target") for k in kinds])
    receiver = torch.tensor([k in ("head", "attn", "neuron", "mlp") for k in kinds])
    node, edge = prune_edges(n, src.cpu(), dst.cpu(), weight.cpu(), w, always, receiver,
                             node_threshold, edge_threshold)
    return subgraph(graph, node, src[edge], dst[edge],
                    {"repruned": [node_threshold, edge_threshold]})


def subgraph(graph: Any, node: Tensor, src: Tensor, dst: Tensor, meta: dict) -> Any:
    """The nodes ``node`` (bool mask) of ``graph`` with only the edges ``src → dst`` kept."""
    keep = node.nonzero().flatten()
    new = {int(o): i for i, o in enumerate(keep.tolist())}
    dev = graph.adjacency.device
    kd = keep.to(dev)
    mask = torch.zeros(len(keep), len(keep), dtype=torch.bool, device=dev)
    if len(src):
        mask[torch.tensor([new[int(d)] for d in dst.tolist()], device=dev),
             torch.tensor([new[int(s)] for s in src.tolist()], device=dev)] = True
    state = graph.state()
    for k in ("node_ids", "kind", "layer", "pos", "index", "value", "total_effect", "influence",
              "cumulative", "incoming_total"):
        state[k] = state[k][keep.to(state[k].device)]
    state.update(
        labels=[graph.labels[i] for i in keep.tolist()],
        adjacency=graph.adjacency[kd][:, kd], edge_mask=mask,
        readouts={new[i]: v for i, v in graph.readouts.items() if i in new},
        top_tokens=None if graph.top_tokens is None else
        {new[i]: v for i, v in graph.top_tokens.items() if i in new},
        qk=None if graph.qk is None else {new[i]: v for i, v in graph.qk.items() if i in new},
        pinned=None if graph.pinned is None else
        [lab for lab in graph.pinned if lab in {graph.labels[i] for i in keep.tolist()}],
        meta={**graph.meta, **meta})
    return type(graph)(**state)
