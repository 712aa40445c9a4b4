"""The linear_map API: layouts, constants, sources, directions, and leaving the model as it was."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call

import lin_lens
from tests.conftest import DEVICE, assert_same_state, state, tiny

TOKENS = torch.tensor([[3, 17, 42, 8, 8, 29, 11]], device=DEVICE)

# The gpt2 family's parameters as each backend names them (constant origins are parameter
# names; a Bridge keeps Hugging Face's). GPT-2's lm_head has no bias: the Bridge has no b_U.
_HF = "transformer.h.{}._original_component."
PARAMS = {
    "hooked": {"layer1": "blocks.1.", "b_in0": "blocks.0.mlp.b_in", "b_O0": "blocks.0.attn.b_O",
               "b_out1": "blocks.1.mlp.b_out", "final": "unembed.b_U", "qk": ("b_Q", "b_K")},
    "bridge": {"layer1": _HF.format(1),
               "b_in0": _HF.format(0) + "mlp._original_component.c_fc._original_component.bias",
               "b_O0": _HF.format(0) + "attn.o._original_component.bias",
               "b_out1": _HF.format(1) + "mlp._original_component.c_proj._original_component.bias",
               "final": "transformer.ln_f._original_component.bias",
               "qk": tuple(f"attn.{p}._original_component.bias" for p in ("q", "k", "qkv"))},
}


def test_layout_int_pos_and_list_pos(backend):
    m = tiny("gpt2", backend)
    one = lin_lens.linear_map(m, TOKENS, "blocks.1.hook_resid_post", pos=-1)
    many = lin_lens.linear_map(m, TOKENS, "blocks.1.hook_resid_post", pos=[2, 6])
    assert one.J.shape == (7, 16, 16)  # [n_src, d_out, d_in]
    assert many.J.shape == (2, 7, 16, 16)  # [n_tgt, n_src, d_out, d_in]
    assert torch.equal(one.J, many.J[1])
    assert torch.equal(one.constant, many.constant[1])
    # causality: position 2 does not depend on later tokens
    assert torch.count_nonzero(many.J[0, 3:]) == 0


def test_constant_by_origin_matches_forward_mode(backend):
    """Each origin's constant equals a forward-mode derivative along the origin's own value,
    computed independently (forward AD through the detached model, not reverse mode)."""
    m = tiny("gpt2", backend)
    lm = lin_lens.linear_map(m, TOKENS, "blocks.1.hook_resid_post", pos=-1)
    name = PARAMS[backend]["b_in0"]
    assert name in lm.constant_by_origin
    param = dict(m.named_parameters())[name]
    store = {}

    def grab(t, hook):
        store["act"] = t

    with lin_lens.detached(m), fwAD.dual_level():
        dual = fwAD.make_dual(param.detach(), param.detach())
        with m.hooks(fwd_hooks=[("blocks.1.hook_resid_post", grab)]):
            functional_call(m, {name: dual}, (TOKENS,))
        tangent = fwAD.unpack_dual(store["act"]).tangent
    assert torch.allclose(tangent[0, -1], lm.constant_by_origin[name], rtol=1e-12, atol=1e-12)


def test_constant_by_origin_names_biases_and_positions(backend):
    p = PARAMS[backend]
    lm = lin_lens.linear_map(tiny("gpt2", backend), TOKENS, "logits", pos=-1)
    origins = set(lm.constant_by_origin)
    assert "hook_pos_embed" in origins and p["final"] in origins
    assert p["b_O0"] in origins and p["b_out1"] in origins
    assert not any(o.endswith(p["qk"]) for o in origins)  # they only move the pattern
    total = sum(lm.constant_by_origin.values())
    assert torch.allclose(total, lm.constant, rtol=0, atol=1e-12)


def test_layer_transform_between_hooks(backend):
    m = tiny("gpt2", backend)
    lm = lin_lens.linear_map(m, TOKENS, "blocks.1.hook_resid_post", pos=-1,
                             source="blocks.1.hook_resid_pre")
    assert lm.relative_error <= 1e-13
    assert all(o.startswith(PARAMS[backend]["layer1"]) for o in lm.constant_by_origin)
    # the source activation is the cached resid_pre
    _, cache = m.run_with_cache(TOKENS)
    assert torch.equal(lm.x, cache["blocks.1.hook_resid_pre"][0])


def test_source_that_does_not_cut_the_graph_reports_the_bypass(backend):
    """With V of layer 1 as the source, the residual stream bypasses it; that part is reported
    as its own exact origin instead of leaking into the error."""
    lm = lin_lens.linear_map(tiny("gpt2", backend), TOKENS, "blocks.1.hook_resid_post", pos=-1,
                             source="blocks.1.attn.hook_v")
    assert "hook_embed" in lm.constant_by_origin
    assert lm.relative_error <= 1e-13


def test_direction_is_one_row_of_the_full_map(backend):
    m = tiny("gpt2", backend)
    u = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    full = lin_lens.linear_map(m, TOKENS, "logits", pos=-1)
    one = lin_lens.linear_map(m, TOKENS, "logits", pos=-1, direction=u)
    assert one.J.shape == (7, 1, 16)
    assert torch.allclose(one.J[:, 0], torch.einsum("o,soi->si", u, full.J), atol=1e-12)
    assert torch.allclose(one.act[0], u @ full.act, atol=1e-12)
    assert one.relative_error <= 1e-13


def test_out_index_and_head_select_rows(backend):
    m = tiny("gpt2", backend)
    full = lin_lens.linear_map(m, TOKENS, "logits", pos=-1)
    some = lin_lens.linear_map(m, TOKENS, "logits", pos=-1, out_index=[4, 9])
    assert torch.allclose(some.J, full.J[:, [4, 9]], atol=1e-12)
    result = lin_lens.linear_map(m, TOKENS, "blocks.1.attn.hook_result", pos=-1)
    head = lin_lens.linear_map(m, TOKENS, "blocks.1.attn.hook_result", pos=-1, head=2)
    assert head.J.shape == (7, 16, 16)
    assert torch.allclose(head.J, result.J[:, 2 * 16:3 * 16], atol=1e-13)


def test_text_input_and_repr(backend):
    lm = lin_lens.linear_map(tiny("gpt2", backend), [1, 2, 3], "blocks.0.hook_resid_post")
    assert "relative error" in repr(lm) and "<table" in lm._repr_html_()


# -- leaving the model exactly as it was ---------------------------------------------------------

def test_user_hooks_flags_grads_and_weights_survive(backend):
    m = tiny("gpt2", backend, fresh=True)
    seen = []
    m.hook_dict["blocks.0.attn.hook_pattern"].add_hook(lambda t, hook: seen.append(1))
    m.hook_dict["blocks.1.hook_resid_post"].add_hook(lambda t, hook: None, is_permanent=True)
    for p in m.parameters():
        p.requires_grad_(False)
    before = state(m)
    lin_lens.linear_map(m, TOKENS, "blocks.1.attn.hook_result", pos=-1)
    lin_lens.linear_map(m, TOKENS, "logits", pos=None, detach=False)
    assert_same_state(before, m)
    m(TOKENS)
    assert seen  # the user's hook still fires


def test_model_is_left_as_it_was_also_when_it_raises(backend):
    """Hooks, flags and grads survive linear_map, also when it raises."""
    model = tiny("gpt2", backend)
    before = state(model)
    lm = lin_lens.linear_map(model, TOKENS, "blocks.1.attn.hook_result", pos=-1, head=1)
    assert lm.relative_error <= 1e-12
    with pytest.raises(KeyError, match="Did you mean"):
        lin_lens.linear_map(model, TOKENS, "blocks.1.hook_resid_psot")
    with pytest.raises(IndexError):
        lin_lens.linear_map(model, TOKENS, "logits", pos=99)
    assert_same_state(before, model)
