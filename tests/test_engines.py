"""Engines (forward-mode replay, matrix-free SVD), memory preflight and interrupt safety, on tiny
random models (fp64 unless stated)."""

from __future__ import annotations

import pytest
import torch

from lin_lens import is_detached, linear_map, operators_at_hooks, top_singular
from lin_lens.errors import MemoryBudgetError
from lin_lens.maps import layer_sweep_hooks
from lin_lens.maps.budget import choose_chunk, memory_budget, parse_bytes
from lin_lens.maps.forward import choose_engine
from lin_lens.testing import tiny_model

ARCHS = ["gpt2", "llama", "pythia", "gemma", "qwen3", "relu"]


def _tokens(n: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (1, n), generator=g)


def _extra_hooks(model) -> list[str]:
    extra = ["blocks.1.mlp.hook_pre", "blocks.0.attn.hook_z", "blocks.1.hook_resid_mid",
             "blocks.0.mlp.hook_post", "blocks.1.attn.hook_v"]
    return [h for h in extra if h in model.hook_dict]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pos", [-1, None, [0, 3]])
def test_forward_equals_reverse(arch, pos):
    model = tiny_model(arch)
    toks = _tokens()
    hooks = layer_sweep_hooks(model) + _extra_hooks(model)
    fwd = operators_at_hooks(model, toks, hooks, pos=pos, engine="forward")
    rev = operators_at_hooks(model, toks, hooks, pos=pos, engine="reverse")
    for h in hooks:
        a, b = fwd[h], rev[h]
        assert a.meta["engine"] == "forward" and b.meta["engine"] == "reverse"
        assert a.J.shape == b.J.shape, h
        assert torch.allclose(a.J4, b.J4, rtol=0, atol=1e-12), h
        assert torch.equal(a.act4, b.act4), h
        assert set(a.constants) == set(b.constants), h
        for k in a.constants:
            assert torch.allclose(a.constants[k], b.constants[k], rtol=0, atol=1e-12), (h, k)
        assert a.relative_error <= 1e-12, (h, a.relative_error)
        assert a.out_shape == b.out_shape and a.positions == b.positions


def test_forward_constants_are_independent():
    """The constants come from their own replays: corrupting J must break the reconstruction."""
    model = tiny_model("gpt2")
    m = operators_at_hooks(model, _tokens(), ["blocks.1.hook_resid_post"], engine="forward")[
        "blocks.1.hook_resid_post"]
    assert len(m.constants) > 0 and "hook_pos_embed" in m.constants
    assert m.relative_error <= 1e-12
    m.J4[0, 2] *= 1.001
    assert m.relative_error > 1e-6


def test_linear_map_engine_keyword():
    model = tiny_model("llama")
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


