"""Bad input gets a clear error, and the model is left exactly as it was."""

from __future__ import annotations

import pytest
import torch

import lin_lens
from lin_lens.testing import tiny_model
from tests.conftest import assert_same_state, requires_hooked, state, tiny

TOKENS = torch.tensor([[3, 17, 42, 8, 8, 29, 11]])


@pytest.fixture
def model(backend):
    return tiny("gpt2", backend)


def test_unknown_hook_suggests_close_names(model):
    before = state(model)
    with pytest.raises(KeyError, match=r"Did you mean: blocks\.1\.hook_resid_post"):
        lin_lens.linear_map(model, TOKENS, "blocks.1.hook_resid_pots")
    with pytest.raises(KeyError, match="Unknown hook"):
        lin_lens.linear_map(model, TOKENS, "logits", source="hook_embd")
    assert_same_state(before, model)


@pytest.mark.parametrize("pos", [7, -8, [0, 9], slice(9, 12)])
def test_position_out_of_range(model, pos):
    before = state(model)
    with pytest.raises(IndexError, match="out of range|selects no position"):
        lin_lens.linear_map(model, TOKENS, "logits", pos=pos)
    assert_same_state(before, model)


@pytest.mark.parametrize("bad", ["", [], torch.zeros(1, 0, dtype=torch.long)])
def test_empty_input(model, bad):
    before = state(model)
    with pytest.raises(ValueError, match="empty"):
        lin_lens.linear_map(model, bad, "logits")
    assert_same_state(before, model)


def test_bad_tokens(model):
    with pytest.raises(ValueError, match="out of range for d_vocab"):
        lin_lens.linear_map(model, [1, 2, 999], "logits")
    with pytest.raises(ValueError, match="one prompt at a time"):
        lin_lens.linear_map(model, torch.zeros(2, 3, dtype=torch.long), "logits")
    with pytest.raises(TypeError, match="integers"):
        lin_lens.linear_map(model, torch.zeros(3), "logits")


@pytest.mark.parametrize(
    "hook,why",
    [
        ("blocks.0.attn.hook_pattern", "softmax"),
        ("blocks.0.attn.hook_attn_scores", "bilinear"),
        ("blocks.1.ln2.hook_scale", "scale"),
    ],
)
def test_hooks_without_an_exact_linear_map(model, hook, why):
    before = state(model)
    with pytest.raises(ValueError, match=why):
        lin_lens.linear_map(model, TOKENS, hook)
    assert_same_state(before, model)


def test_target_before_source(model):
    before = state(model)
    with pytest.raises(ValueError, match="before source"):
        lin_lens.linear_map(model, TOKENS, "blocks.0.hook_resid_post",
                            source="blocks.1.hook_resid_pre")
    assert_same_state(before, model)


def test_head_errors(model):
    before = state(model)
    with pytest.raises(IndexError, match="head 4 out of range"):
        lin_lens.linear_map(model, TOKENS, "blocks.0.attn.hook_z", head=4)
    with pytest.raises(ValueError, match="per-head hook"):
        lin_lens.linear_map(model, TOKENS, "blocks.0.hook_resid_post", head=0)
    assert_same_state(before, model)


def test_not_exact_error_carries_the_map(model):
    before = state(model)
    with pytest.raises(lin_lens.NotExactError) as info:
        lin_lens.linear_map(model, TOKENS, "logits", tol=1e-300)
    assert info.value.linear_map.relative_error < 1e-13
    assert_same_state(before, model)


# -- arguments that were silently ignored or misread (fuzz findings) ---------------------------

def test_integer_scalars_of_numpy_and_torch_are_positions(backend):
    import numpy as np

    m = tiny("gpt2", backend)
    ref = lin_lens.linear_map(m, TOKENS, "logits", pos=2, out_index=[3])
    for pos in (np.int64(2), torch.tensor(2)):
        got = lin_lens.linear_map(m, TOKENS, "logits", pos=pos, out_index=[3])
        assert got.J.shape == ref.J.shape and torch.equal(got.J, ref.J)


