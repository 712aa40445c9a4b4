"""SVD and stable rank of a linear map (tiny float64 models)."""

from __future__ import annotations

import pytest
import torch

import lin_lens
import lin_lens.spectrum as A
from lin_lens.spectrum import stable_rank, stacked_operator, svd
from tests.conftest import BACKENDS, tiny

TOKENS = torch.tensor([3, 17, 5, 41, 8])


@pytest.fixture(scope="module")
def resid_map(backend):
    return lin_lens.linear_map(tiny("gpt2", backend), TOKENS, "blocks.1.hook_resid_post")


def test_svd_reconstructs_per_token_and_stacked(resid_map):
    J = resid_map.J
    full = svd(resid_map)
    assert full.U.shape == (5, 16, 16) and full.S.shape == (5, 16)
    assert (full.reconstruct() - J).abs().max() < 1e-12 * J.abs().max()
    st = svd(resid_map, stacked=True)
    assert st.Vh.shape == (16, 5 * 16)
    Js = stacked_operator(J)
    assert (st.reconstruct() - Js).abs().max() < 1e-12 * Js.abs().max()
    # the stacked operator times the flattened input is the linear part of the activation
    lin = Js @ resid_map.x.reshape(-1)
    assert torch.allclose(lin + resid_map.constant, resid_map.act, rtol=0, atol=1e-12)
    # truncation keeps the top of the spectrum
    top = svd(resid_map, k=2)
    assert top.S.shape == (5, 2)
    assert torch.allclose(top.S, full.S[:, :2], rtol=1e-12, atol=0)
    assert torch.allclose(top.stable_rank, full.stable_rank, rtol=1e-12, atol=0)


def test_sign_convention_v_dot_x_nonnegative(resid_map):
    per = svd(resid_map)
    vx = torch.einsum("ski,si->sk", per.Vh, resid_map.x)
    assert (vx >= 0).all()
    st = svd(resid_map, stacked=True)
    assert (st.Vh @ resid_map.x.reshape(-1) >= 0).all()
    # hence u·(J x) = s (v·x) >= 0: u points where the actual input pushes the output
    c = resid_map.contributions()
    assert (torch.einsum("sok,so->sk", per.U, c) >= -1e-12).all()


def test_stable_rank_values():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(7, 1, generator=g, dtype=torch.float64), torch.randn(1, 5, generator=g,
                                                                            dtype=torch.float64)
    assert abs(float(stable_rank(u @ v)) - 1.0) < 1e-12
    assert abs(float(stable_rank(torch.eye(6, dtype=torch.float64))) - 6.0) < 1e-12
    assert float(stable_rank(torch.diag(torch.tensor([2.0, 1.0])))) == pytest.approx(1.25)
    assert float(stable_rank(torch.zeros(3, 3))) == 0.0
    batch = torch.stack([u @ v, 3 * (u @ v)])
    assert torch.allclose(stable_rank(batch), torch.ones(2, dtype=torch.float64))


def test_stable_rank_of_map_matches_tensor(resid_map):
    per = stable_rank(resid_map)
    assert per.shape == (5,)
    assert torch.allclose(per, stable_rank(resid_map.J))
    assert torch.allclose(stable_rank(resid_map, stacked=True),
                          stable_rank(stacked_operator(resid_map.J)))
    assert (per >= 1).all() and (per <= 16).all()


def test_gram_path_for_tall_maps(monkeypatch):
    """Tall, large operators (maps at "logits") use the float64 Gram matrix; same triplets."""
    g = torch.Generator().manual_seed(0)
    J = torch.randn(2, 400, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 20, generator=g, dtype=torch.float64)  # rank 3, tall
    ref = svd(J, k=3)
    monkeypatch.setattr(A, "GRAM_MIN_NUMEL", 0)
    got = svd(J, k=3)
    assert torch.allclose(got.S, ref.S, rtol=1e-12)
    assert torch.allclose(got.U, ref.U, atol=1e-10) and torch.allclose(got.Vh, ref.Vh, atol=1e-10)
    assert (got.reconstruct() - J).abs().max() < 1e-12 * J.abs().max()
    assert abs(float(stable_rank(got)[0]) - float(stable_rank(ref)[0])) < 1e-8


