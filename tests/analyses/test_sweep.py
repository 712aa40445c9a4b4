"""Layer sweep on tiny float64 models."""

from __future__ import annotations

import json

import pytest
import torch

from lin_lens.analyses import layer_sweep
from lin_lens.spectrum import stable_rank, svd
from tests.conftest import tiny

TOKENS = torch.tensor([3, 17, 5, 41, 8])
# How token i reads: a tiny HookedTransformer has no tokenizer ("#i"); a tiny Bridge has the
# word-level one ("wi").
TOKEN = {"hooked": "#{}", "bridge": "w{}"}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def sweep(request, backend):
    m = tiny(request.param, backend)
    return m, layer_sweep(m, TOKENS, pos=-1, keep_maps=True, k=2, top=3), backend


def test_tables_and_shapes(sweep):
    m, s, backend = sweep
    assert s.layers == [0, 1] and s.position == 4 and s.tokens[0] == TOKEN[backend].format(3)
    for kd in ("resid_post", "attn_out", "mlp_out", "transform"):
        assert s.stable_rank[kd].shape == (2, 5)
        assert s.stacked_stable_rank[kd].shape == (2,)
        assert s.S[kd].shape == (2, 2) and (s.S[kd][:, 0] >= s.S[kd][:, 1]).all()
        assert s.relative_error[kd].max() < 1e-12
        assert len(s.out_tokens[kd][0]) == 2 and len(s.out_tokens[kd][0][0].tokens) == 3
        assert len(s.table(kd)) == 2
    json.dumps(s.to_dict())
    assert s._repr_html_().count("<table>") == 4
    assert "resid_post" in str(s)


def test_numbers_match_the_maps(sweep):
    m, s, _ = sweep
    for (kd, layer), lm in s.maps.items():
        li = s.layers.index(layer)
        assert torch.allclose(s.stable_rank[kd][li], stable_rank(lm))
        assert torch.allclose(s.S[kd][li], svd(lm, 2, stacked=True).S)
    # cumulative maps: resid_post L = resid_post L-1 + attn_out L + mlp_out L (exactly linear)
    J = {k: lm.J for k, lm in s.maps.items()}
    assert (J[("resid_post", 1)] - J[("resid_post", 0)] - J[("attn_out", 1)]
            - J[("mlp_out", 1)]).abs().max() < 1e-10
    # the last layer projects onto itself as the identity; u-projections are |cosines|
    for kd in ("resid_post", "transform"):
        eye = torch.eye(2, dtype=torch.float64, device=s.proj_u[kd].device)
        assert torch.allclose(s.proj_u[kd][-1], eye, atol=1e-10)
        assert torch.allclose(s.proj_v[kd][-1], eye, atol=1e-10)
    assert ((s.proj_u["attn_out"] >= 0) & (s.proj_u["attn_out"] <= 1 + 1e-12)).all()


def test_transform_composes_to_cumulative(sweep):
    """resid_post L (from the embeddings) = transform L ∘ resid_post L-1, summed over positions;
    the sweep's per-layer transform sees only the target position, so check at layer 0, where
    resid_pre 0 = embeddings (+ positions): the two maps coincide."""
    m, s, _ = sweep
    assert torch.allclose(s.maps[("transform", 0)].J, s.maps[("resid_post", 0)].J, atol=1e-12)


def test_layers_subset_and_focus(backend):
    m = tiny("gpt2", backend)  # 2 layers
    s = layer_sweep(m, TOKENS, pos=2, layers=[0], kinds=("resid_post",), focus=-1, k=1)
    assert s.layers == [0, 1]  # the final layer is always added as the reference
    assert s.kinds == ["resid_post"] and s.S["resid_post"].shape == (2, 1)
    s = layer_sweep(m, TOKENS, pos=2, layers=[1], kinds=("resid_post",), focus=-1, k=1)
    assert s.layers == [1]  # only the layers asked for (and the final one), not all of them


def test_unknown_kinds(backend):
    with pytest.raises(ValueError, match="unknown kinds"):
        layer_sweep(tiny("gpt2", backend), TOKENS, kinds=("nope",))
