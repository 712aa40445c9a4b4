"""The exact component decomposition: parts (embeddings, heads, MLPs, biases) that add up to the
target, each its own exact affine map (tiny float64 models)."""

from __future__ import annotations

import json

import pytest
import torch

import lin_lens
from lin_lens.analyses import decompose
from lin_lens.testing import tiny_model
from tests.conftest import DEVICE, requires_hooked, tiny

TOKENS = torch.tensor([3, 17, 5, 41, 8], device=DEVICE)
ARCHS = ["gpt2", "pythia", "llama", "gemma"]  # biases / parallel blocks / GQA / post-norms+softcap
HEAVY = ["gpt2", "gemma"]  # fewer families for the tests that compute maps
# Detached vs plain forward on a Bridge (README, "TransformerBridge forward values"): HF's RMSNorm
# computes in float32 even in a float64 model; asserted bound relative to the largest value.
BRIDGE_FORWARD = 1e-5

@pytest.mark.parametrize("hook", ["logits", "ln_final.hook_normalized",
                                  "blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"])
@pytest.mark.parametrize("arch", ARCHS)
def test_parts_sum_to_target(arch, backend, hook):
    model = tiny(arch, backend)
    d = decompose(model, TOKENS, hook, pos=-1)
    assert d.relative_error < 1e-13
    assert d.parts.shape == (len(d.labels), d.act.shape[0])
    n_heads = model.cfg.n_heads
    layers = {"blocks.1.hook_resid_pre": 1, "blocks.0.hook_resid_post": 1}.get(hook, 2)
    assert d.kinds.count("head") == n_heads * layers
    assert d.kinds.count("mlp") == layers


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_transformer_lens_decompose_resid(arch, backend):
    """Direct contributions to the final residual after the frozen final norm equal TL's own
    ``decompose_resid(apply_ln=True)`` (``apply_ln_to_stack`` with the cached scale). TL's stack
    is made of plain-forward values: on a Bridge they carry HF's float32 RMSNorm rounding."""
    model = tiny(arch, backend)
    tol = (lambda stack: 1e-10) if backend == "hooked" else (
        lambda stack: BRIDGE_FORWARD * float(stack.abs().max()))
    _, cache = model.run_with_cache(TOKENS)
    stack, labels = cache.decompose_resid(layer=None, mode="all", apply_ln=True,
                                          incl_embeds=True, pos_slice=-1, return_labels=True)
    stack = stack[:, 0] if stack.ndim == 3 else stack[:, 0, -1]
    d = decompose(model, TOKENS, "ln_final.hook_normalized", pos=-1)
    glabels, gparts = d.grouped()
    assert glabels == labels
    assert (gparts - stack).abs().max() < tol(stack)
    # and without the norm: the raw residual stream
    stack, _ = cache.decompose_resid(layer=1, mode="all", apply_ln=False, incl_embeds=True,
                                     pos_slice=2, return_labels=True)
    stack = stack[:, 0] if stack.ndim == 3 else stack[:, 0, 2]
    _, gparts = decompose(model, TOKENS, "blocks.1.hook_resid_pre", pos=2).grouped()
    assert (gparts - stack).abs().max() < tol(stack)


@pytest.mark.parametrize("hook", ["logits", "blocks.1.hook_resid_mid"])
@pytest.mark.parametrize("arch", HEAVY)
def test_component_operators_sum_to_the_whole_map(arch, backend, hook):
    model = tiny(arch, backend)
    d = decompose(model, TOKENS, hook, pos=-1, operators=True)
    lm = lin_lens.linear_map(model, TOKENS, hook, pos=-1)
    J = sum(d.operators.values())
    assert (J - lm.J).abs().max() < 1e-10 * lm.J.abs().max()
    for lab, part in zip(d.labels, d.parts, strict=True):  # each part is its own exact affine map
        rec = torch.einsum("soi,si->o", d.operators[lab], d.x) + d.constants[lab]
        assert (rec - part).norm() <= 1e-11 * max(float(part.norm()), 1.0), lab
    assert torch.allclose(sum(d.constants.values()), lm.constant, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_decomposition_object(arch, backend):
    model = tiny(arch, backend)
    d = decompose(model, TOKENS, "logits", pos=3, out_index=[4, 9])
    assert d.act.shape == (2,) and d.position == 3
    with torch.no_grad():
        full = model(TOKENS)[0, 3]
    # the plain forward: on a Bridge within HF's float32 RMSNorm rounding of the exact value
    atol = 1e-12 if backend == "hooked" else BRIDGE_FORWARD * float(full.abs().max())
    assert torch.allclose(d.total(), full[[4, 9]], atol=atol)
    assert float(d.along().sum()) == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(d["embed"], d.parts[0])
    json.dumps(d.to_dict())
    assert "<table>" in d._repr_html_()
    assert len(d.top(3)) == 3


def test_gpt2_labels(backend):
    d = decompose(tiny("gpt2", backend), torch.tensor([1, 5, 7, 9]), "logits", pos=-1)
    assert d.relative_error < 1e-13
    assert d.kinds.count("head") == 8 and "ln_final.b" in d.labels


def test_errors(backend):
    m = tiny("gpt2", backend)
    with pytest.raises(ValueError, match="residual-stream"):
        decompose(m, TOKENS, "blocks.0.hook_mlp_out")
    with pytest.raises(TypeError):
        decompose(m, TOKENS, pos=[1, 2])
    with pytest.raises(ValueError, match="out_index"):
        decompose(m, TOKENS, "blocks.0.hook_resid_post", out_index=[1])


# -- never silently wrong (fuzz findings) ------------------------------------------------------

@requires_hooked("TL config overrides (shortformer positions, OLMo-2 post-norm blocks, "
                 "attn_only, no norms)")
@pytest.mark.parametrize("cfg", [dict(positional_embedding_type="shortformer"),
                                 dict(original_architecture="Olmo2ForCausalLM")])
def test_layouts_decompose_does_not_know_are_refused(cfg):
    """Parts that would not sum to the target (12 % and 80 % off before) raise instead."""
    m = tiny_model("gpt2", **cfg)
    for hook in ("logits", "blocks.1.hook_resid_post"):
        with pytest.raises(lin_lens.NotExactError, match="do not sum to the target"):
            decompose(m, TOKENS, hook)


@requires_hooked("TL config overrides (attn_only, normalization_type=None)")
def test_models_without_mlp_or_final_norm_are_refused_clearly():
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="attn_only"):
        decompose(tiny_model("gpt2", attn_only=True), TOKENS, "logits")
    m = tiny_model("gpt2", normalization_type=None)
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="no final norm"):
        decompose(m, TOKENS, "logits")
    assert decompose(m, TOKENS, "blocks.1.hook_resid_post").relative_error < 1e-13
