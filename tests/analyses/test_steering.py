"""Steering with a concept operator (paper eq. 16)."""

from __future__ import annotations

import json

import pytest
import torch

from lin_lens.analyses.steering import (
    SteeringOperator,
    _run,
    steer,
    steering_hooks,
    steering_operator,
)
from tests.conftest import DEVICE, tiny

BOS = 49
CONCEPT = torch.tensor([BOS, 5, 7, 9], device=DEVICE)
PROMPT = torch.tensor([BOS, 3, 8, 7, 9, 11, 2], device=DEVICE)
# How token i reads: a tiny HookedTransformer has no tokenizer ("#i"); a tiny Bridge has the
# word-level one ("wi").
TOKEN = {"hooked": "#{}", "bridge": "w{}"}


@pytest.fixture(scope="module")
def gpt2(backend):
    return tiny("gpt2", backend)


@pytest.fixture(scope="module")
def op(gpt2):
    return steering_operator(gpt2, CONCEPT, 0)


def test_operator_reconstructs_concept(gpt2, op):
    assert op.J.shape == (4, 16, 16) and op.hook == "blocks.0.hook_resid_post"
    s = op.apply(_embed(gpt2, CONCEPT), CONCEPT)
    assert torch.allclose(s[-1], op.act, atol=1e-12)  # same prompt: s_last = h_concept


def _embed(model, tokens):
    _, cache = model.run_with_cache(tokens)
    return cache["hook_embed"][0]


def test_window_formula(gpt2, op):
    x = _embed(gpt2, PROMPT)
    s = op.apply(x, PROMPT)
    J, c = op.J, op.constant
    # position 5: BOS pinned to J[0]; J[3] on token 5, J[2] on 4, J[1] on 3
    want = c + J[0] @ x[0] + J[3] @ x[5] + J[2] @ x[4] + J[1] @ x[3]
    assert torch.allclose(s[5], want, atol=1e-12)
    want1 = c + J[0] @ x[0] + J[3] @ x[1]  # position 1: the window is cut at the BOS
    assert torch.allclose(s[1], want1, atol=1e-12)
    unpinned = SteeringOperator(J, c, op.act, op.hook, op.concept_tokens, pin_first=False)
    s2 = unpinned.apply(x, PROMPT)
    assert torch.allclose(s2[5], c + sum(J[3 - j] @ x[5 - j] for j in range(4)), atol=1e-12)
    cyc = SteeringOperator(J, c, op.act, op.hook, op.concept_tokens, align="cyclic")
    s3 = cyc.apply(x, PROMPT)
    assert torch.allclose(s3[5], c + sum(J[k % 4] @ x[k] for k in range(6)), atol=1e-12)


def test_hook_semantics(gpt2, op):
    base = gpt2(PROMPT[None])
    assert torch.equal(_run(gpt2, PROMPT[None], op, 1.0, "all"), base)  # λ = 1: no change
    steered = _run(gpt2, PROMPT[None], op, 0.3, "all")
    assert (steered - base).abs().max() > 1e-3
    # concept prompt itself, only the last position, λ = 0: s_last = h exactly, nothing changes
    same = _run(gpt2, CONCEPT[None], op, 0.0, "last")
    assert torch.allclose(same, gpt2(CONCEPT[None]), atol=1e-10)
    # the BOS is never steered when pinned: position 0 unchanged
    assert torch.allclose(steered[0, 0], base[0, 0], atol=1e-12)
    names = [h for h, _ in steering_hooks(op, 0.5)]
    assert names == ["hook_embed", "blocks.0.hook_resid_post"]


def test_steer_result(gpt2, op, backend):
    r = steer(gpt2, CONCEPT, PROMPT, 0, lam=0.3, max_new_tokens=3, op=op)
    assert r.concept_ids == [5, 7, 9]
    assert r.concept_strs == [TOKEN[backend].format(i) for i in (5, 7, 9)]
    assert 0 <= r.p_concept_base <= 1 and 0 <= r.p_concept_steered <= 1
    assert r.p_concept_base != r.p_concept_steered
    assert len(r.text_steered.split()) == 3
    json.dumps(r.to_dict())
    assert "p(concept)" in str(r) and "<table>" in r._repr_html_()
    with pytest.raises(ValueError):
        steer(gpt2, CONCEPT, PROMPT, 0, max_new_tokens=0, op=op)
