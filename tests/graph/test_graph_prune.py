"""Pruning as circuit-tracer prunes, computing only the rows it needs; kept edges stay exact."""

from __future__ import annotations

import pytest
import torch

from lin_lens.graph import attribution_graph
from lin_lens.graph import prune as P
from tests.graph.graph_cases import PAIR, TOKENS, full_graph, model, pruned_graph


def _dag(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = torch.tril(A, -1) * (torch.rand(n, n, generator=g, dtype=torch.float64) < 0.4)
    return A  # rows receive from lower ids only


def test_influence_is_the_power_series():
    A = _dag(40)
    An = P.normalize_abs(A)
    w = torch.zeros(40, dtype=torch.float64)
    w[-2:] = torch.tensor([0.7, 0.3], dtype=torch.float64)
    series = sum(w @ torch.linalg.matrix_power(An, k) for k in range(1, 41))
    assert torch.allclose(P.influence_dense(An, w), series, atol=1e-14)
    k = 40
    top = torch.topk(An, k, dim=1)
    assert torch.allclose(P.influence_sparse(torch.arange(40), top.indices, top.values, w), series,
                          atol=1e-14)


def test_thresholds_and_cumulative_scores():
    s = torch.tensor([5.0, 3.0, 1.0, 1.0], dtype=torch.float64)
    assert P.find_threshold(s, 0.5) == 5.0
    assert P.find_threshold(s, 0.8) == 3.0
    assert P.find_threshold(s, 1.0) == 1.0
    assert P.find_threshold(torch.zeros(3), 0.8) == float("inf")
    assert torch.allclose(P.cumulative_scores(s), torch.tensor([0.5, 0.8, 0.9, 1.0],
                                                               dtype=torch.float64)) or \
        torch.allclose(P.cumulative_scores(s), torch.tensor([0.5, 0.8, 1.0, 0.9],
                                                            dtype=torch.float64))


@pytest.mark.parametrize("backend,arch", PAIR)
def test_pruned_graph_is_a_subgraph_with_exact_edges(backend, arch):
    full, g = full_graph(backend, arch), pruned_graph(backend, arch)
    assert g.n_nodes < full.n_nodes and 0 < g.n_edges < full.n_edges
    ids = g.node_ids.tolist()
    pos = [full.node_ids.tolist().index(i) for i in ids]
    sub = full.adjacency[pos][:, pos]
    assert torch.allclose(g.adjacency, sub, rtol=0, atol=1e-13)  # exact, not approximations
    assert torch.equal(g.value, full.value[pos])
    recv = [i for i, k in enumerate(g.kinds) if k in ("head", "neuron", "target")]
    assert torch.allclose(g.incoming_total[recv], g.value[recv], rtol=0, atol=1e-12)
    # circuit-tracer's rules hold on the kept edges
    kinds = g.kinds
    for i, k in enumerate(kinds):
        if k not in ("embed", "target"):
            assert g.edge_mask[:, i].any(), f"{g.labels[i]} passes nothing on"
        if k in ("head", "neuron"):
            assert g.edge_mask[i].any(), f"{g.labels[i]} receives nothing"
    assert set(kinds) >= {"embed", "target"} and kinds.count("embed") == len(TOKENS)
    # the same influence as circuit-tracer's on the complete graph (every row was computed)
    assert g.meta["rows_computed"] >= len(recv)


@pytest.mark.parametrize("backend,arch", PAIR)
def test_influence_matches_the_complete_graph(backend, arch):
    full, g = full_graph(backend, arch), pruned_graph(backend, arch)
    w = torch.zeros(full.n_nodes, dtype=torch.float64)
    w[full.targets] = full.target["weights"].double().cpu()
    infl = P.influence_dense(P.normalize_abs(full.adjacency.double().cpu()), w)
    ids = full.node_ids.tolist()
    pos = [ids.index(i) for i in g.node_ids.tolist()]
    assert torch.allclose(g.influence.double(), infl[pos].float().double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend,arch", PAIR)
def test_thresholds_and_budget_are_configurable(backend, arch):
    m = model(backend, arch)
    small = attribution_graph(m, TOKENS, node_threshold=0.3, edge_threshold=0.5)
    default = pruned_graph(backend, arch)
    assert small.n_nodes < default.n_nodes and small.n_edges < default.n_edges
    assert small.relative_error <= 1e-12
    few = attribution_graph(m, TOKENS, max_nodes=10, batch_size=4)
    # 1 target row, 10 ranked receivers, then the kept receivers' exact rows
    assert few.meta["rows_computed"] <= 1 + 10 + 11
    assert sum(k in ("head", "neuron") for k in few.kinds) <= 10


def test_heads_only_graph_prunes_too():
    g = attribution_graph(model("bridge", "pythia"), TOKENS, nodes="heads")
    assert {"head", "mlp"} & set(g.kinds) and "neuron" not in g.kinds
    assert g.relative_error <= 1e-12


@pytest.mark.parametrize("backend,arch", PAIR)
def test_batch_shrinks_to_the_memory_budget_with_the_same_graph(backend, arch):
    from lin_lens.graph.engine import row_memory

    m = model(backend, arch)
    default = pruned_graph(backend, arch)
    assert default.meta["batch_size"] == 128  # tiny: the asked batch fits
    fixed, per_row = row_memory(m, len(TOKENS), torch.float64, True, True)
    tight = attribution_graph(m, TOKENS, max_memory=fixed + 3 * per_row)
    assert tight.meta["batch_size"] == 3  # more passes (top-k ranked 3 rows at a time) ...
    assert tight.node_ids.tolist() == default.node_ids.tolist()  # ... the same graph
    assert torch.allclose(tight.adjacency, default.adjacency, rtol=0, atol=1e-13)
    assert torch.equal(tight.edge_mask, default.edge_mask)


@pytest.mark.parametrize("backend,arch", PAIR)
def test_a_graph_that_cannot_fit_is_refused_before_any_pass(backend, arch):
    from lin_lens import MemoryBudgetError
    from lin_lens.graph.engine import row_memory
    from tests.conftest import assert_same_state, state

    m = model(backend, arch)
    fixed, per_row = row_memory(m, len(TOKENS), torch.float64, True, True)
    before = state(m)
    with pytest.raises(MemoryBudgetError, match=r"attribution graph of \d+ tokens.*Shorten"):
        attribution_graph(m, TOKENS, max_memory=fixed + per_row - 1)
    assert_same_state(before, m)
