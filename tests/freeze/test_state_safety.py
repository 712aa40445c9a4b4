"""Interrupts at any line, contexts closed out of order, nested forward passes: the model is left
exactly as it was, and lin_lens.reset restores one by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lin_lens
from lin_lens._hooks import _ours
from lin_lens._tl import HAS_HOOKED
from lin_lens.testing import tiny_bridge, tiny_model
from tests._interrupts import interrupt_at
from tests.conftest import cpu_only

pytestmark = cpu_only("interrupts traced at every line (minutes), on CPU models")

TOKENS = torch.tensor([[3, 17, 42, 8, 29]])
PKG = str(Path(lin_lens.__file__).parent)
BACKENDS = (["hooked"] if HAS_HOOKED else []) + ["bridge"]
CLEANUP = {"finish", "_sigint_deferred"}


@pytest.fixture(scope="module", params=BACKENDS)
def model(request):
    return tiny_model("llama") if request.param == "hooked" else tiny_bridge("llama")


def _state(m):
    return (
        {n: [getattr(h.hook, "id", None) for h in hp.fwd_hooks] for n, hp in m.hook_dict.items()},
        # lin_lens's own torch hooks (a TransformerBridge interrupted inside its forward can keep
        # its internal `_capture_*` pre-hooks: TransformerLens's, not ours)
        sum(_ours(fn) for x in m.modules()
            for fn in (*x._forward_hooks.values(), *x._forward_pre_hooks.values())),
        {n: p.requires_grad for n, p in m.named_parameters()},
        tuple(bool(getattr(m.cfg, f, False)) for f in ("use_attn_result", "use_split_qkv_input")),
    )


def _interrupt_at(n: int, fn) -> bool:
    return interrupt_at(n, fn, under=PKG, skip=CLEANUP)


def _detached_block(m):
    with lin_lens.detached(m):
        m(TOKENS)


@pytest.mark.slow  # thousands of traced runs
def test_interrupt_at_every_line_of_detached(model):
    """Every line of lin_lens's own code on the HookedTransformer (~1000); every 5th on the
    Bridge, whose forward runs many more lines inside our hooks."""
    before = _state(model)
    for n in range(1, 12000, 1 if HAS_HOOKED and "Hooked" in type(model).__name__ else 5):
        done = _interrupt_at(n, lambda: _detached_block(model))
        assert _state(model) == before, f"state changed by an interrupt at line {n}"
        assert not lin_lens.is_detached(model)
        if done:
            break
    else:
        pytest.fail("detached() never completed")


@pytest.mark.slow  # thousands of traced runs
def test_interrupt_during_linear_map_sampled_lines(model):
    before = _state(model)

    def call():
        lin_lens.linear_map(model, TOKENS, "blocks.1.attn.hook_result", engine="reverse")

    n, done = 1, False
    while not done and n < 20000:
        done = _interrupt_at(n, call)
        assert _state(model) == before, f"state changed by an interrupt at line {n}"
        assert not lin_lens.is_detached(model)
        n += 37  # a sample of the lines (every line would take minutes)
    assert done
    assert lin_lens.linear_map(model, TOKENS, "logits").relative_error < 1e-12


@pytest.mark.slow  # thousands of traced runs
def test_interrupt_during_layer_transforms_sampled_lines(model):
    """The per-layer maps add a leaf at every layer input in one pass: same guarantee."""
    before = _state(model)
    n, done = 1, False
    while not done and n < 20000:
        done = _interrupt_at(n, lambda: lin_lens.layer_transforms(model, TOKENS))
        assert _state(model) == before, f"state changed by an interrupt at line {n}"
        assert not lin_lens.is_detached(model)
        n += 37
    assert done


def test_contexts_closed_out_of_order(model):
    before = _state(model)
    a, b = lin_lens.detached(model), lin_lens.detached(model)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert lin_lens.is_detached(model)  # b is still open
    b.__exit__(None, None, None)
    assert not lin_lens.is_detached(model) and _state(model) == before


def test_reset_restores_a_model_left_detached(model):
    before = _state(model)
    ctx = lin_lens.detached(model)
    ctx.__enter__()  # never closed, as after a crash in user code
    assert lin_lens.is_detached(model) and _state(model) != before
    lin_lens.reset(model)
    assert not lin_lens.is_detached(model) and _state(model) == before


def test_forward_pass_from_a_user_hook_does_not_overwrite_the_leaves(model):
    """A user's hook that runs a nested forward pass during linear_map: only the outer pass is
    mapped."""
    ref = lin_lens.linear_map(model, TOKENS, "blocks.1.hook_resid_post")
    other = torch.tensor([[5, 6, 7, 8, 9]])
    busy = [False]

    def nested(t, hook):
        if not busy[0]:
            busy[0] = True
            with torch.no_grad():
                model(other)
            busy[0] = False

    hp = model.hook_dict["blocks.0.hook_resid_post"]
    hp.add_hook(nested)
    try:
        lm = lin_lens.linear_map(model, TOKENS, "blocks.1.hook_resid_post")
    finally:
        hp.remove_hooks()
    assert torch.equal(lm.J, ref.J) and lm.relative_error < 1e-12


def test_reset_undoes_flags_and_grads_of_an_abandoned_call(model):
    """A lin_lens call abandoned half-way (its contexts never closed, as when an interrupt lands
    on the first line of their clean-up): reset restores the config flags and requires_grad."""
    from lin_lens._hooks import flags_for, requires_grad

    before = _state(model)
    flags = flags_for(model, ["blocks.0.attn.hook_result"])
    grads = requires_grad(list(model.parameters()), False)
    flags.__enter__()
    grads.__enter__()
    assert model.cfg.use_attn_result and _state(model) != before
    lin_lens.reset(model)
    assert _state(model) == before
    del flags, grads  # their clean-up, when it finally runs, must not undo twice
    assert _state(model) == before
