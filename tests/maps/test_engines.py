"""Engines: forward-mode columns (replay on HookedTransformers, the double-backward graph where
replay cannot follow) agree with reverse mode; the auto choice; on tiny random models."""

from __future__ import annotations

import pytest
import torch

from lin_lens import linear_map, operators_at_hooks
from lin_lens.maps import layer_sweep_hooks
from lin_lens.maps.forward import choose_engine
from tests.conftest import ARCHS, BACKENDS, assert_same_state, requires_hooked, state, tiny

RELU = requires_hooked("the ReLU family is an act_fn override of a tiny HookedTransformer")
SOLU = requires_hooked("the SoLU family is an act_fn override of a tiny HookedTransformer")
# Which forward engine a model gets: replay follows HookedTransformer blocks; a Bridge (and SoLU,
# with a LayerNorm inside the MLP) takes its columns from the graph.
ENGINE = {"hooked": "forward", "bridge": "forward (graph)"}
GATED = ("llama", "gemma", "qwen3")

def _tokens(n: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (1, n), generator=g)


def _gated(model) -> bool:
    return "blocks.1.mlp.hook_pre_linear" in model.hook_dict


def _extra_hooks(model, backend: str) -> list[str]:
    extra = ["blocks.1.mlp.hook_pre", "blocks.0.attn.hook_z", "blocks.1.hook_resid_mid",
             "blocks.0.mlp.hook_post", "blocks.1.attn.hook_v"]
    return [h for h in extra if h in model.hook_dict]


def _assert_forward_equals_reverse(model, hooks, pos, engine):
    toks = _tokens()
    fwd = operators_at_hooks(model, toks, hooks, pos=pos, engine="forward")
    rev = operators_at_hooks(model, toks, hooks, pos=pos, engine="reverse")
    for h in hooks:
        a, b = fwd[h], rev[h]
        assert a.meta["engine"] == engine and b.meta["engine"] == "reverse"
        assert a.J.shape == b.J.shape, h
        assert torch.allclose(a.J4, b.J4, rtol=0, atol=1e-12), h
        assert torch.equal(a.act4, b.act4), h
        assert set(a.constants) == set(b.constants), h
        for k in a.constants:
            assert torch.allclose(a.constants[k], b.constants[k], rtol=0, atol=1e-12), (h, k)
        assert a.relative_error <= 1e-12, (h, a.relative_error)
        assert a.out_shape == b.out_shape and a.positions == b.positions


@pytest.mark.parametrize("pos", [-1, None, [0, 3]])
@pytest.mark.parametrize("arch,backend", [(a, b) for a in ARCHS for b in BACKENDS]
                         + [pytest.param("relu", "hooked", marks=RELU)])
def test_forward_equals_reverse(arch, backend, pos):
    model = tiny(arch, backend)
    hooks = layer_sweep_hooks(model) + _extra_hooks(model, backend)
    _assert_forward_equals_reverse(model, hooks, pos, ENGINE[backend])


@pytest.mark.parametrize("arch,backend", [(a, b) for a in GATED for b in BACKENDS])
def test_forward_engine_at_the_gate(arch, backend):
    """A gated MLP's hook_pre is the gate's pre-activation: linear once the norm is frozen."""
    model = tiny(arch, backend)
    hooks = ["blocks.1.mlp.hook_pre"] + layer_sweep_hooks(model)
    _assert_forward_equals_reverse(model, hooks, None, ENGINE[backend])


@requires_hooked("the forward replay follows HookedTransformer")
def test_replay_skips_the_frozen_gate_unless_it_is_a_target():
    """The replay does not compute the gate projection (its value is replaced by the frozen one)
    except in a layer where the gate pre-activation itself is asked for; the maps above agree
    with the reverse engine either way."""
    from lin_lens.maps.replay import Replay

    model = tiny("llama", "hooked")
    toks = torch.tensor([[1, 2, 3]])
    n = model.cfg.n_layers
    r = Replay(model, toks, "hook_embed", layer_sweep_hooks(model), [2])
    gates = {k: w for k, w in r._narrow.items() if k.endswith("W_gate")}
    assert sorted(gates) == [f"blocks.{i}.mlp.W_gate" for i in range(n)]
    assert all(w.shape == (model.cfg.d_model, 0) for w in gates.values())
    r = Replay(model, toks, "hook_embed", ["blocks.1.mlp.hook_pre"], [2])
    assert "blocks.1.mlp.W_gate" not in r._narrow and "blocks.0.mlp.W_gate" in r._narrow


