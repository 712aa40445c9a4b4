"""``batched_decompose``: one padded batch, one detached forward, and per prompt exactly the
parts ``decompose`` gives along the prompt's direction (same components, same order); pad tokens
never reach them; decompose's refusals are its refusals."""

from __future__ import annotations

import json

import pytest
import torch

import lin_lens
from lin_lens.corpus import BatchedDecomposition, batched_decompose
from lin_lens.corpus.batched import pad_batch
from lin_lens.testing import tiny_model
from tests.conftest import ARCHS, BACKENDS, assert_same_state, requires_hooked, state, tiny
from tests.corpus.conftest import PROMPTS

P = PROMPTS[:4]  # 4, 3, 7, 3 tokens with BOS on the HookedTransformer
POS = [-1, 0, -2, 1]  # each prompt's own target position
EXACT = 1e-12  # relative to the largest part of the prompt
# the stage decompose reads at, per hook (Pythia's parallel blocks have no resid_mid)
HOOKS = ["logits", "ln_final.hook_normalized", "blocks.1.hook_resid_mid",
         "blocks.0.hook_resid_post"]


@pytest.fixture(scope="module", params=[(a, b) for b in BACKENDS for a in ARCHS],
                ids=[f"{b}-{a}" for b in BACKENDS for a in ARCHS])
def model(request):
    arch, backend = request.param
    return tiny(arch, backend, tokenizer=True)


def _dev(model):
    return model.W_U.device


def _d_out(model, hook):
    return model.cfg.d_vocab if hook == "logits" else model.cfg.d_model


def _assert_matches(bd, model, prompts, pos, hook, along):
    """Prompt by prompt: bd's parts == along(decompose(prompt alone)) to EXACT."""
    worst = 0.0
    for b, text in enumerate(prompts):
        ref = lin_lens.decompose(model, text, hook, pos[b])
        assert bd.labels == ref.labels and bd.kinds == ref.kinds
        want, value = along(b, ref)
        scale = float(want.abs().max())
        err = float((bd.parts[b] - want).abs().max()) / scale
        assert err <= EXACT, (b, err)
        assert abs(float(bd.value[b] - value)) <= EXACT * scale
        assert bd.position(b) == ref.position
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("hook", HOOKS)
def test_parts_equal_per_prompt_decompose(model, hook, side):
    if hook.endswith("resid_mid") and getattr(model.cfg, "parallel_attn_mlp", False):
        pytest.skip("parallel attention: no resid_mid")
    g = torch.Generator().manual_seed(0)
    u = torch.randn(len(P), _d_out(model, hook), dtype=torch.float64, generator=g).to(_dev(model))
    bd = batched_decompose(model, P, u, hook=hook, pos=POS, padding_side=side)
    assert isinstance(bd, BatchedDecomposition) and bd.parts.shape == (len(P), len(bd.labels))
    assert not bd.mask.all()  # the batch is padded
    assert (bd.relative_error < 1e-13).all() and (bd.resid_error < 1e-13).all()
    _assert_matches(bd, model, P, POS, hook, lambda b, ref: (ref.parts @ u[b], ref.act @ u[b]))


def test_logit_difference_as_direction_and_out_index(model):
    """IOI-style: u_b = e_A − e_B per prompt; as a direction, and as two out_index batches."""
    V = model.cfg.d_vocab
    a, b = torch.tensor([3, 5, 7, 9]), torch.tensor([4, 6, 8, 10])
    u = (torch.nn.functional.one_hot(a, V) - torch.nn.functional.one_hot(b, V)).double()
    u = u.to(_dev(model))
    diff = batched_decompose(model, P, u, padding_side="left")
    ca = batched_decompose(model, P, out_index=a, padding_side="left")
    cb = batched_decompose(model, P, out_index=b)
    scale = float(diff.parts.abs().max())
    assert (diff.parts - (ca.parts - cb.parts)).abs().max() <= EXACT * scale
    # decompose's own logit-difference reading: out_index=[A, B], parts[:, 0] − parts[:, 1]
    for k, text in enumerate(P):
        ref = lin_lens.decompose(model, text, "logits", -1, out_index=[int(a[k]), int(b[k])])
        want = ref.parts[:, 0] - ref.parts[:, 1]
        assert (diff.parts[k] - want).abs().max() <= EXACT * float(want.abs().max())
        assert (ca.parts[k] - ref.parts[:, 0]).abs().max() <= EXACT * float(
            ref.parts[:, 0].abs().max())


