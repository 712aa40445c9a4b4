"""The linear_map API: layouts, constants, sources, directions, and leaving the model as it was."""

from __future__ import annotations

import functools

import pytest
import torch

import lin_lens
from lin_lens._tl import HAS_HOOKED
from lin_lens.testing import tiny_model

pytestmark = pytest.mark.skipif(not HAS_HOOKED, reason="needs HookedTransformer (TL < 4)")
TOKENS = torch.tensor([[3, 17, 42, 8, 8, 29, 11]])


@functools.cache
def gpt2():
    return tiny_model("gpt2", torch.float64)


def test_layout_int_pos_and_list_pos():
    m = gpt2()
    one = lin_lens.linear_map(m, TOKENS, "blocks.1.hook_resid_post", pos=-1)
    many = lin_lens.linear_map(m, TOKENS, "blocks.1.hook_resid_post", pos=[2, 6])
    assert one.J.shape == (7, 16, 16)  # [n_src, d_out, d_in]
    assert many.J.shape == (2, 7, 16, 16)  # [n_tgt, n_src, d_out, d_in]
    assert torch.equal(one.J, many.J[1])
    assert torch.equal(one.constant, many.constant[1])
    # causality: position 2 does not depend on later tokens
    assert torch.count_nonzero(many.J[0, 3:]) == 0


def test_constant_by_origin_matches_forward_mode():
    """Each origin's constant equals a forward-mode derivative along the origin's own value,
    computed independently (forward AD through the detached model, not reverse mode)."""
    m = gpt2()
    lm = lin_lens.linear_map(m, TOKENS, "blocks.1.hook_resid_post", pos=-1)
    name = "blocks.0.mlp.b_in"
    assert name in lm.constant_by_origin
    param = dict(m.named_parameters())[name]
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call

    with lin_lens.detached(m), fwAD.dual_level():
        dual = fwAD.make_dual(param.detach(), param.detach())
        _, cache = _run_functional(m, functional_call, {name: dual})
        tangent = fwAD.unpack_dual(cache).tangent
    assert torch.allclose(tangent[0, -1], lm.constant_by_origin[name], rtol=1e-12, atol=1e-12)


def _run_functional(m, functional_call, params):
    store = {}

    def grab(t, hook):
        store["act"] = t

    m.blocks[1].hook_resid_post.add_hook(grab)
    try:
        functional_call(m, params, (TOKENS,))
    finally:
        m.blocks[1].hook_resid_post.remove_hooks()
    return None, store["act"]


def test_constant_by_origin_names_biases_and_positions():
    lm = lin_lens.linear_map(gpt2(), TOKENS, "logits", pos=-1)
    origins = set(lm.constant_by_origin)
    assert "hook_pos_embed" in origins and "unembed.b_U" in origins
    assert "blocks.0.attn.b_O" in origins and "blocks.1.mlp.b_out" in origins
    assert not any(o.endswith(("b_Q", "b_K")) for o in origins)  # they only move the pattern
    total = sum(lm.constant_by_origin.values())
    assert torch.allclose(total, lm.constant, rtol=0, atol=1e-12)


def test_layer_transform_between_hooks():
    m = gpt2()
    lm = lin_lens.linear_map(m, TOKENS, "blocks.1.hook_resid_post", pos=-1,
                             source="blocks.1.hook_resid_pre")
    assert lm.relative_error <= 1e-13
    assert all(o.startswith("blocks.1.") for o in lm.constant_by_origin)
    # the source activation is the cached resid_pre
    _, cache = m.run_with_cache(TOKENS)
    assert torch.equal(lm.x, cache["blocks.1.hook_resid_pre"][0])


def test_source_that_does_not_cut_the_graph_reports_the_bypass():
    """With V of layer 1 as the source, the residual stream bypasses it; that part is reported
    as its own exact origin instead of leaking into the error."""
    lm = lin_lens.linear_map(gpt2(), TOKENS, "blocks.1.hook_resid_post", pos=-1,
                             source="blocks.1.attn.hook_v")
    assert "hook_embed" in lm.constant_by_origin
    assert lm.relative_error <= 1e-13