@pytest.mark.parametrize("make", ["solu", "bridge-llama", "bridge-gpt2"])
def test_forward_engine_from_the_graph_where_replay_cannot_follow(make):
    """SoLU (LN inside the MLP) and Bridges have no replay rule: the forward engine takes its
    columns from the double-backward of the detached graph instead, with the same constants."""
    from lin_lens.testing import tiny_bridge

    model = tiny_bridge(make.split("-")[1]) if make.startswith("bridge") else tiny_model(make)
    toks = _tokens()
    hooks = layer_sweep_hooks(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    n_hooks = {n: len(hp.fwd_hooks) for n, hp in model.hook_dict.items()}
    fwd = operators_at_hooks(model, toks, hooks, pos=[2, 5], engine="forward")
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert n_hooks == {n: len(hp.fwd_hooks) for n, hp in model.hook_dict.items()}
    assert not is_detached(model)
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


def test_auto_choice():
    model = tiny_model("gpt2")  # d_model 16, 2 layers
    sweep = layer_sweep_hooks(model)
    assert choose_engine(model, 2, [1], sweep) == "forward"  # 6 hooks x 16 rows > 2 x 16 cols
    assert choose_engine(model, 40, [39], ["blocks.1.hook_resid_post"]) == "reverse"
    assert choose_engine(model, 3, [2], ["logits"]) == "reverse"


# -- matrix-free ---------------------------------------------------------------------------------

def _principal_sines(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    qa, _ = torch.linalg.qr(A)
    qb, _ = torch.linalg.qr(B)
    c = torch.linalg.svdvals(qa.T @ qb).clamp(max=1)
    return torch.sqrt(1 - c**2)


@pytest.mark.parametrize("arch,hook", [("gpt2", "blocks.1.hook_resid_post"),
                                       ("llama", "logits"), ("gemma", "logits"),
                                       ("pythia", "blocks.1.hook_mlp_out")])
def test_top_singular_matches_exact_svd(arch, hook):
    model = tiny_model(arch, d_model=16)
    toks = _tokens(12)
    k = 5
    exact = linear_map(model, toks, hook, pos=-1, engine="reverse")
    Jm = exact.J.permute(1, 0, 2).reshape(exact.J.shape[1], -1)  # [d_out, n·d_in]
    U0, S0, V0h = torch.linalg.svd(Jm, full_matrices=False)
    res = top_singular(model, toks, hook, pos=-1, k=k, block=4, tol=1e-9)
    U, S, V = res
    assert res.info["converged"]
    assert torch.allclose(S, S0[:k], rtol=1e-8, atol=0), (S, S0[:k])
    assert float(_principal_sines(U, U0[:, :k]).max()) < 1e-6
    assert float(_principal_sines(V.reshape(-1, k), V0h[:k].T).max()) < 1e-6
    # Jv = σu exactly, unit vectors
    assert torch.allclose(Jm @ V.reshape(-1, k), U * S, rtol=0, atol=1e-10 * float(S[0]))
    assert max(res.info["rel_residuals"]) <= 1e-9


def _exact_svd(model, toks, hook):
    exact = linear_map(model, toks, hook, pos=-1, engine="reverse")
    Jm = exact.J.permute(1, 0, 2).reshape(exact.J.shape[1], -1)  # [d_out, n·d_in]
    return torch.linalg.svd(Jm, full_matrices=False)


@pytest.mark.parametrize("make", ["solu", "bridge-llama", "bridge-gpt2"])
def test_top_singular_where_replay_cannot_go(make):
    """JVPs come from the double-backward of the reverse graph, so SoLU and Bridges work too."""
    from lin_lens.testing import tiny_bridge

    model = tiny_bridge(make.split("-")[1]) if make.startswith("bridge") else tiny_model(make)
    toks = _tokens(10)
    hook = "blocks.1.hook_resid_post"
    U0, S0, _ = _exact_svd(model, toks, hook)
    res = top_singular(model, toks, hook, k=3, block=2, tol=1e-12, vec_tol=1e-9)
    assert res.info["converged"]
    assert torch.allclose(res.S, S0[:3], rtol=1e-9, atol=0), (res.S, S0[:3])
    assert float(_principal_sines(res.U, U0[:, :3]).max()) < 1e-6
    html = res._repr_html_()
    assert "top 3 singular triplets" in html and html.count("<tr>") == 4


def test_top_singular_default_block_and_unbatched_products(monkeypatch):
    """≥ 32 tokens: single-vector Lanczos; PASS_ROWS = 1 forces plain (non-vmap) backward passes
    in the matrix-free products and in linear_map; all agree with the batched results."""
    import lin_lens.maps.budget as mem

    model = tiny_model("llama", d_model=16)
    toks = _tokens(40)
    hook = "blocks.1.hook_resid_post"
    U0, S0, _ = _exact_svd(model, toks, hook)
    batched = linear_map(model, toks, hook, engine="reverse")
    res = top_singular(model, toks, hook, k=4, tol=1e-10)
    assert res.info["block"] == 1 and res.info["converged"]
    assert torch.allclose(res.S, S0[:4], rtol=1e-9, atol=0)
    assert max(res.info["rel_error_estimate"]) <= 1e-10
    monkeypatch.setattr(mem, "PASS_ROWS", 1)
    assert mem.preferred_chunk(40) == 1
    one = top_singular(model, toks, hook, k=4, block=3, tol=1e-10)
    assert torch.allclose(one.S, S0[:4], rtol=1e-9, atol=0)
    plain = linear_map(model, toks, hook, engine="reverse")
    assert torch.allclose(plain.J, batched.J, rtol=0, atol=1e-13)


def test_top_singular_stopping_rule_is_honest():
    """Stopped at the default tol, every σ is within tol (relative) of the exact one, and the
    reported estimate is not below the true error."""
    model = tiny_model("gpt2", d_model=128)  # J is 128 × 3072: stops long before it is complete
    toks = _tokens(24)
    hook = "blocks.1.hook_resid_post"
    _, S0, _ = _exact_svd(model, toks, hook)
    res = top_singular(model, toks, hook, k=6, tol=1e-4)
    true = ((res.S - S0[:6]).abs() / S0[:6])
    assert res.info["converged"] and not res.info["output_space_complete"]
    assert float(true.max()) <= 1e-4
    est = torch.tensor(res.info["rel_error_estimate"], dtype=true.dtype)
    assert bool((true <= est * 1.01 + 1e-15).all()), (true, est)


def test_top_singular_stops_early_on_low_rank():
    model = tiny_model("llama", d_model=16)
    toks = _tokens(20)
    res = top_singular(model, toks, "blocks.1.hook_resid_post", k=2, block=2, tol=1e-3)
    # J is 16 x 320: far fewer than 320 JVPs are needed
    assert res.info["converged"] and res.info["n_jvp"] < 40


# -- memory --------------------------------------------------------------------------------------

def test_memory_preflight_refuses_and_points_to_matrix_free():
    model = tiny_model("gpt2")
    toks = _tokens()
    with pytest.raises(MemoryBudgetError, match="top_singular"):
        linear_map(model, toks, "blocks.1.hook_resid_post", max_memory=1000)
    with pytest.raises(MemoryBudgetError):
        operators_at_hooks(model, toks, layer_sweep_hooks(model), max_memory="1KB")
    with memory_budget("1KB"), pytest.raises(MemoryBudgetError):
        linear_map(model, toks, "blocks.1.hook_resid_post", engine="reverse")
    m = linear_map(model, toks, "blocks.1.hook_resid_post", max_memory="1GB")
    assert m.relative_error <= 1e-12
    assert parse_bytes("1.5GB") == int(1.5 * 1024**3) and parse_bytes(123) == 123
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_chunk_shrinks_to_budget_and_results_unchanged():
    model = tiny_model("gpt2")
    big = choose_chunk(model, 6, torch.float64, 10**12, 64, 10**6)
    small = choose_chunk(model, 6, torch.float64, 20_000, 64, 10**6)
    assert big == 64 and 1 <= small < 16
    toks = _tokens()
    a = linear_map(model, toks, "blocks.1.hook_resid_post", engine="reverse", chunk_size=3)
    b = linear_map(model, toks, "blocks.1.hook_resid_post", engine="reverse")
    assert torch.allclose(a.J, b.J, rtol=0, atol=1e-13)


# -- interrupts ----------------------------------------------------------------------------------

def _state(model):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: len(hp.fwd_hooks) for n, hp in model.hook_dict.items()},
        model.cfg.use_attn_result,
    )


