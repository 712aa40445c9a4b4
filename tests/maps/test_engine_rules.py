"""The forward engine is exact where it is chosen, or falls back; features no engine can freeze
are refused by name (fuzz findings: rotary / q-k-norm targets, split q/k/v inputs, GPT-OSS)."""

from __future__ import annotations

import pytest
import torch

import lin_lens
from lin_lens.testing import tiny_model
from tests.conftest import requires_hooked

TOKENS = torch.tensor([[3, 17, 42, 8, 9, 11]])
pytestmark = requires_hooked("TL config overrides and the replay (HookedTransformer only)")


@pytest.mark.parametrize("arch,hook", [("llama", "blocks.0.attn.hook_rot_q"),
                                       ("llama", "blocks.1.attn.hook_rot_k"),
                                       ("qwen3", "blocks.0.attn.hook_rot_q"),
                                       ("qwen3", "blocks.1.attn.hook_q")])
@pytest.mark.parametrize("pos", [-1, None])
def test_q_k_branch_targets_exact_in_every_engine(arch, hook, pos):
    """A shifted replay would move the rotary angle (0.88 relative error before): the engine
    replays such targets at full length, so forward, auto and reverse all agree."""
    m = tiny_model(arch)
    maps = {e: lin_lens.operators_at_hooks(m, TOKENS, [hook], pos=pos, engine=e)[hook]
            for e in ("forward", "auto", "reverse")}
    for e, lm in maps.items():
        assert lm.relative_error < 1e-12, (e, lm.relative_error)
        assert torch.allclose(lm.J4, maps["reverse"].J4, rtol=0, atol=1e-12), e


@pytest.mark.parametrize("pos", [-1, None])
def test_split_qkv_inputs_with_gqa(pos):
    """Norms that fire once per q/k/v input are replayed firing by firing (a crash before)."""
    m = tiny_model("llama", use_split_qkv_input=True)
    hooks = lin_lens.maps.layer_sweep_hooks(m)
    fwd = lin_lens.operators_at_hooks(m, TOKENS, hooks, pos=pos, engine="forward")
    rev = lin_lens.operators_at_hooks(m, TOKENS, hooks, pos=pos, engine="reverse")
    for h in hooks:
        assert torch.allclose(fwd[h].J4, rev[h].J4, rtol=0, atol=1e-12), h
    assert lin_lens.layer_sweep(m, TOKENS, k=1).relative_error["resid_post"].max() < 1e-12


def test_hooks_without_a_position_layout_are_refused():
    with pytest.raises(lin_lens.UnsupportedFeatureError, match=r"not \[batch, pos"):
        lin_lens.linear_map(tiny_model("qwen3"), TOKENS, "blocks.0.attn.q_norm.hook_normalized")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpt_oss_experts_are_refused(dtype):
    m = tiny_model("llama", dtype, original_architecture="GptOssForCausalLM", num_experts=4,
                   experts_per_token=2)
    for kw in (dict(), dict(check=False)):
        with pytest.raises(lin_lens.UnsupportedFeatureError, match="GPT-OSS"):
            lin_lens.linear_map(m, TOKENS, "logits", **kw)
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="GPT-OSS"):
        with lin_lens.detached(m):
            pass


def test_detached_forward_bit_identical_after_an_overflow():
    """A soft-capped readout whose input overflows to inf: the relinearised gate used to give
    inf − inf = nan logits (55 of 500 here); the detached forward equals the plain one."""
    m = tiny_model("gemma", torch.float32)
    with torch.no_grad():
        m.W_U.mul_(1e38)
    toks = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = m(toks)
        with lin_lens.detached(m):
            det = m(toks)
    assert not torch.isnan(det).any() and torch.equal(plain, det)
