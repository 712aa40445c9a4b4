"""Decoding a linear map's singular vectors into tokens, and its per-token contributions
(tiny float64 models)."""

from __future__ import annotations

import json

import pytest
import torch

import lin_lens
from lin_lens.decoding import (
    contributions,
    decode,
    decode_vectors,
    output_logit_directions,
    token_strings,
    top_singular_tokens,
    visible,
)
from lin_lens.maps import LinearMap
from tests.conftest import DEVICE, tiny

TOKENS = torch.tensor([3, 17, 5, 41, 8], device=DEVICE)
# How token i reads: a tiny HookedTransformer has no tokenizer ("#i"); a tiny Bridge has the
# word-level one ("wi").
TOKEN = {"hooked": "#{}", "bridge": "w{}"}


@pytest.fixture(scope="module")
def gpt2(backend):
    return tiny("gpt2", backend)


@pytest.fixture(scope="module")
def llama(backend):
    return tiny("llama", backend)


@pytest.fixture(scope="module")
def resid_map(gpt2):
    return lin_lens.linear_map(gpt2, TOKENS, "blocks.1.hook_resid_post")


def _planted_map(model, hook, u, v, x, s=3.0):
    """A rank-1 single-token map J = s u vᵀ with input x (a LinearMap built by hand)."""
    J = (s * torch.outer(u, v))[None, None]
    act = (J[0, 0] @ x)[None]
    return LinearMap(J, x[None], act, {}, hook, "hook_embed", [0], (u.shape[0],),
                     tokens=torch.tensor([2]), int_pos=True)


def test_decode_planted_directions(llama):
    """U decodes (through ln_final.w and W_U) to the planted output token, V (cosine with W_E)
    to the planted input token, whatever sign the SVD returns."""
    m = llama
    out_tok, in_tok = 11, 29
    w = m.ln_final.w.detach()
    with torch.no_grad():
        W_U = m.W_U.detach().clone()
        e = torch.zeros(16, dtype=torch.float64, device=w.device)
        e[4] = 1.0
        m.W_U[:, out_tok] = 50.0 * e / w  # logit of out_tok reads coordinate 4 only
    try:
        assert torch.equal(m.W_U[:, out_tok], 50.0 * e / w)  # the model's own W_U changed
        v = m.W_E[in_tok].detach()
        x = -2.0 * v  # input along -v: the sign convention must flip v
        lm = _planted_map(m, "blocks.1.hook_resid_post", e, v / v.norm(), x)
        d = decode(m, lm, k=1, top=3)
        # x = -2 W_E[in]: the convention flips the pair, so J x pushes *against* out_tok
        assert d.out[0][0].neg_ids[0] == out_tok and d.out[0][0].ids[0] != out_tok
        assert d.inp[0][0].neg_ids[0] == in_tok
        assert d.inp[0][0].neg_scores[0] == pytest.approx(-1.0)
        assert d.stacked_out[0].neg_ids[0] == out_tok
        # rows / columns carry no convention: the planted token is at one end
        col, row = d.cols[0][0][2], d.rows[0][0][2]
        assert out_tok in (col.ids[0], col.neg_ids[0])
        assert in_tok in (row.ids[0], row.neg_ids[0])
        # the same map with x along +v decodes at the top ends
        d2 = decode(m, _planted_map(m, "blocks.1.hook_resid_post", e, v / v.norm(), v), k=1)
        assert d2.out[0][0].ids[0] == out_tok and d2.inp[0][0].ids[0] == in_tok
        assert abs(float(d.stable_rank[0]) - 1.0) < 1e-12
    finally:
        with torch.no_grad():
            m.W_U.copy_(W_U)
    assert torch.equal(m.W_U, W_U)


def test_decode_logits_map_is_over_vocab(gpt2):
    v = torch.zeros(16, dtype=torch.float64)
    v[0] = 1.0
    u = torch.zeros(50, dtype=torch.float64)
    u[42] = 1.0
    lm = _planted_map(gpt2, "logits", u, v, v)
    d = decode(gpt2, lm, k=1, top=2)
    assert d.meta["out_space"] == "vocab"
    assert d.out[0][0].ids[0] == 42 and d.out[0][0].scores[0] == pytest.approx(1.0)


def test_output_directions_through_norm(llama, gpt2):
    """The decoded logit direction is the exact logit change under the frozen final norm."""
    for m in (llama, gpt2):
        _, cache = m.run_with_cache(TOKENS)
        r = cache["blocks.1.hook_resid_post"][0, -1]
        scale = cache["ln_final.hook_scale"][0, -1]
        du = torch.randn(16, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(1)).to(DEVICE)
        lm = lin_lens.linear_map(m, TOKENS, "logits", source="blocks.1.hook_resid_post")
        exact = lm.J[-1] @ du  # logits' response to du at the last position
        pred = output_logit_directions(m, du[:, None])[:, 0] / scale
        assert torch.allclose(pred, exact, atol=1e-10)
        assert r.shape == du.shape


def test_contributions_shares(resid_map):
    c = contributions(resid_map)
    assert torch.allclose(c.norm, resid_map.contributions().norm(dim=-1))
    assert float(c.share.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(c.along.sum()) + c.constant_along == pytest.approx(1.0, abs=1e-12)


def test_decode_real_map_renders(gpt2, resid_map, backend):
    d = decode(gpt2, resid_map, k=2, top=3)
    assert d.tokens == [TOKEN[backend].format(i) for i in (3, 17, 5, 41, 8)]
    assert d.S.shape == (5, 2) and len(d.out) == 5 and len(d.out[0]) == 2
    json.dumps(d.to_dict())
    html = d._repr_html_()
    assert html.startswith("<table>") and "stacked" in html
    assert "‖Jx‖" in str(d)
    rows = top_singular_tokens(gpt2, resid_map, k=1, top=2)
    assert rows[0]["token"] == TOKEN[backend].format(3) and len(rows[0]["U"][0]) == 2
    # a multi-target map: pick the target
    lm = lin_lens.linear_map(gpt2, TOKENS, "blocks.1.hook_resid_post", pos=[2, 4])
    d2 = decode(gpt2, lm, k=1, target=0)
    assert d2.position == 2 and d2.S.shape == (5, 1)


def test_decode_vectors_and_token_strings(gpt2, backend):
    sims = decode_vectors(gpt2, gpt2.W_E[7].detach()[:, None], "in", top=1)
    assert sims[0].ids == [7] and sims[0].scores[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        decode_vectors(gpt2, gpt2.W_E[:2].T, "sideways")
    assert token_strings(gpt2, [4, 5]) == [TOKEN[backend].format(i) for i in (4, 5)]
    assert visible(" the\n") == "·the↵" and visible("") == "∅"