@pytest.mark.parametrize("shape", [(3, 96, 96), (40, 400), (400, 40)])
@pytest.mark.parametrize("decay", [0.9, 1.0])  # decaying and flat (random) spectra
def test_top_k_from_the_gram_matrix_matches_lapack(shape, decay):
    """k ≪ min(m, n): top-k via subspace iteration on the smaller Gram matrix (the cheap path
    analyses use) agrees with LAPACK's full SVD; stable rank from ‖J‖_F² and s_max likewise."""
    g = torch.Generator().manual_seed(1)
    J = torch.randn(*shape, generator=g, dtype=torch.float64)
    r = min(shape[-2:])
    J = J * (decay ** torch.arange(shape[-1], dtype=torch.float64))  # column scaling: a decay
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    top = svd(J, k=3)
    assert top.spectrum is None and top.S.shape == (*shape[:-2], 3)
    assert torch.allclose(top.S, S[..., :3], rtol=1e-9, atol=0)
    cos_u = (top.U * U[..., :3]).sum(-2).abs()
    cos_v = (top.Vh * Vh[..., :3, :]).sum(-1).abs()
    gap_ok = (S[..., 2] - S[..., 3]) > 1e-3 * S[..., 0]  # vectors are defined up to the gap
    assert torch.all((cos_u > 1 - 1e-6) | ~gap_ok[..., None])
    assert torch.all((cos_v > 1 - 1e-6) | ~gap_ok[..., None])
    exact = (S.pow(2).sum(-1) / S[..., 0].pow(2))
    assert torch.allclose(stable_rank(J), exact, rtol=1e-9, atol=0)
    assert torch.allclose(top.stable_rank, exact, rtol=1e-9, atol=0)
    assert r >= 3 * A.TOPK_FRACTION  # the cheap path was taken


def test_top_eigh_falls_back_to_eigh_when_not_converged():
    g = torch.Generator().manual_seed(2)
    Q = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64)).Q
    ev = torch.linspace(1.0, 0.999, 80, dtype=torch.float64)  # nearly flat: no convergence
    G = (Q * ev) @ Q.T
    lam, V = A.top_eigh(G, 2, max_iter=2)
    assert torch.allclose(lam, ev[:2], rtol=1e-12, atol=0)


def test_top_k_of_a_float32_map_works_in_float32_to_its_precision():
    g = torch.Generator().manual_seed(3)
    J = torch.randn(4, 96, 96, generator=g, dtype=torch.float64)
    J = J * (0.9 ** torch.arange(96, dtype=torch.float64))
    S = torch.linalg.svdvals(J)
    top = svd(J.float(), k=3)
    assert top.S.dtype == torch.float32
    assert torch.allclose(top.S.double(), S[..., :3], rtol=1e-5, atol=0)
    exact = S.pow(2).sum(-1) / S[..., 0].pow(2)
    assert torch.allclose(stable_rank(J.float()).double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_map_spectra_and_svds_match_the_full_svd(dtype, tol):
    """The sweeps' and corpus rows' shared-Gram summaries (‖J‖_F² from the Gram trace, s_max and
    the stacked top-k from the summed per-token Grams) against LAPACK's SVD of the same map."""
    lm = lin_lens.linear_map(tiny("llama", "hooked" if "hooked" in BACKENDS else "bridge", dtype),
                             TOKENS, "blocks.1.hook_resid_post", -1)
    k = 2
    assert A._shares_gram(lm.J, k)  # the path under test
    full = svd(lm)
    full_st = svd(lm, stacked=True)
    sr, st = A.map_spectra(lm, k)
    per, st2 = A.map_svds(lm, k)

    def close(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max()) <= tol

    assert close(sr, full.stable_rank) and close(per.stable_rank, full.stable_rank)
    for s in (st, st2):
        assert close(s.S, full_st.S[:k]) and close(s.stable_rank, full_st.stable_rank)
        for i in range(k):  # same singular vectors up to the shared sign convention
            assert close(s.U[:, i].abs(), full_st.U[:, i].abs())
    assert close(per.S, full.S[..., :k])
