"""Interventions: zeroing a node with everything frozen changes the target by exactly its total
effect (and a receiver by exactly the edge); the ordinary model does something else."""

from __future__ import annotations

import pytest

from tests.graph.graph_cases import CASES, PAIR, model, of_kind, pruned_graph

BOUND = 1e-10


def _strongest(g, kind):
    idx = of_kind(g, kind)
    return max(idx, key=lambda i: abs(float(g.total_effect[i]))) if idx else None


@pytest.mark.parametrize("backend,arch", CASES)
def test_frozen_ablation_is_the_total_effect(backend, arch):
    m, g = model(backend, arch), pruned_graph(backend, arch)
    gaps = []
    for kind in ("embed", "pos_embed", "bias", "head", "neuron"):
        i = _strongest(g, kind)
        if i is None:
            continue
        ab = g.ablate(m, i)
        assert ab.receiver == "J" and ab.predicted == -float(g.total_effect[i])
        assert ab.error <= BOUND, ab
        gaps.append(abs(ab.ordinary - ab.frozen))
    # the model is not linear: ordinary ablations differ from the frozen ones
    assert max(gaps) > 1e-3


@pytest.mark.parametrize("backend,arch", CASES)
def test_held_ablation_is_the_edge(backend, arch):
    m, g = model(backend, arch), pruned_graph(backend, arch)
    dst, src = g.edge_mask.nonzero(as_tuple=True)
    strongest = int(g.adjacency[dst, src].abs().argmax())
    into_target = g.edge_mask[g.targets[0]].nonzero().flatten()
    for a, r in ((int(src[strongest]), int(dst[strongest])),
                 (int(into_target[0]), g.targets[0])):
        ab = g.ablate(m, g.labels[a], g.labels[r])
        assert ab.predicted == -float(g.adjacency[r, a])
        assert ab.error <= BOUND, ab


@pytest.mark.parametrize("backend,arch", PAIR)
def test_ablation_errors(backend, arch):
    m, g = model(backend, arch), pruned_graph(backend, arch)
    with pytest.raises(ValueError, match="target"):
        g.ablate(m, g.targets[0])
    with pytest.raises(ValueError, match="source"):
        g.ablate(m, of_kind(g, "head")[0], of_kind(g, "embed")[0])
    with pytest.raises(KeyError, match="no node"):
        g.ablate(m, "L9H9@99")
