"""Influence and pruning as circuit-tracer does them (Ameisen et al. 2025, "methods" §pruning).

The adjacency ``A[dst, src]`` is made non-negative and row-normalised (``|A| / Σ_src |A|``); a
node's *influence* on the targets is the sum over all paths of the products of those normalised
weights, weighted by the targets' weights ``w``: ``w (Â + Â² + …)``. Nodes are kept until their
influence, sorted, reaches ``node_threshold`` of the total; edges of the kept sub-graph until
their scores ``Â[dst, src] · (influence(dst) + w(dst))`` reach ``edge_threshold``; then nodes
left without an outgoing edge (or a receiver without an incoming one) go, until nothing changes.
The graph is a DAG in node order, so each power series ends after at most its depth.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lin_lens.errors import LinLensError


def normalize_abs(A: Tensor) -> Tensor:
    """``|A|`` with each row divided by its sum (rows of zeros stay zero)."""
    a = A.abs()
    return a / a.sum(-1, keepdim=True).clamp_min(1e-30)


def _series(step, w: Tensor, max_iter: int) -> Tensor:
    prod, total = w, torch.zeros_like(w)
    for _ in range(max_iter):
        prod = step(prod)
        if not bool(prod.any()):
            return total
        total = total + prod
    raise LinLensError(f"influence did not converge in {max_iter} steps (the graph has a cycle?)")


def influence_dense(A_norm: Tensor, w: Tensor, max_iter: int = 10_000) -> Tensor:
    """``w (Â + Â² + …)`` for a dense normalised adjacency ``[N, N]`` (rows: receivers)."""
    return _series(lambda p: p @ A_norm, w, max_iter)


def influence_sparse(row_nodes: Tensor, cols: Tensor, vals: Tensor, w: Tensor) -> Tensor:
    """The same for rows kept sparse: row ``r`` is node ``row_nodes[r]`` with normalised
    weights ``vals[r]`` on the nodes ``cols[r]``; nodes without a row pass nothing on.

    One sweep in reverse topological order (edges go from lower to higher node ids, so a node's
    influence is complete before its row passes it on): ``infl(v) = Σ_u (infl(u) + w(u)) Â[u,v]``.
    """
    infl = torch.zeros_like(w)
    for r in torch.argsort(row_nodes, descending=True).tolist():
        v = int(row_nodes[r])
        a = infl[v] + w[v]
        if bool(a != 0):
            infl.index_add_(0, cols[r], a * vals[r])
    return infl


def find_threshold(scores: Tensor, threshold: float) -> float:
    """The score at which the sorted scores' cumulative share first reaches ``threshold``."""
    s = torch.sort(scores.reshape(-1), descending=True).values
    total = s.sum()
    if not bool(total > 0):
        return float("inf")
    cum = torch.cumsum(s, 0) / total
    i = min(int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype,
                                                         device=cum.device))), len(s) - 1)
    return float(s[i])


def cumulative_scores(influence: Tensor) -> Tensor:
    """Each node's position in the sorted influence, as the cumulative share reached there
    (circuit-tracer's ``influence`` field: small = among the most influential)."""
    s, order = torch.sort(influence, descending=True)
    total = s.sum()
    cum = torch.cumsum(s, 0) / total if bool(total > 0) else torch.ones_like(s)
    out = torch.empty_like(cum)
    out[order] = cum
    return out


def prune_edges(P: Tensor, w: Tensor, always: Tensor, receiver: Tensor,
                edge_threshold: float) -> tuple[Tensor, Tensor]:
    """Edge and node masks of the kept sub-graph ``P`` [K, K] (exact edges, rows receivers).

    ``w``: target weights on the K nodes; ``always``: nodes kept whatever (embeddings, targets);
    ``receiver``: nodes that must keep an incoming edge (heads, neurons, MLPs).
    """
    Pn = normalize_abs(P)
    infl = influence_dense(Pn, w) + w
    scores = Pn * infl[:, None]
    edge = (scores >= find_threshold(scores, edge_threshold)) & (P != 0)
    node = torch.ones(P.shape[0], dtype=torch.bool, device=P.device)
    while True:
        before = node.clone()
        node &= always | edge.any(0)  # everything else passes something on
        node &= always | ~receiver | edge.any(1)  # a receiver is explained by something
        edge &= node[:, None] & node[None, :]
        if bool((node == before).all()):
            return edge, node