@requires_hooked("the forward replay follows HookedTransformer")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_replay_skips_the_frozen_queries_and_keys(arch):
    """q and k only feed the frozen pattern: the replay runs their projections (and the rotary)
    at zero width, unless a target reads the Q/K branch; the maps still equal the reverse
    engine's (also in test_forward_equals_reverse, over every architecture)."""
    from lin_lens.maps.replay import Replay

    model = tiny(arch, "hooked")
    toks = torch.tensor([[1, 2, 3, 4]])
    hooks = layer_sweep_hooks(model)
    r = Replay(model, toks, "hook_embed", hooks, [3])
    n = model.cfg.n_layers
    for i in range(n):
        q = r._narrow[f"blocks.{i}.attn.W_Q"]
        k = r._narrow.get(f"blocks.{i}.attn.W_K", r._narrow.get(f"blocks.{i}.attn._W_K"))
        assert q.shape[-1] == 0 and k is not None and k.shape[-1] == 0
        if model.cfg.positional_embedding_type == "rotary":
            assert r._narrow[f"blocks.{i}.attn.rotary_sin"].shape[-1] == 0
    _assert_forward_equals_reverse(model, hooks, None, "forward")
    r = Replay(model, toks, "hook_embed", ["blocks.1.attn.hook_q"], [3])
    assert not any("W_Q" in k or "W_K" in k for k in r._narrow)


def test_forward_constants_are_independent(backend):
    """The constants come from their own replays: corrupting J must break the reconstruction."""
    model = tiny("gpt2", backend)
    m = operators_at_hooks(model, _tokens(), ["blocks.1.hook_resid_post"], engine="forward")[
        "blocks.1.hook_resid_post"]
    assert len(m.constants) > 0 and "hook_pos_embed" in m.constants
    assert m.relative_error <= 1e-12
    m.J4[0, 2] *= 1.001
    assert m.relative_error > 1e-6


def test_linear_map_engine_keyword(backend):
    model = tiny("llama", backend)
    toks = _tokens(5)
    a = linear_map(model, toks, "blocks.1.hook_resid_post", pos=None, engine="forward")
    b = linear_map(model, toks, "blocks.1.hook_resid_post", pos=None, engine="reverse")
    assert torch.allclose(a.J4, b.J4, rtol=0, atol=1e-12)
    c = linear_map(model, toks, "blocks.1.hook_resid_post", pos=-1)  # auto
    assert torch.allclose(c.J, b.J[-1], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="top_singular"):
        linear_map(model, toks, engine="matrix_free")
    with pytest.raises(ValueError, match="engine"):
        linear_map(model, toks, engine="sideways")
    with pytest.raises(ValueError, match="forward"):
        linear_map(model, toks, "logits", engine="forward")


@pytest.mark.parametrize("arch,backend", [pytest.param("solu", "hooked", marks=SOLU),
                                          ("llama", "bridge"), ("gpt2", "bridge")])
def test_forward_engine_from_the_graph_where_replay_cannot_follow(arch, backend):
    """SoLU (LN inside the MLP) and Bridges have no replay rule: the forward engine takes its
    columns from the double-backward of the detached graph instead, with the same constants."""
    model = tiny(arch, backend)
    toks = _tokens()
    hooks = layer_sweep_hooks(model)
    before = state(model)
    fwd = operators_at_hooks(model, toks, hooks, pos=[2, 5], engine="forward")
    assert_same_state(before, model)
    rev = operators_at_hooks(model, toks, hooks, pos=[2, 5], engine="reverse")
    for h in hooks:
        assert fwd[h].meta["engine"] == "forward (graph)"
        assert torch.allclose(fwd[h].J4, rev[h].J4, rtol=0, atol=1e-12), h
        assert fwd[h].constants.keys() == rev[h].constants.keys(), h
        for o in rev[h].constants:
            assert torch.allclose(fwd[h].constants[o], rev[h].constants[o], rtol=0, atol=1e-12)
        assert fwd[h].relative_error <= 1e-12
    auto = operators_at_hooks(model, toks, hooks, pos=-1, engine="auto")
    assert all(m.relative_error <= 1e-12 for m in auto.values())


def test_auto_choice(backend):
    model = tiny("gpt2", backend)  # d_model 16, 2 layers
    sweep = layer_sweep_hooks(model)
    # 6 hooks x 16 rows > 2 x 16 cols: the replay on HookedTransformer, graph columns on a Bridge
    assert choose_engine(model, 2, [1], sweep) == "forward"
    assert choose_engine(model, 40, [39], ["blocks.1.hook_resid_post"]) == "reverse"
    # one hook at the last of 8 positions: 16 rows against 8 x 16 columns
    assert choose_engine(model, 8, [7], ["blocks.1.hook_resid_post"]) == "reverse"
    assert choose_engine(model, 3, [2], ["logits"]) == "reverse"


def test_float32_forward_engine(backend):
    model = tiny("llama", backend, torch.float32)
    toks = _tokens()
    fwd = operators_at_hooks(model, toks, layer_sweep_hooks(model), engine="forward")
    rev = operators_at_hooks(model, toks, layer_sweep_hooks(model), engine="reverse")
    for h in fwd:
        assert torch.allclose(fwd[h].J4, rev[h].J4, rtol=1e-4, atol=1e-4)
        assert fwd[h].relative_error <= 1e-5
