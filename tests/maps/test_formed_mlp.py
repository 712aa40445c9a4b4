"""Gated MLPs formed per token, with the rows crossing the network one block at a time
(lin_lens.maps.formed_mlp, lin_lens.maps.by_layer): the same maps and constants as the
whole-network factored passes, taken only where forming pays, each block's matrices dropped
before the next, and a clear fall-back where an MLP is not ``((x W_in) ⊙ act(gate)) W_out``.
``formed.pays`` is patched to choose the path on tiny models."""

from __future__ import annotations

import pytest
import torch

import lin_lens.maps.by_layer as by_layer
import lin_lens.maps.formed_mlp as formed
from lin_lens import linear_map
from tests.conftest import assert_same_state, requires_hooked, state, tiny

GATED = ("llama", "gemma", "qwen3")
HOOKS = ("ln_final.hook_normalized", "blocks.1.hook_resid_post", "logits")


def _tokens(n: int = 6) -> torch.Tensor:
    return torch.randint(0, 50, (1, n), generator=torch.Generator().manual_seed(3))


def _both(model, hook, monkeypatch, **kw):
    """The map by whole-network factored passes, then block by block with formed MLPs."""
    monkeypatch.setattr(formed, "pays", lambda rows, sites: False)
    plain = linear_map(model, _tokens(), hook, pos=None, engine="reverse", **kw)
    monkeypatch.setattr(formed, "pays", lambda rows, sites: bool(sites))
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
    assert "formed_mlps" not in plain.meta and "blocks_one_at_a_time" not in plain.meta
    assert fast.meta["formed_mlps"] == model.cfg.n_layers
    assert fast.meta["blocks_one_at_a_time"] == model.cfg.n_layers
    assert torch.allclose(fast.J4, plain.J4, rtol=0, atol=1e-12)
    assert fast.constants.keys() == plain.constants.keys()
    for k, c in plain.constants.items():  # a bias's gradient comes in parts, one per block
        assert torch.allclose(fast.constants[k], c, rtol=0, atol=1e-12), k
    assert fast.relative_error <= 1e-12


@requires_hooked("the tiny Bridge Llama's Hugging Face layers have no attention biases to set")
def test_constants_add_up_over_the_blocks(monkeypatch):
    """A model with biases in every block (the tiny Llama with b_in / b_out set would leave the
    formed path; attention biases keep it): every bias's constant equals the whole-network
    one, so a constant taken from one block only would fail."""
    model = tiny("llama", "hooked", fresh=True)
    with torch.no_grad():
        for blk in model.blocks:
            for b in ("b_Q", "b_V", "b_O"):
                getattr(blk.attn, b).normal_(generator=torch.Generator().manual_seed(5))
    plain, fast = _both(model, "ln_final.hook_normalized", monkeypatch)
    assert fast.meta["formed_mlps"] == model.cfg.n_layers
    assert sum(k.endswith("b_O") for k in plain.constants) == model.cfg.n_layers
    for k, c in plain.constants.items():
        assert torch.allclose(fast.constants[k], c, rtol=0, atol=1e-12), k
    assert fast.relative_error <= 1e-12


def test_each_block_drops_its_matrices_before_the_next(backend, monkeypatch):
    """One layer's M_t at a time (n·d², not n·L·d²): forming a second layer's before the
    first is cleared raises, and every layer is formed once, not once per batch of rows."""
    formed_keys: list[int] = []
    real = formed.Formed.matrices

    def matrices(self, key, *a):
        if self._key != key:
            formed_keys.append(key)
        return real(self, key, *a)

    monkeypatch.setattr(formed.Formed, "matrices", matrices)
    model = tiny("llama", backend)
    _, fast = _both(model, "ln_final.hook_normalized", monkeypatch, chunk_size=5)
    assert fast.meta["formed_mlps"] == model.cfg.n_layers
    assert sorted(formed_keys) == list(range(model.cfg.n_layers))
    f = formed.Formed()
    a = torch.ones(1, 3, 4, dtype=torch.float64)
    W_in, W_out = torch.ones(2, 4, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64)
    f.matrices(0, W_in, a, W_out)
    with pytest.raises(RuntimeError, match="two layers at once"):
        f.matrices(1, W_in, a, W_out)
    f.clear()
    assert torch.equal(f.matrices(1, W_in, a, W_out), torch.full((3, 2, 2), 4.0,
                                                                dtype=torch.float64))


