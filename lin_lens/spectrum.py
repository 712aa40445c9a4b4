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
    all singular values (stable rank needs them even when k is small).
    """

    U: Tensor
    S: Tensor
    Vh: Tensor
    spectrum: Tensor
    stacked: bool = False

    @property
    def stable_rank(self) -> Tensor:
        return stable_rank(self.spectrum, singular_values=True)

    def reconstruct(self) -> Tensor:
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
        x: Tensor | None = None) -> SVD:
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
    if m >= GRAM_RATIO * n and J.numel() >= GRAM_MIN_NUMEL:
        U, S, Vh = _gram_svd(J, k)
    else:
        U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    U, Vh = _orient(U, Vh, x)
    k = S.shape[-1] if k is None else min(k, S.shape[-1])
    return SVD(U[..., :k], S[..., :k], Vh[..., :k, :], S, stacked)


# Tall, large matrices (maps at "logits": d_out = vocab) go through the float64 Gram matrix:
# ~5x faster than LAPACK's SVD there; singular values accurate to ~1e-16·s_max²/s.
GRAM_RATIO, GRAM_MIN_NUMEL = 4, 20_000_000


def _gram_svd(J: Tensor, k: int | None) -> tuple[Tensor, Tensor, Tensor]:
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
                singular_values: bool = False) -> Tensor:
    """Stable rank ``Σ s² / s_max²`` (between 1 and the rank; 0 for a zero matrix).

    A :class:`LinearMap` gives one value per source token (``[n_src]``), or one for the stacked
    operator; a tensor ``[..., m, n]`` one per matrix; with ``singular_values=True`` the tensor is
    taken as singular values ``[..., r]``.
    """
    if isinstance(obj, SVD):
        return obj.stable_rank
    if _is_map(obj):
        J = stacked_operator(obj.J) if stacked else obj.J
        s = torch.linalg.svdvals(J)
    elif singular_values:
        s = obj
    else:
        s = torch.linalg.svdvals(stacked_operator(obj) if stacked else obj)
    s2 = s.pow(2)
    top = s2.amax(-1)
    return torch.where(top > 0, s2.sum(-1) / top.clamp_min(torch.finfo(s.dtype).tiny), 0.0)
