"""QK attribution: a head's scores split exactly into query-side × key-side parts, by tokens and
by nodes, on every tiny family on both backends; constants, differences, refusals; the frozen
removal of a key-side part changes the score by exactly its marginal."""

from __future__ import annotations

import pytest
import torch

import lin_lens
from lin_lens import qk_attribution, qk_attributions
from lin_lens.errors import InvalidPositionError, UnsupportedFeatureError
from lin_lens.qk.intervene import remove_key_part
from lin_lens.testing import tiny_model
from tests.conftest import ARCHS, assert_same_state, requires_hooked, state, tiny

TOKENS = torch.tensor([[3, 17, 42, 8, 8, 29, 11]])
BOUND = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("by", ["tokens", "nodes"])
def test_every_head_is_exact_by_tokens_and_nodes(arch, by, backend):
    m = tiny(arch, backend)
    before = state(m)
    res = qk_attributions(m, TOKENS, [1], by=by)
    assert len(res) == m.cfg.n_heads
    for a in res:
        assert a.relative_error <= BOUND[torch.float64], (a, a.meta)
        # every key the query sees (causal; Gemma 3's local layers: a sliding window)
        assert a.keys == list(range(a.keys[0], 7)) and (a.keys[0] == 0 or arch == "gemma")
        # the pairs and the marginals reproduce every score
        total = a.pairs().sum((-1, -2)) + a.bias
        assert torch.allclose(total, a.scores, rtol=1e-12, atol=1e-12)
        assert torch.allclose(a.q_marginal.sum(-1) + a.bias, a.scores, rtol=1e-12, atol=1e-12)
        if a.k_marginal_all is not None:
            full = torch.stack([p.vectors.sum() for p in a.k_marginal_all]) + a.bias
            assert torch.allclose(full, a.scores, rtol=1e-12, atol=1e-12)
    assert_same_state(before, m)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_float32_within_1e_5(arch, backend):
    m = tiny(arch, backend, torch.float32)
    for by in ("tokens", "nodes"):
        assert max(a.relative_error for a in qk_attributions(m, TOKENS, [1], by=by)) <= 1e-5


@requires_hooked("ALiBi, shortformer, SoLU, soft caps and OLMo-2 layouts are config overrides")
@pytest.mark.parametrize("arch, kw", [
    ("gpt2", dict(positional_embedding_type="alibi")),
    ("gpt2", dict(positional_embedding_type="shortformer")),
    ("solu", {}), ("relu", {}), ("pythia", {}),  # pythia: partial rotary
    ("gemma", {}),  # score soft cap 3.0 (its gate frozen)
    ("llama", dict(original_architecture="Olmo2ForCausalLM",
                   use_normalization_before_and_after=True)),
    ("gpt2", dict(n_layers=3)),
])
def test_the_architecture_matrix(arch, kw):
    m = tiny_model(arch, **kw)
    last = m.cfg.n_layers - 1
    for by in ("tokens", "nodes"):
        res = qk_attributions(m, TOKENS, [last], by=by)
        assert max(a.relative_error for a in res) <= 1e-12, (arch, kw, by)
    if kw.get("positional_embedding_type") == "alibi":
        assert "alibi" in res[last, 0].constants


def test_token_parts_are_linear_map_contributions(backend):
    """The algebra: per-token parts of the scored query and keys are exactly the contributions
    of linear_map at hook_rot_q / hook_rot_k (the paper's J applied per token)."""
    m = tiny("llama", backend)
    a = qk_attribution(m, TOKENS, 1, 3)
    n = TOKENS.shape[1]
    lq = lin_lens.linear_map(m, TOKENS, "blocks.1.attn.hook_rot_q", n - 1)
    cq = lq.contributions().reshape(n, m.cfg.n_heads, -1)[:, 3]
    assert torch.allclose(a.q_parts.vectors[:n], cq, atol=1e-13)
    lk = lin_lens.linear_map(m, TOKENS, "blocks.1.attn.hook_rot_k", 4)
    ck = lk.contributions().reshape(n, -1, cq.shape[-1])[:, a.kv_head]
    assert torch.allclose(a.k_parts[4].vectors[:n], ck, atol=1e-13)


def test_nodes_and_tokens_agree_on_the_whole_query(backend):
    m = tiny("gpt2", backend)
    t = qk_attribution(m, TOKENS, 1, 2, by="tokens")
    nd = qk_attribution(m, TOKENS, 1, 2, by="nodes", nodes=("neurons",))
    assert torch.allclose(t.q_parts.vectors.sum(0), nd.q_parts.vectors.sum(0), atol=1e-12)
    assert {"attn"} <= set(nd.q_parts.kind) and "head" not in nd.q_parts.kind


def test_differences_between_keys_are_exact(backend):
    a = qk_attribution(tiny("gemma", backend), TOKENS, 1, 0, keys=[3, 4, 6])
    d = a.difference(4, 3)
    assert abs(float(d["by_query_part"].sum()) + d["bias"] - d["total"]) < 1e-12
    assert d["total"] == pytest.approx(float(a.scores[1] - a.scores[0]))
    assert len(d["labels"]) == len(d["by_query_part"])


def test_top_to_dict_and_html(backend):
    a = qk_attribution(tiny("llama", backend), TOKENS, 1, 1, by="nodes", top=3)
    top = a.top(5)
    assert len(top) == 5 and abs(top[0][3]) >= abs(top[-1][3])
    d = a.to_dict()
    assert d["layer"] == 1 and len(d["top_pairs"]) == 10 and d["relative error"] < 1e-12
    assert "<table" in a._repr_html_() and "QKAttribution(L1H1" in repr(a)
    assert all(len(k) == 4 for k in a.k_parts)  # top 3 + the rest


@pytest.mark.parametrize("by", ["tokens", "nodes"])
def test_removing_a_key_part_changes_the_score_by_its_marginal(by, backend):
    m = tiny("gemma" if backend == "hooked" else "llama", backend)
    before = state(m)
    a = qk_attribution(m, TOKENS, 1, 1, by=by)
    key = a.keys[-2]
    marg = a.k_marginal[a.keys.index(key)]
    for b in marg.abs().topk(3).indices.tolist():
        if a.k_parts[a.keys.index(key)].kind[b] == "rest":
            continue
        r = remove_key_part(m, a, key, b)
        assert r.error <= 1e-10, r
        assert r.ordinary_score != pytest.approx(r.frozen_score, rel=1e-6)  # not the same thing
    assert_same_state(before, m)


def test_refusals():
    m = tiny("llama", "bridge")
    with pytest.raises(InvalidPositionError, match="masked for query 2"):
        qk_attribution(m, TOKENS, 1, 0, query=2, keys=[5])
    with pytest.raises(InvalidPositionError, match="head 9 out of range"):
        qk_attribution(m, TOKENS, 1, 9)
    with pytest.raises(lin_lens.InvalidArgumentError, match="by must be"):
        qk_attribution(m, TOKENS, 1, 0, by="features")
    with pytest.raises(lin_lens.ArgumentTypeError, match="query"):
        qk_attribution(m, TOKENS, 1, 0, query=[1, 2])


@requires_hooked("use_logn_attn is a config override")
def test_logn_attention_is_refused_by_name():
    m = tiny_model("llama", use_logn_attn=True)
    with pytest.raises(UnsupportedFeatureError, match="use_logn_attn"):
        qk_attribution(m, TOKENS, 1, 0)
