"""CircuitsVis views: offline rendering (bundle inlined once, no CDN, no google.com probe) and
the numbers they show."""

from __future__ import annotations

import json

import circuitsvis as cv
import pytest
import torch

import lin_lens
from lin_lens import display, linear_map
from lin_lens.decoding import TokenList, output_logit_directions
from lin_lens.spectrum import svd
from tests.conftest import tiny


@pytest.fixture(scope="module")
def model(backend):
    return tiny("gpt2", backend, tokenizer=True)


TEXT = "w1 w2 w3 w4"


def _props(call: str) -> dict:
    return json.loads(call[call.index("{"): call.rindex("}") + 1].replace("<\\/", "</"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any network probe (CircuitsVis's internet_on, urlopen) fails the test."""
    def boom(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr("urllib.request.urlopen", boom)
    monkeypatch.setattr("circuitsvis.utils.render.internet_on", boom)


def test_split_render_and_escaping():
    r = cv.tokens.colored_tokens(["a", "</script>", "b"], [0.1, 0.2, 0.3])
    div, call = display.split_render(r)
    assert div.startswith("circuits-vis-")
    assert call.startswith("CircuitsVis.render(") and "</script>" not in call
    assert _props(call)["tokens"][1] == "</script>"


def test_view_inlines_bundle_once_and_no_cdn():
    r1 = cv.tokens.colored_tokens(["a", "b"], [1.0, 2.0])
    r2 = cv.tokens.colored_tokens(["c", "</s>"], [1.0, -2.0])
    v = display.View([("one", r1), ("two", r2)], "t")
    h = v._repr_html_()
    bundle = display.bundle_js()
    assert h.count(bundle[:200]) == 1 and len(h) < len(bundle) + 10_000
    assert h.count("CircuitsVis.render(") == 2 + bundle.count("CircuitsVis.render(")
    assert "unpkg" not in h and "import {" not in h.replace(bundle, "")
    # the only closing script tag is ours
    assert h.count("</script>") == 1
    assert v.to_html().startswith("<!doctype html>")


def test_signed_contributions_to_logit(model):
    tok = model.to_tokens(TEXT)
    with torch.no_grad():
        logits = model(tok)[0, -1]
    onehot = torch.zeros_like(logits)
    onehot[logits.argmax()] = 1
    lm = linear_map(model, tok, "logits", -1, direction=onehot)
    toks = display.str_tokens(model, tok)
    v = display.contribution_view(lm, toks)
    vals = _props(v.panels[0][1][1])["values"]
    assert len(vals) == len(toks)
    # the colours are the exact split of the logit: Σ contributions + constant = logit
    total = sum(vals) + float(lm.constant[0])
    assert total == pytest.approx(float(logits.max()), abs=1e-9)


def test_norm_contributions(model):
    lm = linear_map(model, TEXT, "ln_final.hook_normalized", pos=[2, 3])
    v = display.contribution_view(lm, display.str_tokens(model, lm.tokens))
    assert len(v.panels) == 2
    vals = _props(v.panels[1][1][1])["values"]
    want = lm.contributions()[1].norm(dim=-1)
    assert torch.allclose(torch.tensor(vals, dtype=want.dtype), want.cpu())


def test_decoding_view_shows_the_decoded_lists(model):
    lm = linear_map(model, TEXT, "ln_final.hook_normalized")
    d = lin_lens.decode(model, lm, k=3, top=4, n_rows=0)
    v = display.decoding_view(d)
    p = _props(v.panels[0][1][1])
    assert p["firstDimensionLabels"] == d.tokens and len(p["tokens"]) == 2
    # the table's top tokens of U₁ at the last source token are decode's own list
    sample = display.from_token_lists(d.out, "U", d.tokens)
    sc = sample["scores"][-1, 0]
    assert [sample["vocab"][k] for k in sc.topk(4).indices] == d.out[-1][0].tokens
    full = output_logit_directions(model, d_u := svd(lm).U[-1][:, :1]).T[0]
    assert set(d.out[-1][0].ids) == set(full.topk(4).indices.tolist()) and d_u.shape[1] == 1


def test_from_token_lists_shows_exactly_the_lists():
    t = TokenList(["a", "b"], [0, 1], [3.0, 2.0], ["z", "y"], [9, 8], [-3.0, -2.0])
    u = TokenList(["b", "c"], [1, 2], [5.0, 4.0], ["a", "y"], [0, 8], [-1.0, 0.5])
    s = display.from_token_lists([[t], [u]], "U", ["L0", "L1"])
    for i, tl in enumerate((t, u)):
        sc = s["scores"][i, 0]
        assert [s["vocab"][k] for k in sc.topk(2).indices] == tl.tokens
        assert [s["vocab"][k] for k in (-sc).topk(2).indices] == tl.neg_tokens


def test_attention_view(model):
    tok = model.to_tokens(TEXT)
    v = display.attention_view(model, tok, layers=[0, -1])
    assert [t for t, _ in v.panels] == ["layer 0", "layer 1"]
    p = _props(v.panels[0][1][1])
    att = torch.tensor(p["attention"])
    assert att.shape == (4, tok.shape[1], tok.shape[1])
    assert torch.allclose(att.sum(-1), torch.ones(4, tok.shape[1]), atol=1e-5)


def test_contribution_view_default_labels(model):
    lm = linear_map(model, TEXT, "blocks.0.hook_resid_post")
    ids = lm.tokens.tolist()
    assert _props(display.contribution_view(lm).panels[0][1][1])["tokens"] == [
        f"#{i}" for i in ids]
    lm.meta["str_tokens"] = display.str_tokens(model, lm.tokens)
    assert _props(display.contribution_view(lm).panels[0][1][1])["tokens"][1] == "w1"


def test_qk_view_is_the_pair_matrix(model):
    att = lin_lens.qk_attribution(model, TEXT, 1, 1)
    v = display.qk_view(att)
    assert len(v.panels) == 3
    props = _props(v.panels[0][1][1])
    key = att.keys[int(att.pattern.argmax())]
    want = att.pairs(key)
    assert torch.allclose(torch.tensor(props["attention"], dtype=want.dtype), want.cpu())
    assert len(props["tokens"]) == len(att.q_parts)
    with pytest.raises(lin_lens.InvalidArgumentError, match="by='tokens'"):
        display.qk_view(lin_lens.qk_attribution(model, TEXT, 1, 1, by="nodes"))
