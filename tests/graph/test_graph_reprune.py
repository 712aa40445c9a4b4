"""Pruning a built graph again (``AttributionGraph.pruned``, ``SparseGraph.pruned``): the edge-list
rule of :mod:`lin_lens.graph.reprune` is :mod:`lin_lens.graph.prune`'s dense rule, node for node
and edge for edge (the page's sliders run the same rule; tests/explorer checks the counts)."""

from __future__ import annotations

import pytest
import torch

from lin_lens.errors import InvalidArgumentError, LinLensError
from lin_lens.graph import prune as P
from lin_lens.graph import reprune
from tests.graph.graph_cases import PAIR, full_graph, pruned_graph

THRESHOLDS = [(0.8, 0.98), (0.5, 0.9), (0.95, 0.6), (1.0, 1.0), (0.3, 0.3), (0.0, 0.0)]


def dense_rule(A: torch.Tensor, w: torch.Tensor, always: torch.Tensor, receiver: torch.Tensor,
               nt: float, et: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule written with prune.py's dense functions, as attribution_graph applies them."""
    infl = P.influence_dense(P.normalize_abs(A), w)
    keep = (infl >= P.find_threshold(infl, nt)) | always
    sel = keep.nonzero().flatten()
    edge, node = P.prune_edges(A[sel][:, sel], w[sel], always[sel], receiver[sel], et)
    nodes = torch.zeros(len(A), dtype=torch.bool)
    nodes[sel[node]] = True
    edges = torch.zeros_like(A, dtype=torch.bool)
    edges[sel[:, None], sel[None, :]] = edge
    return nodes, edges


def _dag(n: int, seed: int, density: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return torch.tril(A, -1) * (torch.rand(n, n, generator=g, dtype=torch.float64) < density)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("nt,et", THRESHOLDS)
def test_edge_lists_follow_the_dense_rule(seed, nt, et):
    n = 60
    A = _dag(n, seed)
    w = torch.zeros(n, dtype=torch.float64)
    w[-3:] = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    always = torch.zeros(n, dtype=torch.bool)
    always[:5] = True
    always[-3:] = True
    receiver = ~always
    receiver[5:10] = False  # sources that are not kept whatever (biases, error nodes)
    A[5:10] = 0
    dst, src = A.nonzero(as_tuple=True)
    node, edge = reprune.prune_edges(n, src, dst, A[dst, src], w, always, receiver, nt, et)
    want_node, want_edge = dense_rule(A, w, always, receiver, nt, et)
    assert torch.equal(node, want_node)
    assert torch.equal(edge, want_edge[dst, src])


def test_influence_on_edge_lists_is_the_power_series():
    A = _dag(40, 7)
    w = torch.zeros(40, dtype=torch.float64)
    w[-1] = 1.0
    dst, src = A.nonzero(as_tuple=True)
    a = reprune.row_normalized(40, dst, A[dst, src])
    got = reprune.influence(40, src, dst, a, w)
    assert torch.allclose(got, P.influence_dense(P.normalize_abs(A), w), rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend,arch", PAIR)
@pytest.mark.parametrize("nt,et", [(0.8, 0.98), (0.6, 0.9), (0.9, 0.7)])
def test_graph_pruned_again(backend, arch, nt, et):
    g = full_graph(backend, arch)
    h = g.pruned(nt, et)
    kinds = g.kinds
    A = g.adjacency.double().cpu() * g.edge_mask.cpu()
    w = torch.zeros(g.n_nodes, dtype=torch.float64)
    w[g.targets] = g.target["weights"].double().cpu()
    always = torch.tensor([k in ("embed", "target") for k in kinds])
    receiver = torch.tensor([k in ("head", "attn", "neuron", "mlp") for k in kinds])
    node, edge = dense_rule(A, w, always, receiver, nt, et)
    assert h.labels == [g.labels[i] for i in node.nonzero().flatten().tolist()]
    assert h.n_edges == int(edge.sum()) and h.n_nodes < g.n_nodes
    keep = node.nonzero().flatten()
    assert torch.equal(h.edge_mask.cpu(), edge[keep][:, keep])
    assert torch.equal(h.adjacency, g.adjacency[keep][:, keep])  # edges unchanged
    assert torch.equal(h.value, g.value[keep]) and h.target == g.target
    assert h.meta["repruned"] == [nt, et]
    assert set(h.top_tokens) <= set(range(h.n_nodes))
    lab = h.labels[next(iter(h.top_tokens))]
    assert h.top_tokens[h.labels.index(lab)] == g.top_tokens[g.labels.index(lab)]
    # the sparse form gives the same graph
    s = g.to_sparse().pruned(nt, et)
    assert s.labels == h.labels and s.n_edges == h.n_edges


def test_pruned_keeps_the_kept_ones_and_checks_thresholds():
    g = pruned_graph(*PAIR[0].values)
    h = g.pruned(0.5, 0.5)
    assert {"embed", "target"} <= set(h.kinds)
    assert h.kinds.count("embed") == g.kinds.count("embed")
    assert h.pruned(0.5, 0.5).n_nodes <= h.n_nodes
    for bad in ((1.5, 0.9), (0.8, -0.1)):
        with pytest.raises(InvalidArgumentError, match="threshold") as e:
            g.pruned(*bad)
        assert isinstance(e.value, LinLensError)