@pytest.mark.parametrize("kw, msg", [
    (dict(pos=[2.9]), "expected an integer"),
    (dict(pos=True), "expected an int"),
    (dict(pos="last"), "expected an int"),
    (dict(out_index=[1.7]), "integers"),
    (dict(out_index=torch.ones(50, dtype=torch.bool)), "boolean mask"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=-3), "chunk_size"),
    (dict(head=1), "head= is for per-head hooks"),
    (dict(tol=0.0), "tol must be a positive"),
    (dict(tol=float("nan")), "tol must be a positive"),
    (dict(direction=torch.full((50,), float("nan"), dtype=torch.float64)), "NaN"),
])
def test_misread_arguments_are_refused(backend, kw, msg):
    m = tiny("gpt2", backend)
    with pytest.raises(lin_lens.InvalidArgumentError, match=msg):
        lin_lens.linear_map(m, TOKENS, "logits", **kw)


def test_head_with_out_index_and_layers_out_of_range(backend):
    m = tiny("gpt2", backend)
    with pytest.raises(lin_lens.InvalidArgumentError, match="head= selects the rows itself"):
        lin_lens.linear_map(m, TOKENS, "blocks.1.attn.hook_z", head=0, out_index=[1])
    with pytest.raises(IndexError, match="out of range"):
        lin_lens.layer_sweep(m, TOKENS, layers=[5])


def test_environment_errors_name_the_cause(backend):
    m = tiny("gpt2", backend)
    with lin_lens.detached(m), pytest.raises(lin_lens.InvalidArgumentError, match="detach=False"):
        lin_lens.linear_map(m, TOKENS, "logits", detach=False)
    with torch.inference_mode(), pytest.raises(lin_lens.InvalidArgumentError,
                                               match="inference_mode"):
        lin_lens.linear_map(m, TOKENS, "logits")
    with pytest.raises(lin_lens.InvalidArgumentError, match="n_ctx"):
        lin_lens.linear_map(m, torch.randint(0, 40, (1, 80)), "logits")
    with pytest.raises(lin_lens.InvalidArgumentError, match="k must be a positive int"):
        lin_lens.top_singular(m, TOKENS, "logits", k=0)


def test_top_singular_refusals(backend):
    m = tiny("gpt2", backend)
    short = TOKENS[:, :2]
    with pytest.raises(lin_lens.InvalidArgumentError, match="rank bound"):
        lin_lens.top_singular(m, short, "blocks.1.hook_resid_post", pos=0, k=20)
    for kw, msg in ((dict(block=0), "block"), (dict(tol=-1.0), "tol")):
        with pytest.raises(lin_lens.InvalidArgumentError, match=msg):
            lin_lens.top_singular(m, TOKENS, "logits", k=2, **kw)


@requires_hooked("a float16 tiny HookedTransformer (TL config dtype)")
def test_top_singular_refuses_half_precision():
    m = tiny_model("gpt2", torch.float16)
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="float32 or float64"):
        lin_lens.top_singular(m, TOKENS, "logits", k=2)


@requires_hooked("GQA via n_key_value_heads (TL config)")
def test_attn_in_with_gqa_names_the_cause():
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="grouped-query"):
        lin_lens.linear_map(tiny_model("llama"), TOKENS, "blocks.0.hook_attn_in")


@requires_hooked("edits W_U of a tiny HookedTransformer")
def test_direction_between_near_duplicate_tokens_is_accepted():
    """uᵀlogits ≈ 3e-9 computed from logits ≈ 0.05 carries ~1e-16 of rounding: measured on the
    scale |u|ᵀ|act| the exact map passes (it was refused at 5e-8 relative); a wrong J does not."""
    m = tiny_model("gpt2")
    with torch.no_grad():
        noise = torch.randn(m.W_U.shape[0], dtype=torch.float64,
                            generator=torch.Generator().manual_seed(0))
        m.W_U[:, 7] = m.W_U[:, 5] + 1e-9 * noise
    u = torch.zeros(50, dtype=torch.float64)
    u[5], u[7] = 1.0, -1.0
    lm = lin_lens.linear_map(m, TOKENS, "logits", direction=u)
    assert lm.relative_error < 1e-12
    lm.J4 *= 2  # a wrong J is still far above the float64 tolerance (1e-10)
    assert lm.relative_error > 10 * lin_lens.default_tolerance(torch.float64)