def test_pad_tokens_never_reach_the_parts(model):
    """Garbage in every pad position's embedding changes no part (and left = right padding)."""
    u = torch.randn(len(P), model.cfg.d_vocab, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1)).to(_dev(model))
    for side in ("left", "right"):
        _, mask = pad_batch(model, P, side)
        noise = 1e3 * torch.randn(*mask.shape, model.cfg.d_model, dtype=torch.float64,
                                  generator=torch.Generator().manual_seed(2)).to(mask.device)

        def garbage(t, hook, mask=mask, noise=noise):
            return t + noise * (~mask)[..., None]

        clean = batched_decompose(model, P, u, pos=POS, padding_side=side)
        with model.hooks(fwd_hooks=[("hook_embed", garbage)]):
            dirty = batched_decompose(model, P, u, pos=POS, padding_side=side)
        scale = float(clean.parts.abs().max())
        assert (dirty.parts - clean.parts).abs().max() <= EXACT * scale
    right = batched_decompose(model, P, u, pos=POS, padding_side="right")
    assert (clean.parts - right.parts).abs().max() <= EXACT * float(right.parts.abs().max())


def test_result_object_and_model_left_as_it_was(model):
    before = state(model)
    bd = batched_decompose(model, P, out_index=[3, 4, 5, 6], padding_side="left")
    assert_same_state(before, model)
    assert len(bd) == len(P) and torch.equal(bd["embed"], bd.parts[:, 0])
    glabels, gparts = bd.grouped()
    assert gparts.shape == (len(P), len(glabels))
    assert torch.allclose(gparts.sum(-1), bd.parts.sum(-1), rtol=0, atol=1e-12)
    df = bd.to_pandas()
    assert list(df.columns) == bd.labels and df.shape == (len(P), len(bd.labels))
    assert list(bd.to_pandas(grouped=True).columns) == glabels
    dec = bd.decomposition(2)  # a per-prompt Decomposition of the scalar
    assert dec.labels == bd.labels and dec.parts.shape == (len(bd.labels), 1)
    assert dec.relative_error < 1e-12 and len(dec.tokens) == int(bd.mask[2].sum())
    json.dumps(dec.to_dict())
    assert "<table>" in bd._repr_html_() and len(bd.top(3)) == 3


def test_argument_errors(backend):
    m = tiny("gpt2", backend, tokenizer=True)
    with pytest.raises(ValueError, match="residual-stream"):
        batched_decompose(m, P, out_index=1, hook="blocks.0.hook_mlp_out")
    with pytest.raises(ValueError, match="exactly one of"):
        batched_decompose(m, P)
    with pytest.raises(ValueError, match="direction must be"):
        batched_decompose(m, P, torch.ones(3, dtype=torch.float64))
    with pytest.raises(IndexError, match="prompt 1"):
        batched_decompose(m, P, out_index=3, pos=3)
    with pytest.raises(ValueError, match="padding_side"):
        batched_decompose(m, P, out_index=3, padding_side="middle")


def test_hook_that_does_not_fire_is_refused_as_decompose_refuses_it(backend):
    m = tiny("pythia", backend, tokenizer=True)
    for call in (lambda: lin_lens.decompose(m, P[0], "blocks.1.hook_resid_mid"),
                 lambda: batched_decompose(m, P, out_index=1, hook="blocks.1.hook_resid_mid")):
        with pytest.raises(ValueError, match="did not fire"):
            call()


# -- decompose's refusals are batched_decompose's ----------------------------------------------

IDS = [[3, 17, 5, 41, 8], [4, 9], [7, 7, 1]]  # token ids: these models have no tokenizer


@requires_hooked("TL config overrides (shortformer positions, OLMo-2 post-norm blocks)")
@pytest.mark.parametrize("cfg", [dict(positional_embedding_type="shortformer"),
                                 dict(original_architecture="Olmo2ForCausalLM")])
def test_layouts_decompose_does_not_know_are_refused(cfg):
    m = tiny_model("gpt2", **cfg)
    for hook in ("logits", "blocks.1.hook_resid_post"):
        with pytest.raises(lin_lens.NotExactError, match="do not sum to the target"):
            lin_lens.decompose(m, IDS[0], hook)
        with pytest.raises(lin_lens.NotExactError, match="do not sum to the target"):
            batched_decompose(m, IDS, out_index=1, hook=hook)


@requires_hooked("TL config overrides (attn_only, normalization_type=None)")
def test_models_without_mlp_or_final_norm_are_refused_clearly():
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="attn_only"):
        batched_decompose(tiny_model("gpt2", attn_only=True), IDS, out_index=1)
    m = tiny_model("gpt2", normalization_type=None)
    with pytest.raises(lin_lens.UnsupportedFeatureError, match="no final norm"):
        batched_decompose(m, IDS, out_index=1)
    bd = batched_decompose(m, IDS, out_index=1, hook="blocks.1.hook_resid_post",
                           padding_side="left")
    for b, ids in enumerate(IDS):
        want = lin_lens.decompose(m, ids, "blocks.1.hook_resid_post").parts[:, 1]
        assert (bd.parts[b] - want).abs().max() <= EXACT * float(want.abs().max())
