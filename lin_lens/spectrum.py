"""SVD and stable rank of linear maps: per source token, or of the stacked operator.

Conventions (used everywhere in lin_lens):

* **per token**: the SVD of each ``J_i`` (``[d_out, d_in]``), batched over source tokens.
* **stacked**: the SVD of ``[J_0 | J_1 | … ]`` = ``rearrange(J, "s o i -> o (s i)")``, a
  ``[d_out, n_src·d_in]`` matrix whose product with the flattened input ``x`` is ``Σ_i J_i x_i``.
  Its right singular vectors live on all input tokens at once; ``Vh.reshape(k, n_src, d_in)``.
* **sign**: a singular pair (u, v) is only defined up to a joint sign. We orient every pair so
  that ``v·x ≥ 0`` (x = that token's input, or the flattened input when stacked); then
  ``u·(J x) = s (v·x) ≥ 0``: u is the direction the *actual* input pushes the output along.

Functions accept a :class:`lin_lens.LinearMap` (anything with ``J`` and ``x``) or a tensor.

**Cost.** Analyses must cost little next to the maps. The stable rank needs only ``‖J‖_F²`` and
``s_max``, and a top-k SVD only k eigenpairs of the smaller Gram matrix (``J Jᵀ`` or ``Jᵀ J``,
in float64 for float64 maps, float32 for the others): both come from a few block subspace
iterations with Rayleigh–Ritz on that Gram matrix, each Ritz pair checked by its residual
(``‖G v − λ v‖ ≤ tol·λ_max``, tol 1e-10 in float64 and 1e-5 in float32, so every kept ``s²`` is
within tol·s_max² of a true one), with an exact ``eigh`` as the fallback. Full spectra
(``k=None``) still go through LAPACK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor


def _is_map(obj: Any) -> bool:
    return hasattr(obj, "J4") and hasattr(obj, "x")


@dataclass
class SVD:
    """Top-k singular triplets of a (batch of) matrices, oriented by the sign convention above.

    ``U [..., d_out, k]``, ``S [..., k]``, ``Vh [..., k, d_in]``; ``spectrum [..., r]`` holds
    all singular values when they were computed (``k=None``), else ``None``; ``sum_sq [...]``
    is ``Σ s² = ‖J‖_F²``, which with ``S[..., 0]`` gives the stable rank at any k.
    """

    U: Float[Tensor, "*batch d_out k"]
    S: Float[Tensor, "*batch k"]
    Vh: Float[Tensor, "*batch k d_in"]
    spectrum: Float[Tensor, "*batch r"] | None
    stacked: bool = False
    sum_sq: Float[Tensor, "*batch"] | None = None

    @property
    def stable_rank(self) -> Float[Tensor, "*batch"]:
        if self.sum_sq is None:
            return stable_rank(self.spectrum, singular_values=True)
        return _ratio(self.sum_sq, self.S[..., 0].to(self.sum_sq.dtype).pow(2)).to(self.S.dtype)

    def reconstruct(self) -> Float[Tensor, "*batch d_out d_in"]:
        """``U diag(S) Vh`` (the matrix itself when k is the full rank)."""
        return (self.U * self.S[..., None, :]) @ self.Vh


def _orient(U: Tensor, Vh: Tensor, x: Tensor | None) -> tuple[Tensor, Tensor]:
    if x is not None:
        ref = torch.einsum("...ki,...i->...k", Vh, x.to(Vh.dtype))
    else:  # no input: make each v's largest-magnitude entry positive
        idx = Vh.abs().argmax(-1, keepdim=True)
        ref = Vh.gather(-1, idx)[..., 0]
    sign = torch.where(ref < 0, -1.0, 1.0).to(U.dtype)
    return U * sign[..., None, :], Vh * sign[..., :, None]


def stacked_operator(J: Float[Tensor, "... src d_out d_in"]) -> Float[Tensor, "... d_out sd"]:
    """``[J_0 | J_1 | …]``: ``[..., d_out, n_src·d_in]`` (source-major columns)."""
    return einops.rearrange(J, "... s o i -> ... o (s i)")


def svd(lm: Any, k: int | None = None, *, stacked: bool = False,
        x: Float[Tensor, "*src d_in"] | None = None) -> SVD:
    """SVD of a linear map's per-token operators (``[n_src, …]`` batch) or of the stacked one.

    Args:
        lm: a :class:`LinearMap` (int position, or a multi-target map: target axis kept as a
            batch axis) or a tensor ``[..., d_out, d_in]`` (``[..., src, d_out, d_in]`` with
            ``stacked=True``).
        k: number of triplets to keep (default all).
        stacked: SVD of ``[d_out, n_src·d_in]`` instead of one per source token.
        x: input used for the sign convention (taken from the map by default).
    """
    if _is_map(lm):
        J, x = lm.J, lm.x if x is None else x
    else:
        J = lm
    if stacked:
        J = stacked_operator(J)
        x = None if x is None else x.reshape(-1)
    m, n = J.shape[-2], J.shape[-1]
    if k is not None and 0 < k and k * TOPK_FRACTION <= min(m, n):
        gram = _gram(J)
        U, S, Vh = _topk_svd(J, k, gram)
        U, Vh = _orient(U, Vh, x)
        return SVD(U, S, Vh, None, stacked, sum_sq=_trace(gram[0]))
    if max(m, n) >= GRAM_RATIO * min(m, n) and J.numel() >= GRAM_MIN_NUMEL:
        U, S, Vh = _gram_svd(J, k)
    else:
        U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    U, Vh = _orient(U, Vh, x)
    k = S.shape[-1] if k is None else min(k, S.shape[-1])
    return SVD(U[..., :k], S[..., :k], Vh[..., :k, :], S, stacked)


# Tall or wide, large matrices (maps at "logits": d_out = vocab) go through the float64 Gram
# matrix of their smaller side: ~5x faster than LAPACK's SVD there; singular values accurate to
# ~1e-16·s_max²/s.
GRAM_RATIO, GRAM_MIN_NUMEL = 4, 20_000_000
# top-k by subspace iteration when k ≤ min(m, n) / TOPK_FRACTION (else the full eigh is as cheap)
TOPK_FRACTION = 8
# residual tolerance of the kept Ritz pairs, relative to λ_max, per working precision
TOPK_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
TOPK_MAX_ITER = 200


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


def _work(J: Tensor) -> Tensor:
    """J in the precision the cheap spectra work in: float64 maps in float64, others in float32
    (a float32 map is exact to ~1e-6; its Gram matrix in float32 moves s² by ~1e-7·s_max²)."""
    return J.double() if J.dtype == torch.float64 else J.float()


def _gram(J: Tensor) -> tuple[Tensor, bool]:
    """The Gram matrix of J's smaller side (in :func:`_work` precision), and whether it is
    ``J Jᵀ`` (wide J)."""
    A = _work(J)
    wide = J.shape[-2] <= J.shape[-1]
    return (A @ A.mT if wide else A.mT @ A), wide


def top_eigh(G: Float[Tensor, "... r r"], k: int, *, tol: float | None = None,
             max_iter: int = TOPK_MAX_ITER) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs ``(λ [..., k] descending, V [..., r, k])`` of symmetric PSD matrices.

    Block subspace iteration (block k + 8), four products with G per orthonormalisation (each
    step gains four powers of the eigenvalue ratio), Rayleigh–Ritz on ``G`` itself, stopped
    when every kept pair's residual ``‖G v − λ v‖ ≤ tol · λ_max`` (default 1e-10 in float64,
    1e-5 in float32); matrices not converged after ``max_iter`` steps (flat spectra) get an
    exact ``eigh``."""
    tol = TOPK_TOL.get(G.dtype, 1e-5) if tol is None else tol
    tiny = torch.finfo(G.dtype).tiny
    r = G.shape[-1]
    b = min(r, k + 8)
    if 2 * b >= r:
        return _eigh_top(G, k)
    # G/trace(G) keeps four powers in range; applied to the thin X, not copied as a matrix
    inv_tr = 1 / G.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(tiny)[..., None, None]
    gen = torch.Generator(device=G.device).manual_seed(0)
    X = torch.randn(*G.shape[:-1], b, generator=gen, dtype=G.dtype, device=G.device)
    X = torch.linalg.qr(X).Q
    for _ in range(max_iter):
        for _ in range(4):  # r²·b each, not a matrix power (r³)
            X = (G @ X) * inv_tr
        X = torch.linalg.qr(X).Q
        GX = G @ X
        ev, W = torch.linalg.eigh(X.mT @ GX)  # Rayleigh–Ritz on G, ascending
        ev, W = ev.flip(-1), W.flip(-1)
        X, GX = X @ W, GX @ W
        res = (GX[..., :k] - X[..., :k] * ev[..., None, :k]).norm(dim=-2)
        if bool((res <= tol * ev[..., :1].abs().clamp_min(tiny)).all()):
            return ev[..., :k].clamp_min(0), X[..., :k]
    return _eigh_top(G, k)


