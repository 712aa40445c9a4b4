"""Detached mode itself: the forward is unchanged (bit-identical, or bounded where Hugging Face
computes in float32), blocks nest and restore on exceptions, and features that cannot be frozen
are refused by name, leaving the model as it was."""

from __future__ import annotations

import pytest
import torch

import lin_lens
from lin_lens._tl import TransformerBridge
from lin_lens.testing import tiny_model, tiny_tokenizer
from tests.conftest import (
    ARCHS,
    BACKENDS,
    DEVICE,
    assert_same_state,
    requires_hooked,
    state,
    tiny,
)

TOKENS = torch.tensor([[3, 17, 42, 8, 8, 29, 11]], device=DEVICE)
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])

# How far the detached forward may move from the plain one on the Bridge (relative to max |logit|).
# Hugging Face's RMSNorm computes in float32 even for float64 models; detached mode recomputes the
# norm in the model's dtype, so float64 moves by float32 rounding (it gets *more* accurate).
# LayerNorms on the native path (GPT-NeoX) are recomputed unfused: float32 rounding there too.
BRIDGE_FORWARD_BOUND = {torch.float64: 1e-5, torch.float32: 1e-5}
BIT_IDENTICAL_F32 = {"llama", "gpt2", "qwen3", "gemma"}


@DTYPES
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_unchanged(arch, backend, dtype):
    """HookedTransformer: logits and every cached activation are bit-identical in detached mode.
    Bridge: logits move by at most float32 rounding, and not at all in float32 where HF's own
    modules are not recomputed."""
    model = tiny(arch, backend, dtype)
    if backend == "bridge":
        with torch.no_grad():
            plain = model(TOKENS)
            with lin_lens.detached(model):
                det = model(TOKENS)
        rel = float((plain - det).abs().max() / plain.abs().max())
        print(f"{arch} {dtype}: detached forward moves logits by {rel:.1e} (relative)")
        assert rel <= BRIDGE_FORWARD_BOUND[dtype]
        if dtype == torch.float32 and arch in BIT_IDENTICAL_F32:
            assert torch.equal(plain, det)
        return
    with torch.no_grad():
        logits, cache = model.run_with_cache(TOKENS)
        with lin_lens.detached(model):
            logits_d, cache_d = model.run_with_cache(TOKENS)
    assert torch.equal(logits, logits_d)
    assert set(cache.keys()) == set(cache_d.keys())
    for k in cache.keys():
        assert torch.equal(cache[k], cache_d[k]), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_nesting_installs_once_and_exception_restores(backend):
    m = tiny("llama", backend)
    before = state(m)
    n_hooks = lambda: sum(len(hp.fwd_hooks) for hp in m.hook_dict.values())  # noqa: E731
    n0 = n_hooks()  # zero on a HookedTransformer; TL 4 Bridges install some of their own
    with lin_lens.detached(m):
        inside = n_hooks()
        assert inside > n0
        with lin_lens.detached(m):
            assert n_hooks() == inside and lin_lens.is_detached(m)
        assert lin_lens.is_detached(m)
    assert not lin_lens.is_detached(m)
    with pytest.raises(RuntimeError, match="boom"):
        with lin_lens.detached(m):
            raise RuntimeError("boom")
    assert_same_state(before, m)
    assert n_hooks() == n0


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_map_inside_detached_block(backend):
    m = tiny("gpt2", backend)
    with lin_lens.detached(m):
        lm = lin_lens.linear_map(m, TOKENS, "logits")
        assert lin_lens.is_detached(m)
    assert lm.relative_error <= 1e-13
    assert not lin_lens.is_detached(m)


# -- refusals ------------------------------------------------------------------------------------

@requires_hooked("the activation is a HookedTransformerConfig act_fn= override")
def test_unsupported_activation_is_named():
    m = tiny_model("gpt2", torch.float64, act_fn="xielu")
    before = state(m)
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="xielu"):
        lin_lens.linear_map(m, TOKENS, "logits")
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="xielu"):
        with lin_lens.detached(m):
            pass
    assert_same_state(before, m)


@requires_hooked("clip_qkv is a HookedTransformerConfig override")
def test_active_clip_qkv_is_named():
    m = tiny_model("llama", torch.float64, clip_qkv=0.05)
    before = state(m)
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="clip_qkv"):
        lin_lens.linear_map(m, TOKENS, "logits")
    assert_same_state(before, m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_act_fn_is_caught_not_silently_inexact(backend):
    """If cfg.act_fn lies about the activation, the gate check refuses instead of answering."""
    m = tiny("gpt2", backend, fresh=True)
    m.cfg.act_fn = "silu"  # the modules still compute gelu_new
    before = state(m)
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="activation"):
        lin_lens.linear_map(m, TOKENS, "logits")
    assert_same_state(before, m)


def test_opt_bridge_attention_is_refused():
    """The plain AttentionBridge silently drops hook_pattern edits: refuse, naming it. (A Bridge
    feature: OPT is wrapped by the plain AttentionBridge, which has no HookedTransformer twin.)"""
    import transformers as tf

    cfg = tf.OPTConfig(vocab_size=50, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=16)
    hf = tf.OPTForCausalLM(cfg).double().eval()
    b = TransformerBridge.boot_transformers("tiny-opt", hf_model=hf, tokenizer=tiny_tokenizer(50),
                                            device="cpu", dtype=torch.float64)
    before = state(b)
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="AttentionBridge.*cannot be frozen"):
        lin_lens.linear_map(b, TOKENS, "logits")
    assert_same_state(before, b)
