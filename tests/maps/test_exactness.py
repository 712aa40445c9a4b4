"""The architecture matrix: detached maps reconstruct every hook exactly; ordinary Jacobians don't.

Tiny random models with large weights and nonzero biases make every nonlinearity matter: an
unfrozen norm, gate or pattern leaves a relative error near 1 (the ordinary-Jacobian column
proves it), far above the bounds asserted here.
"""

from __future__ import annotations

import pytest
import torch

import lin_lens
from lin_lens.testing import BIAS_FREE, tiny_model
from tests.conftest import ARCHS, BACKENDS, requires_hooked, tiny

DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
# float64 on the Bridge: Hugging Face modules (RMSNorm, rotary) compute parts in float32.
BOUND = {("hooked", torch.float64): 1e-13, ("bridge", torch.float64): 1e-12,
         ("hooked", torch.float32): 1e-5, ("bridge", torch.float32): 1e-5}
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


def _present(model, hooks):
    # the Bridge registers hook_pos_embed on rotary models too, where it never fires
    learned_pos = getattr(model.cfg, "positional_embedding_type", "standard") == "standard"
    return [h for h in hooks if h == "logits" or (h in model.hook_dict and
                                                  (h != "hook_pos_embed" or learned_pos))]


def _check_matrix(model, hooks, bound):
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


@DTYPES
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_matrix(arch, backend, dtype):
    worst, _ = _check_matrix(tiny(arch, backend, dtype), HOOKS, BOUND[backend, dtype])
    assert worst > 0 or dtype == torch.float64


@requires_hooked("the SoLU and ReLU families are act_fn overrides of a tiny HookedTransformer")
@DTYPES
@pytest.mark.parametrize("arch", ["solu", "relu"])
def test_matrix_activation_families(arch, dtype):
    worst, _ = _check_matrix(tiny(arch, "hooked", dtype), HOOKS, BOUND["hooked", dtype])
    assert worst > 0 or dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", sorted(BIAS_FREE))
def test_bias_free_constant_is_exactly_zero(arch, backend):
    lm = lin_lens.linear_map(tiny(arch, backend), TOKENS, "logits", pos=None)
    assert lm.constant_by_origin == {}
    assert torch.count_nonzero(lm.constant) == 0


@requires_hooked("MoE is a HookedTransformerConfig override (num_experts=, experts_per_token=)")
def test_moe_is_exact():
    # TransformerLens's MoE router is a float32 nn.Linear, so this family runs in float32.
    model = tiny_model("llama", torch.float32, num_experts=4, experts_per_token=2)
    for hook in ["blocks.1.hook_mlp_out", "logits"]:
        exact = lin_lens.linear_map(model, TOKENS, hook, pos=None)
        ordinary = lin_lens.linear_map(model, TOKENS, hook, pos=None, detach=False)
        assert exact.relative_error <= 1e-5 and ordinary.relative_error > 1e-3


@requires_hooked("the activation is a HookedTransformerConfig act_fn= override")
@pytest.mark.parametrize("act", ["gelu", "gelu_fast", "silu", "relu2", "solu"])
def test_every_plain_activation(act):
    model = tiny_model("gpt2", torch.float64, act_fn=act)
    lm = lin_lens.linear_map(model, TOKENS, "blocks.1.hook_mlp_out", pos=None)
    assert lm.relative_error <= 1e-13
    ordinary = lin_lens.linear_map(model, TOKENS, "blocks.1.hook_mlp_out", pos=None, detach=False)
    assert ordinary.relative_error > 1e-3