def test_plain_mlps_keep_the_ordinary_path(backend, monkeypatch):
    plain, fast = _both(tiny("gpt2", backend), "ln_final.hook_normalized", monkeypatch)
    assert "formed_mlps" not in fast.meta and torch.equal(fast.J4, plain.J4)


def test_forming_pays_only_with_many_rows():
    # SmolLM2: d 576, d_mlp 1536; forming pays above 576·1536 / (2·1536 − 576) ≈ 354 rows
    site = formed._Site(torch.nn.Identity(), "", torch.zeros(576, 1536), torch.zeros(1536, 576),
                        torch.sigmoid)
    assert formed.pays(576, [site]) and formed.pays(355, [site])
    assert not formed.pays(354, [site]) and not formed.pays(64, [site])
    assert not formed.pays(576, [])


def test_long_prompts_and_narrow_operators_keep_whole_network_passes(backend, monkeypatch):
    model = tiny("llama", backend)
    monkeypatch.setattr(formed, "pays", lambda rows, sites: bool(sites))
    hook = "ln_final.hook_normalized"
    assert "blocks_one_at_a_time" in linear_map(model, _tokens(), hook, pos=-1).meta
    narrow = linear_map(model, _tokens(), hook, pos=-1, out_index=[0, 3])
    assert "blocks_one_at_a_time" not in narrow.meta
    monkeypatch.setattr(by_layer, "MAX_TOKENS", 5)
    assert "blocks_one_at_a_time" not in linear_map(model, _tokens(6), hook, pos=-1).meta


def test_cut_hooks_lie_between_source_and_target(backend):
    model = tiny("llama", backend)  # 2 layers
    cut = by_layer.cut_hooks
    assert cut(model, "hook_embed", "ln_final.hook_normalized") == ["blocks.1.hook_resid_pre"]
    assert cut(model, "hook_embed", "logits") == ["blocks.1.hook_resid_pre"]
    assert cut(model, "hook_embed", "blocks.1.hook_resid_pre") == []
    assert cut(model, "hook_embed", "hook_embed") == []
    assert cut(model, "hook_embed", "blocks.1.mlp.hook_post") == ["blocks.1.hook_resid_pre"]
    assert cut(model, "blocks.1.hook_resid_pre", "ln_final.hook_normalized") == []
    assert cut(model, "blocks.0.attn.hook_z", "blocks.1.hook_resid_post") == [
        "blocks.1.hook_resid_pre"]


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
    monkeypatch.setattr(formed, "pays", lambda rows, sites: bool(sites))
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


def test_ctrl_c_between_blocks_leaves_the_model_as_it_was(backend, monkeypatch):
    """A KeyboardInterrupt in the second block's batches (one block's graph already freed, the
    formed hooks' matrices held): the model is as it was and the next map is exact."""
    model = tiny("llama", backend, fresh=True)
    monkeypatch.setattr(formed, "pays", lambda rows, sites: bool(sites))
    real, calls = by_layer.batched_grad, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # 16 rows in batches of 5: the second block's second batch
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(by_layer, "batched_grad", interrupted)
    before = state(model)
    with pytest.raises(KeyboardInterrupt):
        linear_map(model, _tokens(), "ln_final.hook_normalized", pos=-1, chunk_size=5)
    assert calls["n"] == 6
    assert_same_state(before, model)
    monkeypatch.setattr(by_layer, "batched_grad", real)
    m = linear_map(model, _tokens(), "ln_final.hook_normalized", pos=-1)
    assert m.meta["blocks_one_at_a_time"] == 2 and m.relative_error <= 1e-12
