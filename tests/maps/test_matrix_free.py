"""Matrix-free top singular triplets (block Lanczos on JVP/VJP products) against the exact SVD of
the full map, on tiny random float64 models."""

from __future__ import annotations

import pytest
import torch

import lin_lens.maps.budget as mem
from lin_lens import linear_map, top_singular
from lin_lens.testing import tiny_model
from tests.conftest import BACKENDS, requires_hooked, tiny


def _tokens(n: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (1, n), generator=g)


def _principal_sines(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    qa, _ = torch.linalg.qr(A)
    qb, _ = torch.linalg.qr(B)
    c = torch.linalg.svdvals(qa.T @ qb).clamp(max=1)
    return torch.sqrt(1 - c**2)


def _exact_svd(model, toks, hook):
    exact = linear_map(model, toks, hook, pos=-1, engine="reverse")
    Jm = exact.J.permute(1, 0, 2).reshape(exact.J.shape[1], -1)  # [d_out, n·d_in]
    return torch.linalg.svd(Jm, full_matrices=False)


@pytest.mark.parametrize("arch,hook", [("gpt2", "blocks.1.hook_resid_post"),
                                       ("llama", "logits"), ("gemma", "logits"),
                                       ("pythia", "blocks.1.hook_mlp_out")])
def test_top_singular_matches_exact_svd(arch, hook, backend):
    model = tiny(arch, backend)
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


@pytest.mark.parametrize("arch,backend", [
    pytest.param("solu", "hooked", marks=requires_hooked(
        "the SoLU family is an act_fn override of a tiny HookedTransformer")),
    *[(a, "bridge") for a in ("llama", "gpt2") if "bridge" in BACKENDS]])
def test_top_singular_where_replay_cannot_go(arch, backend):
    """JVPs come from the double-backward of the reverse graph, so SoLU and Bridges work too."""
    model = tiny(arch, backend)
    toks = _tokens(10)
    hook = "blocks.1.hook_resid_post"
    U0, S0, _ = _exact_svd(model, toks, hook)
    res = top_singular(model, toks, hook, k=3, block=2, tol=1e-12, vec_tol=1e-9)
    assert res.info["converged"]
    assert torch.allclose(res.S, S0[:3], rtol=1e-9, atol=0), (res.S, S0[:3])
    assert float(_principal_sines(res.U, U0[:, :3]).max()) < 1e-6
    html = res._repr_html_()
    assert "top 3 singular triplets" in html and html.count("<tr>") == 4


def test_top_singular_default_block_and_unbatched_products(monkeypatch, backend):
    """≥ 32 tokens: single-vector Lanczos; PASS_ROWS = 1 forces plain (non-vmap) backward passes
    in the matrix-free products and in linear_map; all agree with the batched results."""
    model = tiny("llama", backend)
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


@requires_hooked("needs d_model=128 (so Lanczos stops before J's output space is complete); "
                 "tiny_bridge has a fixed d_model of 16")
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


def test_top_singular_stops_early_on_low_rank(backend):
    model = tiny("llama", backend)
    toks = _tokens(20)
    res = top_singular(model, toks, "blocks.1.hook_resid_post", k=2, block=2, tol=1e-3)
    # J is 16 x 320: far fewer than 320 JVPs are needed
    assert res.info["converged"] and res.info["n_jvp"] < 40
