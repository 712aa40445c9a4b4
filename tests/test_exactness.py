"""The architecture matrix: detached maps reconstruct every hook exactly; ordinary Jacobians don't.

Tiny random models with large weights and nonzero biases make every nonlinearity matter: an
unfrozen norm, gate or pattern leaves a relative error near 1 (the ordinary-Jacobian column
proves it), far above the bounds asserted here.
"""

from __future__ import annotations

import functools

import pytest
import torch

import lin_lens
from lin_lens._tl import HAS_HOOKED
from lin_lens.testing import BIAS_FREE, BRIDGE_ARCHS, HOOKED_ARCHS, tiny_bridge, tiny_model

hooked = pytest.mark.skipif(not HAS_HOOKED, reason="this transformer_lens has no HookedTransformer")

BOUND = {torch.float64: 1e-13, torch.float32: 1e-5}
ORDINARY_MIN = 1e-3
HOOKS = [
    "hook_embed",
    "hook_pos_embed",
    "blocks.0.hook_resid_pre",
    "blocks.1.hook_resid_pre",
    "blocks.1.hook_resid_mid",
    "blocks.1.hook_resid_post",
    "blocks.0.hook_attn_out",
    "blocks.1.hook_mlp_out",
    "blocks.1.attn.hook_v",
    "blocks.1.attn.hook_z",
    "blocks.1.attn.hook_result",
    "blocks.1.mlp.hook_pre",
    "blocks.1.mlp.hook_post",
    "ln_final.hook_normalized",
    "logits",
]
TOKENS = torch.tensor([[3, 17, 42, 8, 8, 29, 11]])


@functools.cache
def hooked_model(arch: str, dtype: torch.dtype):
    return tiny_model(arch, dtype)


@functools.cache
def bridge_model(arch: str, dtype: torch.dtype):
    return tiny_bridge(arch, dtype)


def _present(model, hooks):
    # the Bridge registers hook_pos_embed on rotary models too, where it never fires
    learned_pos = getattr(model.cfg, "positional_embedding_type", "standard") == "standard"
    return [h for h in hooks if h == "logits" or (h in model.hook_dict and
                                                  (h != "hook_pos_embed" or learned_pos))]


def _check_matrix(model, dtype, hooks, bound):
    worst, report = 0.0, []
    for hook in _present(model, hooks):
        lm = lin_lens.linear_map(model, TOKENS, hook, pos=None)
        err = lm.relative_error
        worst = max(worst, err)
        assert err <= bound, f"{hook}: relative error {err:.2e} > {bound:.0e}"
        # linear even undetached: the embeddings themselves
        trivial = hook in ("hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre")
        if not trivial:
            ordinary = lin_lens.linear_map(model, TOKENS, hook, pos=None, detach=False)
            assert ordinary.relative_error >= ORDINARY_MIN, (
                f"{hook}: ordinary Jacobian reconstructs too well "
                f"({ordinary.relative_error:.2e}); the test would not catch an unfrozen factor"
            )
            report.append((hook, err, ordinary.relative_error))
    return worst, report


@hooked
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("arch", list(HOOKED_ARCHS))
def test_hooked_matrix(arch, dtype):
    model = hooked_model(arch, dtype)
    worst, _ = _check_matrix(model, dtype, HOOKS, BOUND[dtype])
    assert worst > 0 or dtype == torch.float64


@hooked
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("arch", list(HOOKED_ARCHS))
def test_hooked_forward_bit_identical(arch, dtype):
    """Logits and every cached activation are bit-identical in detached mode."""
    model = hooked_model(arch, dtype)
    with torch.no_grad():
        logits, cache = model.run_with_cache(TOKENS)
        with lin_lens.detached(model):
            logits_d, cache_d = model.run_with_cache(TOKENS)
    assert torch.equal(logits, logits_d)
    assert set(cache.keys()) == set(cache_d.keys())
    for k in cache.keys():
        assert torch.equal(cache[k], cache_d[k]), k


@hooked
@pytest.mark.parametrize("arch", sorted(BIAS_FREE))
def test_bias_free_constant_is_exactly_zero(arch):
    lm = lin_lens.linear_map(hooked_model(arch, torch.float64), TOKENS, "logits", pos=None)
    assert lm.constant_by_origin == {}
    assert torch.count_nonzero(lm.constant) == 0


