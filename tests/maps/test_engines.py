"""Engines: forward-mode columns (the replay on both backends, the double-backward graph where
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


def _assert_forward_equals_reverse(model, hooks, pos, engine="forward"):
    toks = _tokens()
    before = state(model)
    fwd = operators_at_hooks(model, toks, hooks, pos=pos, engine="forward")
    assert_same_state(before, model)  # every stand-in of the replay swapped back
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
    _assert_forward_equals_reverse(model, hooks, pos)


@pytest.mark.parametrize("arch,backend", [(a, b) for a in GATED for b in BACKENDS])
def test_forward_engine_at_the_gate(arch, backend):
    """A gated MLP's hook_pre is the gate's pre-activation: linear once the norm is frozen."""
    model = tiny(arch, backend)
    hooks = ["blocks.1.mlp.hook_pre"] + layer_sweep_hooks(model)
    _assert_forward_equals_reverse(model, hooks, None)


def _gate_stand_ins(r) -> dict[int, tuple]:
    """{layer: shape} of the zero-width gate weights a replay swaps in."""
    out = {}
    for k, w in r._narrow.items():
        if k.endswith("W_gate") or "gate_proj" in k:
            out[int(k.split("layers.")[-1].split(".")[0] if "layers." in k
                    else k.split(".")[1])] = tuple(w.shape)
    return out


def test_replay_skips_the_frozen_gate_unless_it_is_a_target(backend):
    """The replay does not compute the gate projection (its value is replaced by the frozen one)
    except in a layer where the gate pre-activation itself is asked for; the maps above agree
    with the reverse engine either way. On a Bridge the stand-in is the Hugging Face gate
    layer's weight at width 0."""
    from lin_lens.maps.replay import Replay

    model = tiny("llama", backend)
    toks = torch.tensor([[1, 2, 3]])
    n, d = model.cfg.n_layers, model.cfg.d_model
    r = Replay(model, toks, "hook_embed", layer_sweep_hooks(model), [2])
    gates = _gate_stand_ins(r)
    assert sorted(gates) == list(range(n))
    assert all(s in ((d, 0), (0, d)) for s in gates.values())
    r = Replay(model, toks, "hook_embed", ["blocks.1.mlp.hook_pre"], [2])
    assert sorted(_gate_stand_ins(r)) == [0]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_replay_skips_the_frozen_queries_and_keys(arch, backend):
    """q and k only feed the frozen pattern: the replay runs their projections (and the rotary)
    at zero width on HookedTransformer, and swaps the Hugging Face projections for zeros on a
    Bridge (which reshapes q/k by head), unless a target reads the Q/K branch; the maps still
    equal the reverse engine's (also in test_forward_equals_reverse, over every architecture)."""
    from lin_lens.maps.replay import Replay
    from lin_lens.maps.replay_plan import _Zeros

    if arch == "qwen3" and backend == "hooked":
        pytest.skip("HookedTransformer reshapes q/k by width in its q/k norms: left live")
    model = tiny(arch, backend)
    toks = torch.tensor([[1, 2, 3, 4]])
    hooks = layer_sweep_hooks(model)
    r = Replay(model, toks, "hook_embed", hooks, [3])
    n = model.cfg.n_layers
    if backend == "bridge":
        zeros = [k for k, m in r._narrow.items() if isinstance(m, _Zeros)]
        assert len(zeros) == 2 * n
    else:
        for i in range(n):
            q = r._narrow[f"blocks.{i}.attn.W_Q"]
            k = r._narrow.get(f"blocks.{i}.attn.W_K", r._narrow.get(f"blocks.{i}.attn._W_K"))
            assert q.shape[-1] == 0 and k is not None and k.shape[-1] == 0
            if model.cfg.positional_embedding_type == "rotary":
                assert r._narrow[f"blocks.{i}.attn.rotary_sin"].shape[-1] == 0
    _assert_forward_equals_reverse(model, hooks, None)
    r = Replay(model, toks, "hook_embed", ["blocks.1.attn.hook_q"], [3])
    assert not any(isinstance(m, _Zeros) or "W_Q" in k or "W_K" in k
                   for k, m in r._narrow.items())


def test_replay_falls_back_to_full_width_when_a_stand_in_breaks_the_forward(backend,
                                                                            monkeypatch):
    """A Hugging Face layer that reshapes by the width of a skipped projection raises in the
    first replay: the replay then runs every projection at full width, with the same maps."""
    import lin_lens.maps.replay as replay_mod
    from lin_lens.maps.replay_plan import _Zeros

    def broken(model, plan, targets, biases):
        d = int(model.cfg.d_model)
        if backend == "bridge":
            name = next(n for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and "q_proj" in n)
            return {name: _Zeros(d + 1)}, set()
        return {"blocks.0.attn.W_Q": model.blocks[0].attn.W_Q.detach()[..., :1]}, set()

    errors = []
    run = replay_mod.Replay._run

    def counted(self, *a, **k):
        try:
            return run(self, *a, **k)
        except RuntimeError as e:
            errors.append(e)
            raise

    monkeypatch.setattr(replay_mod, "unused_projections", broken)
    monkeypatch.setattr(replay_mod.Replay, "_run", counted)
    model = tiny("llama", backend)
    _assert_forward_equals_reverse(model, layer_sweep_hooks(model), None)
    assert len(errors) == 1  # the stand-in broke the first replay only


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
def test_forward_engine_from_the_graph_where_replay_cannot_follow(arch, backend, monkeypatch):
    """SoLU (LN inside the MLP) has no replay rule, nor have mixtures of experts: the forward
    engine takes its columns from the double-backward of the detached graph instead, with the
    same constants. On Bridges (which the replay follows) the graph is forced here, so it stays
    covered on both backends."""
    import lin_lens.maps.columns as columns_mod
    from lin_lens.maps.replay import ReplayUnsupported

    if backend == "bridge":
        def no_replay(*a, **k):
            raise ReplayUnsupported("forced by the test")
        monkeypatch.setattr(columns_mod, "Replay", no_replay)
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
    # 6 hooks x 16 rows > 2 x 16 cols: the replay
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
