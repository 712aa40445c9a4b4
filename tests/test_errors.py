"""Bad input gets a clear error, and the model is left exactly as it was."""

from __future__ import annotations

import pytest
import torch

import lin_lens
from lin_lens._tl import HAS_HOOKED
from lin_lens.testing import tiny_model

pytestmark = pytest.mark.skipif(not HAS_HOOKED, reason="needs HookedTransformer (TL < 4)")
TOKENS = torch.tensor([[3, 17, 42, 8, 8, 29, 11]])


@pytest.fixture
def model():
    return tiny_model("gpt2", torch.float64)


def _untouched(m):
    assert all(not hp.fwd_hooks for hp in m.hook_dict.values())
    assert not m.cfg.use_attn_result
    assert not lin_lens.is_detached(m)


def test_unknown_hook_suggests_close_names(model):
    with pytest.raises(KeyError, match=r"Did you mean: blocks\.1\.hook_resid_post"):
        lin_lens.linear_map(model, TOKENS, "blocks.1.hook_resid_pots")
    with pytest.raises(KeyError, match="Unknown hook"):
        lin_lens.linear_map(model, TOKENS, "logits", source="hook_embd")
    _untouched(model)


@pytest.mark.parametrize("pos", [7, -8, [0, 9], slice(9, 12)])
def test_position_out_of_range(model, pos):
    with pytest.raises(IndexError, match="out of range|selects no position"):
        lin_lens.linear_map(model, TOKENS, "logits", pos=pos)
    _untouched(model)


@pytest.mark.parametrize("bad", ["", [], torch.zeros(1, 0, dtype=torch.long)])
def test_empty_input(model, bad):
    with pytest.raises(ValueError, match="empty"):
        lin_lens.linear_map(model, bad, "logits")
    _untouched(model)


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
    with pytest.raises(ValueError, match=why):
        lin_lens.linear_map(model, TOKENS, hook)
    _untouched(model)


def test_target_before_source(model):
    with pytest.raises(ValueError, match="before source"):
        lin_lens.linear_map(model, TOKENS, "blocks.0.hook_resid_post",
                            source="blocks.1.hook_resid_pre")
    _untouched(model)


def test_head_errors(model):
    with pytest.raises(IndexError, match="head 4 out of range"):
        lin_lens.linear_map(model, TOKENS, "blocks.0.attn.hook_z", head=4)
    with pytest.raises(ValueError, match="per-head hook"):
        lin_lens.linear_map(model, TOKENS, "blocks.0.hook_resid_post", head=0)
    _untouched(model)


def test_unsupported_activation_is_named():
    m = tiny_model("gpt2", torch.float64, act_fn="xielu")
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="xielu"):
        lin_lens.linear_map(m, TOKENS, "logits")
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="xielu"):
        with lin_lens.detached(m):
            pass
    _untouched(m)


def test_active_clip_qkv_is_named():
    m = tiny_model("llama", torch.float64, clip_qkv=0.05)
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="clip_qkv"):
        lin_lens.linear_map(m, TOKENS, "logits")
    _untouched(m)


def test_wrong_act_fn_is_caught_not_silently_inexact():
    """If cfg.act_fn lies about the activation, the gate check refuses instead of answering."""
    m = tiny_model("gpt2", torch.float64)
    m.cfg.act_fn = "silu"  # the modules still compute gelu_new
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="activation"):
        lin_lens.linear_map(m, TOKENS, "logits")
    _untouched(m)


def test_not_exact_error_carries_the_map(model):
    with pytest.raises(lin_lens.NotExactError) as info:
        lin_lens.linear_map(model, TOKENS, "logits", tol=0.0)
    assert info.value.linear_map.relative_error < 1e-13
    _untouched(model)