def test_direction_is_one_row_of_the_full_map():
    m = gpt2()
    u = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full = lin_lens.linear_map(m, TOKENS, "logits", pos=-1)
    one = lin_lens.linear_map(m, TOKENS, "logits", pos=-1, direction=u)
    assert one.J.shape == (7, 1, 16)
    assert torch.allclose(one.J[:, 0], torch.einsum("o,soi->si", u, full.J), atol=1e-12)
    assert torch.allclose(one.act[0], u @ full.act, atol=1e-12)
    assert one.relative_error <= 1e-13


def test_out_index_and_head_select_rows():
    m = gpt2()
    full = lin_lens.linear_map(m, TOKENS, "logits", pos=-1)
    some = lin_lens.linear_map(m, TOKENS, "logits", pos=-1, out_index=[4, 9])
    assert torch.allclose(some.J, full.J[:, [4, 9]], atol=1e-12)
    result = lin_lens.linear_map(m, TOKENS, "blocks.1.attn.hook_result", pos=-1)
    head = lin_lens.linear_map(m, TOKENS, "blocks.1.attn.hook_result", pos=-1, head=2)
    assert head.J.shape == (7, 16, 16)
    assert torch.allclose(head.J, result.J[:, 2 * 16:3 * 16], atol=1e-13)


def test_text_input_and_repr():
    m = tiny_model("gpt2", torch.float64)
    lm = lin_lens.linear_map(m, [1, 2, 3], "blocks.0.hook_resid_post")
    assert "relative error" in repr(lm) and "<table" in lm._repr_html_()


# -- leaving the model exactly as it was ---------------------------------------------------------

def _state(m):
    hooks = {n: [h.hook.id for h in hp.fwd_hooks] for n, hp in m.hook_dict.items()}
    flags = (m.cfg.use_attn_result, m.cfg.use_split_qkv_input, m.cfg.use_hook_mlp_in)
    grads = {n: p.requires_grad for n, p in m.named_parameters()}
    weights = {n: p.detach().clone() for n, p in m.named_parameters()}
    return hooks, flags, grads, weights


def _same(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[2] == b[2]
    assert all(torch.equal(a[3][n], b[3][n]) for n in a[3])


def test_user_hooks_flags_grads_and_weights_survive():
    m = tiny_model("gpt2", torch.float64)
    seen = []
    m.blocks[0].attn.hook_pattern.add_hook(lambda t, hook: seen.append(1))
    m.blocks[1].hook_resid_post.add_hook(lambda t, hook: None, is_permanent=True)
    for p in m.parameters():
        p.requires_grad_(False)
    before = _state(m)
    lin_lens.linear_map(m, TOKENS, "blocks.1.attn.hook_result", pos=-1)
    lin_lens.linear_map(m, TOKENS, "logits", pos=None, detach=False)
    _same(before, _state(m))
    m(TOKENS)
    assert seen  # the user's hook still fires


def test_nesting_installs_once_and_exception_restores():
    m = tiny_model("llama", torch.float64)
    before = _state(m)
    n_hooks = lambda: sum(len(hp.fwd_hooks) for hp in m.hook_dict.values())  # noqa: E731
    with lin_lens.detached(m):
        inside = n_hooks()
        with lin_lens.detached(m):
            assert n_hooks() == inside and lin_lens.is_detached(m)
        assert lin_lens.is_detached(m)
    assert not lin_lens.is_detached(m)
    with pytest.raises(RuntimeError, match="boom"):
        with lin_lens.detached(m):
            raise RuntimeError("boom")
    _same(before, _state(m))
    assert n_hooks() == 0


def test_linear_map_inside_detached_block():
    m = tiny_model("gpt2", torch.float64)
    with lin_lens.detached(m):
        lm = lin_lens.linear_map(m, TOKENS, "logits")
        assert lin_lens.is_detached(m)
    assert lm.relative_error <= 1e-13
    assert not lin_lens.is_detached(m)
