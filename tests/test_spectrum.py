"""SVD and stable rank of a linear map (tiny float64 models)."""

from __future__ import annotations

import pytest
import torch

import lin_lens
import lin_lens.spectrum as A
from lin_lens.spectrum import stable_rank, stacked_operator, svd
from tests.conftest import tiny

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
    assert top.S.shape == (5, 2) and torch.equal(top.S, full.S[:, :2])
    assert torch.allclose(top.stable_rank, full.stable_rank)


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
