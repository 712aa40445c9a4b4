"""Per-head operators and the exact component decomposition (tiny float64 models)."""

from __future__ import annotations

import json

import pytest
import torch

import lin_lens
from lin_lens.analyses import decompose, head_operators
from lin_lens.testing import tiny_model

TOKENS = torch.tensor([3, 17, 5, 41, 8])
ARCHS = ["gpt2", "pythia", "llama", "gemma"]  # biases / parallel blocks / GQA / post-norms+softcap


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module", params=["gpt2", "gemma"])
def heavy(request):
    """Fewer families for the tests that compute maps (biases+positions; post-norms+softcap)."""
    return tiny_model(request.param)


@pytest.mark.parametrize("hook", ["logits", "ln_final.hook_normalized",
                                  "blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"])
def test_parts_sum_to_target(model, hook):
    d = decompose(model, TOKENS, hook, pos=-1)
    assert d.relative_error < 1e-13
    assert d.parts.shape == (len(d.labels), d.act.shape[0])
    n_heads = model.cfg.n_heads
    layers = {"blocks.1.hook_resid_pre": 1, "blocks.0.hook_resid_post": 1}.get(hook, 2)
    assert d.kinds.count("head") == n_heads * layers
    assert d.kinds.count("mlp") == layers


def test_matches_transformer_lens_decompose_resid(model):
    """Direct contributions to the final residual after the frozen final norm equal TL's own
    ``decompose_resid(apply_ln=True)`` (``apply_ln_to_stack`` with the cached scale)."""
    _, cache = model.run_with_cache(TOKENS)
    stack, labels = cache.decompose_resid(layer=None, mode="all", apply_ln=True,
                                          incl_embeds=True, pos_slice=-1, return_labels=True)
    stack = stack[:, 0] if stack.ndim == 3 else stack[:, 0, -1]
    d = decompose(model, TOKENS, "ln_final.hook_normalized", pos=-1)
    glabels, gparts = d.grouped()
    assert glabels == labels
    assert (gparts - stack).abs().max() < 1e-10
    # and without the norm: the raw residual stream
    stack, _ = cache.decompose_resid(layer=1, mode="all", apply_ln=False, incl_embeds=True,
                                     pos_slice=2, return_labels=True)
    stack = stack[:, 0] if stack.ndim == 3 else stack[:, 0, 2]
    _, gparts = decompose(model, TOKENS, "blocks.1.hook_resid_pre", pos=2).grouped()
    assert (gparts - stack).abs().max() < 1e-10


@pytest.mark.parametrize("hook", ["logits", "blocks.1.hook_resid_mid"])
def test_component_operators_sum_to_the_whole_map(heavy, hook):
    model = heavy
    d = decompose(model, TOKENS, hook, pos=-1, operators=True)
    lm = lin_lens.linear_map(model, TOKENS, hook, pos=-1)
    J = sum(d.operators.values())
    assert (J - lm.J).abs().max() < 1e-10 * lm.J.abs().max()
    for lab, part in zip(d.labels, d.parts, strict=True):  # each part is its own exact affine map
        rec = torch.einsum("soi,si->o", d.operators[lab], d.x) + d.constants[lab]
        assert (rec - part).norm() <= 1e-11 * max(float(part.norm()), 1.0), lab
    assert torch.allclose(sum(d.constants.values()), lm.constant, atol=1e-10)


def test_head_operators(heavy):
    model = heavy
    maps = head_operators(model, TOKENS, 1, pos=-1)
    assert len(maps) == model.cfg.n_heads
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(TOKENS)
    finally:
        model.set_use_attn_result(False)
    result = cache["blocks.1.attn.hook_result"][0, -1]
    for h, hm in enumerate(maps):
        assert hm.relative_error < 1e-12
        assert torch.allclose(hm.act, result[h], atol=1e-12)
        assert (torch.linalg.matrix_rank(hm.J) <= model.cfg.d_head).all()
    if getattr(model.blocks[1], "ln1_post", None) is None:
        # heads + b_O is attn_out: the per-head operators add up to attn_out's operator
        lm = lin_lens.linear_map(model, TOKENS, "blocks.1.hook_attn_out", pos=-1)
        assert (sum(hm.J for hm in maps) - lm.J).abs().max() < 1e-10


def test_decomposition_object(model):
    d = decompose(model, TOKENS, "logits", pos=3, out_index=[4, 9])
    assert d.act.shape == (2,) and d.position == 3
    logits = model(TOKENS)[0, 3, [4, 9]]
    assert torch.allclose(d.total(), logits, atol=1e-12)
    assert float(d.along().sum()) == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(d["embed"], d.parts[0])
    json.dumps(d.to_dict())
    assert "<table>" in d._repr_html_()
    assert len(d.top(3)) == 3


def test_errors():
    m = tiny_model("gpt2")
    with pytest.raises(ValueError, match="residual-stream"):
        decompose(m, TOKENS, "blocks.0.hook_mlp_out")
    with pytest.raises(TypeError):
        decompose(m, TOKENS, pos=[1, 2])
    with pytest.raises(ValueError, match="out_index"):
        decompose(m, TOKENS, "blocks.0.hook_resid_post", out_index=[1])


def test_bridge_decomposition():
    from lin_lens.testing import tiny_bridge

    b = tiny_bridge("gpt2")
    d = decompose(b, torch.tensor([1, 5, 7, 9]), "logits", pos=-1)
    assert d.relative_error < 1e-13
    assert d.kinds.count("head") == 8 and "ln_final.b" in d.labels
