"""Exact and complete: every node's value is the sum of its incoming edges, the target is the
model's own, the input tokens' totals are linear_map's per-token contributions."""

from __future__ import annotations

import pytest
import torch

import lin_lens
from lin_lens.graph import attribution_graph
from tests.conftest import DEVICE, assert_same_state, state
from tests.graph.graph_cases import CASES, PAIR, TOKENS, full_graph, model, of_kind

BOUND = 1e-12


@pytest.mark.parametrize("backend,arch", CASES)
def test_every_value_is_the_sum_of_its_edges(backend, arch):
    g = full_graph(backend, arch)
    m = model(backend, arch)
    logits = m(torch.tensor([TOKENS], device=DEVICE), return_type="logits")[0, -1].detach()
    t = g.targets[0]
    assert g.target["ids"] == [int(logits.argmax())]
    # the model's own logit (a Bridge's Hugging Face RMSNorm computes in float32 in an ordinary
    # forward; detached mode sends it down the Bridge's float64 path, hence 1e-6 here)
    assert float(g.value[t]) == pytest.approx(float(logits.max()), rel=1e-6)
    assert g.relative_error <= BOUND
    errors = g.node_errors()
    assert set(errors) >= {"head", "neuron", "target"}
    assert max(errors.values()) <= BOUND, errors
    # the complete graph: its adjacency holds every edge, so rows sum to the values too
    recv = [i for i, k in enumerate(g.kinds) if k in ("head", "neuron", "target")]
    rows = g.adjacency[recv].sum(1)
    assert torch.allclose(rows, g.value[recv], rtol=0, atol=1e-12 * float(g.value.abs().max()))


@pytest.mark.parametrize("backend,arch", CASES)
def test_input_totals_are_linear_map_contributions(backend, arch):
    g = full_graph(backend, arch)
    lm = lin_lens.linear_map(model(backend, arch), TOKENS, "logits", -1,
                             direction=torch.nn.functional.one_hot(
                                 torch.tensor(g.target["ids"][0]), g.meta["d_vocab"]).double())
    c = lm.contributions()[:, 0]
    te = g.total_effect[of_kind(g, "embed")]
    assert torch.allclose(te, c, rtol=0, atol=BOUND * float(c.abs().max()))
    # constants: the target minus the tokens' part is what the constant nodes carry in total
    const = [i for i, k in enumerate(g.kinds) if k in ("bias", "pos_embed")]
    assert float(g.total_effect[const].sum()) == pytest.approx(float(lm.constant[0]), abs=1e-10)


@pytest.mark.parametrize("backend,arch", PAIR)
def test_float32_within_1e5(backend, arch):
    m = model(backend, arch, torch.float32)
    g = attribution_graph(m, TOKENS, prune=False)
    assert g.relative_error <= 1e-5
    assert max(g.node_errors().values()) <= 1e-5


@pytest.mark.parametrize("backend,arch", PAIR)
def test_targets_lists_directions_and_hooks(backend, arch):
    m = model(backend, arch)
    d_vocab = m.cfg.d_vocab
    g = attribution_graph(m, TOKENS, target=[3, 7, 11], prune=False)
    assert len(g.targets) == 3 and g.relative_error <= BOUND
    assert float(g.target["weights"].sum()) == pytest.approx(1.0)
    u = torch.zeros(d_vocab, dtype=torch.float64)
    u[3], u[7] = 1.0, -1.0  # a logit difference
    g = attribution_graph(m, TOKENS, target=u, prune=False)
    assert g.relative_error <= BOUND
    logits = m(torch.tensor([TOKENS], device=DEVICE), return_type="logits")[0, -1].detach()
    assert float(g.value[g.targets[0]]) == pytest.approx(float(logits[3] - logits[7]), rel=1e-6)
    # a direction on a residual stream: nodes after it cannot reach it and are left out
    hook = "blocks.1.hook_resid_pre"
    v = torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    g = attribution_graph(m, TOKENS, target=v, hook=hook, pos=3, prune=False)
    assert g.relative_error <= BOUND and max(g.node_errors().values()) <= BOUND
    assert set(g.layer[[i for i, k in enumerate(g.kinds) if k in ("head", "neuron")]].tolist()) \
        == {0}
    assert int(g.pos.max()) == 3
    lm = lin_lens.linear_map(m, TOKENS, hook, 3, direction=v)
    c = lm.contributions()[:4, 0]  # tokens after the target position contribute exactly 0
    assert torch.allclose(g.total_effect[of_kind(g, "embed")], c, rtol=0,
                          atol=BOUND * float(c.abs().max()))


@pytest.mark.parametrize("backend,arch", PAIR)
@pytest.mark.parametrize("nodes,kinds", [(("heads",), {"head", "mlp"}),
                                         (("neurons",), {"attn", "neuron"})])
def test_whole_layers_when_not_asked(backend, arch, nodes, kinds):
    g = attribution_graph(model(backend, arch), TOKENS, nodes=nodes, prune=False)
    assert kinds <= set(g.kinds) and not ({"head", "neuron", "attn", "mlp"} - kinds) & set(g.kinds)
    assert g.relative_error <= BOUND and max(g.node_errors().values()) <= BOUND
    full = full_graph(backend, arch)
    te = full.total_effect[of_kind(full, "embed")]  # the same network, coarser nodes
    assert torch.allclose(g.total_effect[of_kind(g, "embed")], te, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend,arch", PAIR)
def test_ordinary_gradients_are_not_the_graph(backend, arch):
    """The graph's token totals are not an ordinary gradient × input: if a nonlinearity were
    left unfrozen, they would agree with this instead."""
    m = model(backend, arch)
    g = full_graph(backend, arch)
    u = torch.nn.functional.one_hot(torch.tensor(g.target["ids"][0]), m.cfg.d_vocab).double()
    plain = lin_lens.linear_map(m, TOKENS, "logits", -1, direction=u, detach=False)
    c = plain.contributions()[:, 0]
    assert float((g.total_effect[of_kind(g, "embed")] - c).abs().max()) > 1e-3


@pytest.mark.parametrize("backend,arch", CASES)
def test_model_left_as_it_was(backend, arch):
    m = model(backend, arch)
    before = state(m)
    g = attribution_graph(m, TOKENS, max_nodes=20)
    with pytest.raises(ValueError, match="direction"):  # raised inside detached mode
        attribution_graph(m, TOKENS, target=torch.ones(5, dtype=torch.float64))
    for i in (of_kind(g, "bias") or of_kind(g, "head"))[:1]:
        g.ablate(m, i)  # zeroes a bias parameter for a moment
    assert_same_state(before, m)


@pytest.mark.parametrize("kw,match", [
    ({"pos": 7}, "position 7 out of range"), ({"pos": 1.5}, "pos"),
    ({"nodes": ("heads", "layers")}, "nodes"),
    ({"node_threshold": 1.5}, "node_threshold"), ({"target": [3, 99]}, "target"),
    ({"target": [3, 3]}, "distinct"), ({"hook": "blocks.0.attn.hook_pattern",
                                        "target": torch.ones(3)}, "hook_pattern"),
    ({"hook": "blocks.0.hook_resid_post"}, "direction"), ({"max_nodes": 0}, "max_nodes"),
])
def test_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        attribution_graph(model("bridge", "llama"), TOKENS, **kw)
