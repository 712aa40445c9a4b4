"""What each node writes (``node_writes``, ``graph.top_tokens``): the write vectors are what
``decompose`` finds in the residual stream, the scores are the frozen final readout's logit
changes (read off an exact linear map), the model is left as it was."""

from __future__ import annotations

import copy

import pytest
import torch

import lin_lens
from lin_lens.errors import InvalidArgumentError
from lin_lens.graph import node_writes
from lin_lens.graph.writes import node_vectors, write_scores
from tests.conftest import BACKENDS, assert_same_state, requires_hooked, state
from tests.graph.graph_cases import TOKENS, full_graph, model

WRITE_CASES = [pytest.param(b, a, id=f"{b}-{a}") for b in BACKENDS for a in ("gpt2", "gemma")] + [
    pytest.param(BACKENDS[-1], "llama", id=f"{BACKENDS[-1]}-llama")]


@pytest.mark.parametrize("backend,arch", WRITE_CASES)
def test_writes_are_the_residual_stream_parts(backend, arch):
    g, m = full_graph(backend, arch), model(backend, arch)
    before = state(m)
    vecs = node_vectors(m, g)
    assert_same_state(before, m)
    kinds = g.kinds
    assert set(vecs) == {i for i, k in enumerate(kinds) if k in ("head", "neuron")}
    last = f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"
    for p in (0, 3, len(TOKENS) - 1):
        dec = lin_lens.decompose(m, torch.tensor([TOKENS]), hook=last, pos=p)
        mlp: dict[int, torch.Tensor] = {}
        for i in (i for i in vecs if int(g.pos[i]) == p):
            layer = int(g.layer[i])
            if kinds[i] == "head":
                want = dec[f"L{layer}H{int(g.index[i])}"].reshape(-1)
                assert torch.allclose(vecs[i], want, rtol=1e-10, atol=1e-12)
            else:
                mlp[layer] = mlp.get(layer, 0) + vecs[i]
        for layer, total in mlp.items():  # every neuron of the full graph: the whole MLP
            assert torch.allclose(total, dec[f"L{layer}.mlp"].reshape(-1), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend,arch", WRITE_CASES[:2])
def test_scores_are_the_frozen_readouts_logit_changes(backend, arch):
    g, m = full_graph(backend, arch), model(backend, arch)
    assert g.top_tokens is not None  # attribution_graph computed them (writes=10)
    vecs = node_vectors(m, g)
    last = f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"
    maps = {p: lin_lens.linear_map(m, torch.tensor([TOKENS]), "logits", p, source=last)
            for p in {int(g.pos[i]) for i in vecs}}
    zero = [i for i in vecs if not bool(vecs[i].any())]  # e.g. a GELU neuron at exactly 0
    assert all(g.top_tokens[i]["tokens"] == [] for i in zero)
    for i in [i for i in vecs if i not in zero][::3]:
        p = int(g.pos[i])
        scores = maps[p].J[p] @ vecs[i]  # [d_vocab]: the exact readout at p, applied to the write
        tl = g.top_tokens[i]
        top = scores.topk(10)
        assert tl["ids"] == top.indices.tolist()
        assert torch.allclose(torch.tensor(tl["scores"], dtype=scores.dtype), top.values,
                              rtol=1e-9, atol=1e-12)
        assert tl["neg_ids"][0] == int(scores.argmin())


@pytest.mark.parametrize("backend,arch", WRITE_CASES)
def test_last_layer_writes_are_their_total_effects(backend, arch):
    """A last-layer neuron at the target position reaches the logit only directly (a head there
    also through the MLP after it): its score for the target token is its total effect."""
    g, m = full_graph(backend, arch), model(backend, arch)
    nodes, scores = write_scores(m, g)
    last, t, tok = m.cfg.n_layers - 1, g.target["pos"], g.target["ids"][0]
    hit = [j for j, i in enumerate(nodes) if int(g.layer[i]) == last and int(g.pos[i]) == t
           and g.kinds[i] == "neuron"]
    assert hit
    for j in hit:
        assert float(scores[tok, j]) == pytest.approx(float(g.total_effect[nodes[j]]),
                                                      rel=1e-9, abs=1e-12)


def test_whole_layers_and_options(backend):
    m = model(backend, "gpt2")
    g = lin_lens.attribution_graph(m, TOKENS, nodes=("neurons",), prune=False, writes=3)
    attn = [i for i, k in enumerate(g.kinds) if k == "attn"]
    assert attn and all(len(g.top_tokens[i]["tokens"]) == 3 for i in attn)
    last = f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"
    i = attn[-1]
    p, layer = int(g.pos[i]), int(g.layer[i])
    dec = lin_lens.decompose(m, torch.tensor([TOKENS]), hook=last, pos=p)
    heads = sum(dec[f"L{layer}H{h}"].reshape(-1) for h in range(m.cfg.n_heads))
    assert torch.allclose(node_vectors(m, g)[i], heads, rtol=1e-10, atol=1e-12)
    h = lin_lens.attribution_graph(m, TOKENS, nodes=("heads",), prune=False, writes=0)
    assert h.top_tokens is None
    mlp = [i for i, k in enumerate(h.kinds) if k == "mlp"]
    vec = node_vectors(m, h)[mlp[-1]]
    dec = lin_lens.decompose(m, torch.tensor([TOKENS]), hook=last, pos=int(h.pos[mlp[-1]]))
    assert torch.allclose(vec, dec[f"L{int(h.layer[mlp[-1]])}.mlp"].reshape(-1), atol=1e-12)


def test_refusals(backend):
    m = model(backend, "gpt2")
    g = full_graph(backend, "gpt2")
    with pytest.raises(InvalidArgumentError, match="k=0"):
        node_writes(m, g, 0)
    other = copy.copy(g)
    other.meta = {**g.meta, "n_layers": 7}
    with pytest.raises(InvalidArgumentError, match="not built with this model"):
        node_writes(m, other)


@requires_hooked("a model without a final norm (a cfg override)")
def test_without_a_final_norm():
    from lin_lens.testing import tiny_model

    m = tiny_model("gpt2", torch.float64, normalization_type=None)
    g = lin_lens.attribution_graph(m, TOKENS, prune=False, writes=3)
    nodes, scores = write_scores(m, g)
    t, tok = g.target["pos"], g.target["ids"][0]
    for j, i in enumerate(nodes):
        if g.kinds[i] == "neuron" and int(g.layer[i]) == m.cfg.n_layers - 1 \
                and int(g.pos[i]) == t:
            assert float(scores[tok, j]) == pytest.approx(float(g.total_effect[i]), rel=1e-9)