def _eigh_top(G: Tensor, k: int) -> tuple[Tensor, Tensor]:
    ev, V = torch.linalg.eigh(G)
    return ev.flip(-1)[..., :k].clamp_min(0), V.flip(-1)[..., :k]


def _topk_svd(J: Tensor, k: int, gram: tuple[Tensor, bool] | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    G, wide = _gram(J) if gram is None else gram
    ev, W = top_eigh(G, k)
    S = ev.sqrt()
    inv = torch.where(S > 0, 1 / S.clamp_min(torch.finfo(S.dtype).tiny), 0.0)[..., None, :]
    A = _work(J)
    if wide:  # W holds left singular vectors; v = Jᵀ u / s
        U, V = W, (A.mT @ W) * inv
    else:
        U, V = (A @ W) * inv, W
    return U.to(J.dtype), S.to(J.dtype), V.mT.to(J.dtype)


def _gram_svd(J: Tensor, k: int | None) -> tuple[Tensor, Tensor, Tensor]:
    if J.shape[-2] < J.shape[-1]:  # wide: the SVD of Jᵀ, transposed back
        V, S, Uh = _gram_svd(J.mT, k)
        return Uh.mT, S, V.mT
    G = J.transpose(-1, -2).double() @ J.double()
    ev, V = torch.linalg.eigh(G)  # ascending
    S = ev.flip(-1).clamp_min(0).sqrt()
    V = V.flip(-1)
    kk = S.shape[-1] if k is None else min(k, S.shape[-1])
    Vk = V[..., :kk]
    Sk = S[..., :kk]
    # U = J V / S for the kept triplets (zero where s = 0)
    U = (J.double() @ Vk) / torch.where(Sk > 0, Sk, 1.0)[..., None, :]
    return U.to(J.dtype), S.to(J.dtype), Vk.transpose(-1, -2).to(J.dtype)


def stable_rank(obj: Any, *, stacked: bool = False,
                singular_values: bool = False) -> Float[Tensor, "*shape"]:
    """Stable rank ``Σ s² / s_max²`` (between 1 and the rank; 0 for a zero matrix).

    A :class:`LinearMap` gives one value per source token (``[n_src]``), or one for the stacked
    operator; a tensor ``[..., m, n]`` one per matrix; with ``singular_values=True`` the tensor is
    taken as singular values ``[..., r]``.
    """
    if isinstance(obj, SVD):
        return obj.stable_rank
    if not singular_values:  # ‖J‖_F² / s_max², s_max from the Gram matrix: no SVD
        J = obj.J if _is_map(obj) else obj
        J = stacked_operator(J) if stacked else J
        return _gram_stable_rank(_gram(J)[0]).to(J.dtype)
    s = obj
    s2 = s.pow(2)
    top = s2.amax(-1)
    return torch.where(top > 0, s2.sum(-1) / top.clamp_min(torch.finfo(s.dtype).tiny), 0.0)


def _shares_gram(J: Tensor, k: int) -> bool:
    """Whether the stacked ``J Jᵀ`` is the sum of the per-token ones (``d_out ≤ d_in``) and k is
    small enough for the top-k path."""
    return J.shape[-2] <= J.shape[-1] and k * TOPK_FRACTION <= J.shape[-2]


def _trace(G: Tensor) -> Tensor:
    """``‖J‖_F²`` from the Gram matrix ``J Jᵀ``: its trace (summed in float64), no second pass
    over J."""
    return G.diagonal(dim1=-2, dim2=-1).sum(-1, dtype=torch.float64)


def _gram_stable_rank(G: Tensor, sum_sq: Tensor | None = None) -> Tensor:
    """``‖J‖_F² / s_max²`` (float64) from J's Gram matrix: its trace (``sum_sq`` when the caller
    has it) over its top eigenvalue."""
    sum_sq = _trace(G) if sum_sq is None else sum_sq
    return _ratio(sum_sq, top_eigh(G, 1)[0][..., 0].to(sum_sq.dtype))


def _stacked_topk(lm: Any, G: Tensor, k: int, sum_sq: Tensor) -> SVD:
    """The stacked operator's top-k :class:`SVD` from the per-token Gram matrices ``G`` and their
    traces ``sum_sq [n_src]``."""
    Js = stacked_operator(lm.J)
    U, S, Vh = _topk_svd(Js, k, gram=(G.sum(0), True))
    U, Vh = _orient(U, Vh, lm.x.reshape(-1))
    return SVD(U, S, Vh, None, True, sum_sq=sum_sq.sum())


def map_svds(lm: Any, k: int) -> tuple[SVD, SVD]:
    """Per-token and stacked top-k :class:`SVD` s of a single-target map from one set of Gram
    matrices (when ``d_out ≤ d_in``, the stacked ``J Jᵀ`` is the sum of the per-token ones)."""
    J = lm.J
    if not _shares_gram(J, k):
        return svd(lm, k), svd(lm, k, stacked=True)
    G, _ = _gram(J)  # [n_src, d_out, d_out]
    U, S, Vh = _topk_svd(J, k, gram=(G, True))
    U, Vh = _orient(U, Vh, lm.x)
    sum_sq = _trace(G)
    return SVD(U, S, Vh, None, False, sum_sq=sum_sq), _stacked_topk(lm, G, k, sum_sq)


def map_spectra(lm: Any, k: int) -> tuple[Tensor, SVD]:
    """Per-token stable ranks ``[n_src]`` and the stacked operator's top-k :class:`SVD` of a
    single-target map, sharing one set of Gram matrices: the cheap summary sweeps take for
    every map."""
    J = lm.J
    if not _shares_gram(J, k):
        return stable_rank(lm), svd(lm, k, stacked=True)
    G, _ = _gram(J)  # [n_src, d_out, d_out]
    sum_sq = _trace(G)
    return _gram_stable_rank(G, sum_sq).to(J.dtype), _stacked_topk(lm, G, k, sum_sq)