@hooked
def test_moe_is_exact():
    # TransformerLens's MoE router is a float32 nn.Linear, so this family runs in float32.
    model = tiny_model("llama", torch.float32, num_experts=4, experts_per_token=2)
    for hook in ["blocks.1.hook_mlp_out", "logits"]:
        exact = lin_lens.linear_map(model, TOKENS, hook, pos=None)
        ordinary = lin_lens.linear_map(model, TOKENS, hook, pos=None, detach=False)
        assert exact.relative_error <= 1e-5 and ordinary.relative_error > 1e-3


@hooked
@pytest.mark.parametrize("act", ["gelu", "gelu_fast", "silu", "relu2", "solu"])
def test_every_plain_activation(act):
    model = tiny_model("gpt2", torch.float64, act_fn=act)
    lm = lin_lens.linear_map(model, TOKENS, "blocks.1.hook_mlp_out", pos=None)
    assert lm.relative_error <= 1e-13
    ordinary = lin_lens.linear_map(model, TOKENS, "blocks.1.hook_mlp_out", pos=None, detach=False)
    assert ordinary.relative_error > 1e-3


# -- TransformerBridge ---------------------------------------------------------------------------

# How far the detached forward may move from the plain one on the Bridge (relative to max |logit|).
# Hugging Face's RMSNorm computes in float32 even for float64 models; detached mode recomputes the
# norm in the model's dtype, so float64 moves by float32 rounding (it gets *more* accurate).
# LayerNorms on the native path (GPT-NeoX) are recomputed unfused: float32 rounding there too.
BRIDGE_FORWARD_BOUND = {torch.float64: 1e-5, torch.float32: 1e-5}
BIT_IDENTICAL_F32 = {"llama", "gpt2", "qwen3", "gemma3"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("arch", BRIDGE_ARCHS)
def test_bridge_matrix(arch, dtype):
    model = bridge_model(arch, dtype)
    bound = 1e-12 if dtype == torch.float64 else 1e-5
    _check_matrix(model, dtype, HOOKS, bound)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("arch", BRIDGE_ARCHS)
def test_bridge_forward_difference_is_bounded(arch, dtype):
    model = bridge_model(arch, dtype)
    with torch.no_grad():
        plain = model(TOKENS)
        with lin_lens.detached(model):
            det = model(TOKENS)
    rel = float((plain - det).abs().max() / plain.abs().max())
    print(f"{arch} {dtype}: detached forward moves logits by {rel:.1e} (relative to max |logit|)")
    assert rel <= BRIDGE_FORWARD_BOUND[dtype]
    if dtype == torch.float32 and arch in BIT_IDENTICAL_F32:
        assert torch.equal(plain, det)


def test_opt_bridge_attention_is_refused():
    """The plain AttentionBridge silently drops hook_pattern edits: refuse, naming it."""
    import transformers as tf

    from lin_lens._tl import TransformerBridge
    from lin_lens.testing import tiny_tokenizer

    cfg = tf.OPTConfig(vocab_size=50, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=16)
    hf = tf.OPTForCausalLM(cfg).double().eval()
    b = TransformerBridge.boot_transformers("tiny-opt", hf_model=hf, tokenizer=tiny_tokenizer(50),
                                            device="cpu", dtype=torch.float64)
    before = _hook_ids(b)
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="AttentionBridge.*cannot be frozen"):
        lin_lens.linear_map(b, TOKENS, "logits")
    assert _hook_ids(b) == before


def test_bridge_is_left_as_it_was():
    """Hooks, flags and grads on the Bridge survive linear_map, also when it raises."""
    model = bridge_model("gpt2", torch.float64)
    before_hooks = _hook_ids(model)
    before_flag = model.cfg.use_attn_result
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    lm = lin_lens.linear_map(model, TOKENS, "blocks.1.attn.hook_result", pos=-1, head=1)
    assert lm.relative_error <= 1e-12
    with pytest.raises(KeyError, match="Did you mean"):
        lin_lens.linear_map(model, TOKENS, "blocks.1.hook_resid_psot")
    with pytest.raises(IndexError):
        lin_lens.linear_map(model, TOKENS, "logits", pos=99)
    assert model.cfg.use_attn_result == before_flag
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    assert _hook_ids(model) == before_hooks


def _hook_ids(model):
    """Every forward hook on every hook point (TL 4 installs some of its own)."""
    return {n: [h.hook.id for h in hp.fwd_hooks] for n, hp in model.hook_dict.items()}