def _same_state(model, before) -> None:
    params, rg, nhooks, flag = before
    after = _state(model)
    assert all(torch.equal(params[n], after[0][n]) for n in params)
    assert rg == after[1]
    assert nhooks == after[2]
    assert flag == after[3]
    assert not is_detached(model)
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0
               for m in [model, model.unembed])


@pytest.mark.parametrize("engine,fire_at", [("forward", 3), ("reverse", 0), ("matrix_free", 0)])
def test_keyboard_interrupt_leaves_model_unchanged(engine, fire_at):
    model = tiny_model("gpt2")
    toks = _tokens()
    calls = {"n": 0}

    def boom(t, hook):  # the user's own hook, raising mid-computation
        calls["n"] += 1
        if calls["n"] > fire_at:
            raise KeyboardInterrupt

    model.hook_dict["blocks.1.hook_attn_out"].add_hook(boom)
    before = _state(model)
    hooks = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_result"]
    with pytest.raises(KeyboardInterrupt):
        if engine == "matrix_free":
            top_singular(model, toks, "blocks.1.hook_resid_post", k=2, block=1, tol=1e-14)
        else:
            operators_at_hooks(model, toks, hooks, pos=None, engine=engine, chunk_size=4)
    _same_state(model, before)
    model.reset_hooks()
    # and it still works afterwards
    m = operators_at_hooks(model, toks, hooks, engine=engine if engine != "matrix_free"
                           else "auto")
    assert all(v.relative_error <= 1e-12 for v in m.values())


def test_keyboard_interrupt_from_progress_bar(monkeypatch):
    import lin_lens.maps.forward as fwd_mod
    import lin_lens.maps.matrix_free as mf_mod

    model = tiny_model("llama")
    before = _state(model)

    class Bar:
        def __init__(self, *a, **k):
            self.n = 0

        def update(self, k):
            self.n += 1
            if self.n == 2:
                raise KeyboardInterrupt

        def close(self):
            pass

    monkeypatch.setattr(fwd_mod, "progress_bar", Bar)
    monkeypatch.setattr(mf_mod, "progress_bar", Bar)
    with pytest.raises(KeyboardInterrupt):
        operators_at_hooks(model, _tokens(), layer_sweep_hooks(model), engine="forward",
                           chunk_size=4)
    with pytest.raises(KeyboardInterrupt):
        top_singular(model, _tokens(), "logits", k=2, block=1, tol=1e-14)
    _same_state(model, before)


def test_float32_forward_engine():
    model = tiny_model("llama", dtype=torch.float32)
    toks = _tokens()
    fwd = operators_at_hooks(model, toks, layer_sweep_hooks(model), engine="forward")
    rev = operators_at_hooks(model, toks, layer_sweep_hooks(model), engine="reverse")
    for h in fwd:
        assert torch.allclose(fwd[h].J4, rev[h].J4, rtol=1e-4, atol=1e-4)
        assert fwd[h].relative_error <= 1e-5
