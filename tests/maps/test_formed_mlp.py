"""Gated MLPs formed per token in reverse passes (lin_lens.maps.formed_mlp): the same maps as the
factored path, taken only where it pays, and a clear fall-back where an MLP is not
``((x W_in) ⊙ act(gate)) W_out``. Tiny models have d_model 16, so the row threshold is lowered
to make them take it."""

from __future__ import annotations

import pytest
import torch

import lin_lens.maps.formed_mlp as formed
from lin_lens import linear_map
from tests.conftest import assert_same_state, requires_hooked, state, tiny

GATED = ("llama", "gemma", "qwen3")
HOOKS = ("ln_final.hook_normalized", "blocks.1.hook_resid_post", "logits")


def _tokens(n: int = 6) -> torch.Tensor:
    return torch.randint(0, 50, (1, n), generator=torch.Generator().manual_seed(3))


def _both(model, hook, monkeypatch, **kw):
    """The map by the factored path, then by the formed one."""
    monkeypatch.setattr(formed, "FORMED_MIN_ROWS", 10**9)
    plain = linear_map(model, _tokens(), hook, pos=None, engine="reverse", **kw)
    monkeypatch.setattr(formed, "FORMED_MIN_ROWS", 1)
    before = state(model)
    fast = linear_map(model, _tokens(), hook, pos=None, engine="reverse", **kw)
    assert_same_state(before, model)
    return plain, fast


def _wrong_gate(monkeypatch) -> None:
    """Every formed site applies sigmoid as its gate (the tiny Llama's MLP applies SiLU)."""
    real = formed._site

    def site(model, layer):
        s = real(model, layer)
        return None if s is None else formed._Site(s.module, s.gate_hook, s.W_in, s.W_out,
                                                    torch.sigmoid)

    monkeypatch.setattr(formed, "_site", site)


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("arch", GATED)
def test_formed_mlps_give_the_factored_map(arch, backend, hook, monkeypatch):
    model = tiny(arch, backend)
    plain, fast = _both(model, hook, monkeypatch)
    assert "formed_mlps" not in plain.meta
    assert fast.meta["formed_mlps"] == model.cfg.n_layers
    assert torch.allclose(fast.J4, plain.J4, rtol=0, atol=1e-12)
    assert fast.constants.keys() == plain.constants.keys()
    assert fast.relative_error <= 1e-12


def test_plain_mlps_keep_the_ordinary_path(backend, monkeypatch):
    plain, fast = _both(tiny("gpt2", backend), "ln_final.hook_normalized", monkeypatch)
    assert "formed_mlps" not in fast.meta and torch.equal(fast.J4, plain.J4)


def test_only_a_short_prompt_with_many_rows_takes_it(backend):
    # SmolLM2's whole last-position operator: 576 rows in one pass up to 21 tokens
    assert formed.formed_rows(7, 576) == 576
    assert formed.formed_rows(21, 576) == 576
    assert formed.formed_rows(32, 576) == 0  # 384 rows a pass: forming does not pay
    assert formed.formed_rows(7, 64) == 0  # a narrow operator
    # and a tiny model's 16-row operator does not take it by default
    m = linear_map(tiny("llama", backend), _tokens(), "ln_final.hook_normalized", pos=-1)
    assert "formed_mlps" not in m.meta


def test_an_mlp_of_another_formula_keeps_the_ordinary_path(backend, monkeypatch):
    """A gate function other than the one the MLP applies: every layer's output check fails,
    so none takes the formed path, and the map is the factored one."""
    _wrong_gate(monkeypatch)
    plain, fast = _both(tiny("llama", backend), "ln_final.hook_normalized", monkeypatch)
    assert "formed_mlps" not in fast.meta
    assert torch.allclose(fast.J4, plain.J4, rtol=0, atol=1e-12)


def test_the_output_check_is_what_keeps_a_wrong_gate_out(backend, monkeypatch):
    """Without the output check, a wrong gate gives a wrong map, which the reconstruction check
    then refuses: the comparison above can fail."""
    _wrong_gate(monkeypatch)
    monkeypatch.setattr(formed, "_agrees", lambda *a: True)
    monkeypatch.setattr(formed, "FORMED_MIN_ROWS", 1)
    model = tiny("llama", backend)
    m = linear_map(model, _tokens(), "ln_final.hook_normalized", pos=None, engine="reverse",
                   check=False)
    assert m.meta["formed_mlps"] == model.cfg.n_layers and m.relative_error > 1e-6


@requires_hooked("a source inside an MLP (hook_post) is a HookedTransformer hook name here")
def test_the_source_layer_keeps_the_ordinary_path(monkeypatch):
    model = tiny("llama", "hooked")
    plain, fast = _both(model, "ln_final.hook_normalized", monkeypatch,
                        source="blocks.0.mlp.hook_post")
    assert fast.meta["formed_mlps"] == model.cfg.n_layers - 1
    assert torch.allclose(fast.J4, plain.J4, rtol=0, atol=1e-12)
