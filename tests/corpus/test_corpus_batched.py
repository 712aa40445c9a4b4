"""``batched_contributions``: one padded batch, one backward pass, and per prompt exactly what
``linear_map(..., direction=u).contributions()`` gives; pad tokens contribute exactly 0."""

from __future__ import annotations

import pytest
import torch

import lin_lens
from lin_lens.corpus import LoadSpec
from lin_lens.corpus.batched import PaddingLeakError, batched_contributions, pad_batch
from tests.conftest import BACKENDS, assert_same_state, state, to_device
from tests.corpus.conftest import PROMPTS

# gpt2: biases and positional embeddings; llama: rotary, GQA; gemma: soft caps, sliding window
ARCHS = {"hooked": ("gpt2", "llama", "gemma"), "bridge": ("gpt2", "llama", "gemma3")}
MODELS = [(f"tiny-{a}", b) for b in BACKENDS for a in ARCHS[b]]


@pytest.fixture(scope="module", params=MODELS, ids=[f"{b}-{n[5:]}" for n, b in MODELS])
def model(request):
    name, backend = request.param
    return to_device(LoadSpec(name, "float64", backend).load())


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_equals_per_prompt_maps(model, side):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(len(PROMPTS), model.cfg.d_vocab, dtype=torch.float64, generator=g)
    pos = [-1, 1, -2, 0, 3]  # each prompt's own position
    bc = batched_contributions(model, PROMPTS, u, pos=pos, padding_side=side)
    assert bc.tokens.shape == (len(PROMPTS), 7) and bc.mask.sum(-1).tolist() == [4, 3, 7, 3, 5]
    # pads: exactly 0 from the backward pass itself (nothing is masked afterwards)
    assert bc.contributions[~bc.mask].eq(0).all() and bc.grads[~bc.mask].eq(0).all()
    assert (bc.relative_error < 1e-12).all()
    for b, text in enumerate(PROMPTS):
        ref = lin_lens.linear_map(model, text, "logits", pos[b], direction=u[b])
        got = bc.linear_map(b)
        assert torch.equal(got.tokens, ref.tokens)
        scale = ref.act.abs().max()
        assert (got.contributions() - ref.contributions()).abs().max() <= 1e-12 * scale
        assert (got.constant - ref.constant).abs().max() <= 1e-12 * scale
        assert (got.act - ref.act).abs().max() <= 1e-12 * scale
        assert torch.allclose(bc.per_prompt(b), got.contributions()[:, 0], rtol=0,
                              atol=1e-13 * scale)
        assert got.relative_error < 1e-12


def test_logit_difference_by_out_index(model):
    """IOI-style: u = e_A − e_B per prompt, and a single out_index for all."""
    a, b = torch.tensor([3, 5, 7, 9, 11]), torch.tensor([4, 6, 8, 10, 12])
    V = model.cfg.d_vocab
    u = torch.nn.functional.one_hot(a, V).double() - torch.nn.functional.one_hot(b, V).double()
    diff = batched_contributions(model, PROMPTS, u)
    ca = batched_contributions(model, PROMPTS, out_index=a)
    cb = batched_contributions(model, PROMPTS, out_index=b)
    assert torch.allclose(diff.contributions, ca.contributions - cb.contributions, atol=1e-12)
    assert torch.allclose(diff.value, ca.value - cb.value, atol=1e-12)
    # the model's own logit difference (outside detached mode the Bridge runs Hugging Face's
    # RMSNorm, which computes in float32 even for a float64 model: agreement to ~1e-6)
    with torch.no_grad():
        for i, text in enumerate(PROMPTS):
            logits = model(lin_lens.to_tokens(model, text), return_type="logits")[0, -1]
            assert float(diff.value[i]) == pytest.approx(float(logits[a[i]] - logits[b[i]]),
                                                         rel=1e-5)
    one = batched_contributions(model, PROMPTS, out_index=3)
    assert torch.equal(one.contributions[0], ca.contributions[0])


def test_unfrozen_nonlinearity_and_leaking_pads_are_refused(model):
    def square(t, hook):  # a nonlinearity detached mode does not know
        return t + 0.3 * t * t

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_mid", square)]):
        with pytest.raises(lin_lens.NotExactError):
            batched_contributions(model, PROMPTS, out_index=3)

    def mix(t, hook):  # every position reads every other one, pads included
        return t + 0.1 * t.flip(1)

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_mid", mix)]):
        with pytest.raises(PaddingLeakError):
            batched_contributions(model, PROMPTS, out_index=3)


def test_argument_errors(model):
    with pytest.raises(ValueError, match="exactly one of"):
        batched_contributions(model, PROMPTS)
    with pytest.raises(ValueError, match="direction must be"):
        batched_contributions(model, PROMPTS, torch.ones(3, dtype=torch.float64))
    with pytest.raises(IndexError, match="prompt 0 \\(4 tokens\\)"):
        batched_contributions(model, PROMPTS, out_index=3, pos=5)
    with pytest.raises(ValueError, match="padding_side"):
        pad_batch(model, PROMPTS, "middle")
    with pytest.raises(ValueError, match="one per prompt"):
        batched_contributions(model, PROMPTS, out_index=[1, 2])


def test_model_left_as_it_was(model):
    before = state(model)
    batched_contributions(model, PROMPTS, out_index=3, padding_side="left")

    def mix(t, hook):
        return t + 0.1 * t.flip(1)

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_mid", mix)]):
        with pytest.raises(PaddingLeakError):
            batched_contributions(model, PROMPTS, out_index=3)
    assert_same_state(before, model)


def test_other_source_and_target(model):
    """A residual-stream source and a hidden-state target, as linear_map takes them."""
    src, hook = "blocks.0.hook_resid_post", "ln_final.hook_normalized"
    u = torch.randn(model.cfg.d_model, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    bc = batched_contributions(model, PROMPTS, u, hook=hook, source=src, padding_side="left")
    for b, text in enumerate(PROMPTS):
        ref = lin_lens.linear_map(model, text, hook, -1, direction=u, source=src)
        got = bc.linear_map(b)
        scale = ref.act.abs().max()
        assert (got.contributions() - ref.contributions()).abs().max() <= 1e-12 * scale
        assert (got.constant - ref.constant).abs().max() <= 1e-12 * scale
