"""Matrix-free top-k singular triplets of an operator at one position: (block)
Golub–Kahan–Lanczos with full reorthogonalisation, using only VJPs (backward passes over the
retained detached graph) and JVPs (backward passes through the graph of the VJP ``Jᵀu``, which is
linear in ``u``). ``J`` is never formed. Each triplet comes with its residual ``‖Jᵀu − σv‖`` (a
singular value lies within it of σ; ``Jv = σu`` holds by construction) and the quadratic estimate
residual²/gap used to stop.
"""

from __future__ import annotations

import contextlib
import html
import math
import time
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lin_lens._html import table
from lin_lens._tl import LOGITS, model_device, model_dtype
from lin_lens.errors import InvalidArgumentError, UnsupportedFeatureError
from lin_lens.maps import budget
from lin_lens.maps.graph import batched_grad, detached_forward
from lin_lens.maps.readout import Readout
from lin_lens.maps.request import MapRequest
from lin_lens.progress import progress_bar

# Guard Ritz values beyond the k wanted must reach this relative error estimate too: a Krylov
# space can converge k values while a close singular value above σ_k has not emerged yet (seen
# on SmolLM2 in float64 at 256 tokens, with a 2 % gap); the guard values make that unlikely.
GUARD_TOL = 1e-2


class TopSingular:
    """``U`` [d_out, k], ``S`` [k], ``V`` [n_src, d_in, k] (``V[..., j]`` reshaped to the source
    activation) and ``info``; unpacks as ``U, S, V``.

    ``info``: ``residuals`` ‖Jᵀu_j − σ_j v_j‖ (a true singular value lies within it of σ_j;
    ``Jv_j = σ_j u_j`` holds exactly), ``rel_residuals`` (residual / σ_j), ``bound_quadratic``
    (residual² / gap to the nearest other Ritz value, the usual sharper estimate) and
    ``rel_error_estimate`` (that over σ_j, what ``tol`` bounds), ``n_jvp``, ``n_vjp``,
    ``iterations``, ``converged``, ``block``, ``guard``, ``history`` (per iteration), ``seconds``.
    """

    def __init__(self, U: Float[Tensor, "d_out k"], S: Float[Tensor, " k"],
                 V: Float[Tensor, "n_src d_in k"], info: dict[str, Any]):
        self.U, self.S, self.V, self.info = U, S, V, info

    def __iter__(self):
        return iter((self.U, self.S, self.V))

    def _repr_html_(self) -> str:
        i = self.info
        rows = [(j + 1, f"{float(s):.6g}", f"{r:.1e}", f"{e:.1e}")
                for j, (s, r, e) in enumerate(zip(self.S, i["rel_residuals"],
                                                  i.get("rel_error_estimate", i["rel_residuals"]),
                                                  strict=True))]
        return (f"<b>top {len(self.S)} singular triplets</b> of the detached operator at "
                f"<code>{html.escape(str(i.get('hook')))}</code>, position {i.get('position')}: "
                f"{i['n_jvp']} JVPs + {i['n_vjp']} VJPs, converged {i['converged']}, "
                f"{i.get('seconds', float('nan')):.1f} s"
                + table(rows, ["j", "σ", "residual / σ", "σ error estimate / σ"]))

    def __repr__(self) -> str:
        return (f"TopSingular(k={len(self.S)}, σ₁={float(self.S[0]):.4g}, "
                f"max rel residual {max(self.info['rel_residuals']):.2e}, "
                f"{self.info['n_jvp']} JVPs + {self.info['n_vjp']} VJPs)")


class _Columns:
    """A growing block of columns in one preallocated buffer: appending copies only the new
    columns, and ``.mat`` is a view (no ``torch.cat`` of the whole Krylov basis per step, which
    costs O(N·m) memory traffic each time at N = n·d_in). Stored one column per buffer row, so
    the capacity not yet used is never touched (never resident)."""

    def __init__(self, rows: int, cap: int, like: Tensor):
        self.buf = like.new_empty(cap, rows)
        self.width = 0

    def add(self, Q: Tensor) -> None:
        if self.width + Q.shape[1] > self.buf.shape[0]:  # rare: grow geometrically
            new = self.buf.new_empty(2 * self.buf.shape[0] + Q.shape[1], self.buf.shape[1])
            new[:self.width] = self.buf[:self.width]
            self.buf = new
        self.buf[self.width:self.width + Q.shape[1]] = Q.T
        self.width += Q.shape[1]

    @property
    def mat(self) -> Tensor:
        return self.buf[:self.width].T


def _orth(W: Tensor, basis: Tensor | None) -> Tensor:
    """Orthonormal basis of the part of ``W`` orthogonal to the orthonormal columns of
    ``basis``; columns that were (numerically) already in their span are dropped, so the result
    may be narrower. Block classical Gram–Schmidt, twice (one matrix product per pass)."""
    scale = float(torch.linalg.vector_norm(W, dim=0).max()) if W.numel() else 0.0
    if scale == 0.0:
        return W[:, :0]
    B = basis if basis is not None and basis.shape[1] else None
    if B is not None:
        for _ in range(2):
            W = W - B @ (B.T @ W)
    Q, R = torch.linalg.qr(W)
    keep = R.diagonal().abs() > 1e3 * torch.finfo(W.dtype).eps * scale
    Q = Q[:, keep]
    if B is not None:  # once more after dropping, for orthogonality to working precision
        Q = Q - B @ (B.T @ Q)
    return torch.linalg.qr(Q)[0] if Q.shape[1] else Q


def top_singular(model: Any, req: MapRequest, k: int = 16, *, block: int | None = None,
                 tol: float = 1e-4, vec_tol: float | None = None, guard: int | None = None,
                 max_iter: int | None = None, seed: int = 0) -> TopSingular:
    """Top-``k`` singular triplets of the detached operator at ``req.hook`` / its one position
    (all source tokens stacked: ``J`` is ``[d_out, n_src·d_in]``) without forming ``J``.

    Block Golub–Kahan–Lanczos with full reorthogonalisation; each iteration costs ``block``
    JVPs and ``block`` VJPs. The default is single-vector Lanczos (``block=1``, the fewest
    products) from 32 tokens on, and ``min(k, 8)`` below, where batched products are several
    times cheaper per vector (BENCHMARKS.md). Pass ``block ≥`` the multiplicity when singular
    values may repeat exactly. Both products come from one retained detached graph: VJPs are
    batched backward passes, and JVPs are batched backward passes through the graph of the
    (linear) VJP itself — the double-backward trick, so no forward replay, no Q/K/gate or
    attention-score work, and every architecture (Bridges included) is supported.

    Stops when, for each of the top ``k``, the quadratic error estimate
    ``‖Jᵀu − σv‖² / gap ≤ tol·σ`` (σ within ``tol`` relative; ``Jv = σu`` holds exactly) and
    the residual ``‖Jᵀu − σv‖ ≤ vec_tol·σ`` (default ``√tol``; bounds the singular vectors'
    error angle by about ``vec_tol·σ / gap``), or after ``max_iter`` iterations (default:
    a Krylov space of 6k + 32 vectors). ``info["history"]`` has both quantities per iteration.
    ``guard`` (default ``max(2, k // 4)``) further Ritz values must reach a 1e-2 estimate
    first: without them a close singular value above σ_k can still be missing when the k
    found have converged (a Krylov method cannot rule that out; the guard makes it unlikely).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgumentError(f"k must be a positive int, got {k!r}")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise InvalidArgumentError(f"block must be a positive int or None, got {block!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise InvalidArgumentError(f"tol must be a positive finite number, got {tol!r}")
    if model_dtype(model) not in (torch.float32, torch.float64):
        raise UnsupportedFeatureError(
            f"top_singular runs its Lanczos algebra (QR, SVD) in the model's dtype, which must be "
            f"float32 or float64, not {model_dtype(model)}; convert the model (model.float())")
    tokens, n = req.tokens, req.n
    block = int(block or (1 if n >= 32 else min(k, 8)))
    guard = max(2, k // 4) if guard is None else int(guard)
    vec_tol = math.sqrt(tol) if vec_tol is None else vec_tol
    p = req.positions[0]
    t0 = time.perf_counter()
    dtype = model_dtype(model)
    m_max = max_iter or math.ceil((6 * k + 32) / block)
    d_model = int(model.cfg.d_model)
    vec_bytes = (p + 1) * d_model * budget.itemsize(dtype)  # one vector in the source space
    need = budget.graph_bytes(model, n, dtype) + vec_bytes * block * (4 + 2 * m_max)
    budget.check(need, f"matrix-free SVD at {n} tokens", req.max_memory,
                 hint="Use fewer tokens, a smaller k/max_iter, or raise max_memory.",
                 device=model_device(model))
    hk = req.canonical_hook(model)
    with contextlib.ExitStack() as stack:
        fwd = detached_forward(stack, model, tokens, req.source, [req.hook])
        stack.enter_context(torch.enable_grad())
        x = fwd.x
        y = fwd.acts[hk].reshape(1, n, -1)[0, p]
        if hk == LOGITS:  # the readout is linear given the frozen soft-cap gate
            y = Readout.at(model, y[None]).logits(y[None])[0]
        d_in = x[0, 0].numel()
        N = (p + 1) * d_in
        d_space = y.shape[-1]
        if k > min(d_space, N):
            raise InvalidArgumentError(
                f"k={k} exceeds the operator's rank bound min(d_out, n_src·d_in) = "
                f"{min(d_space, N)} at position {p}")
        # Jᵀu as a differentiable function of a dummy u: linear in u, so its VJP is J.
        u0 = torch.zeros_like(y, requires_grad=True)
        JTu, = torch.autograd.grad(y, x, u0, create_graph=True)

        chunk = budget.preferred_chunk(n)

        def vjp(Ub: Tensor) -> Tensor:  # [d_out, b] → [N, b]
            gx = batched_grad(y, x, Ub.T.contiguous(), chunk=chunk)
            return gx.reshape(Ub.shape[1], n * d_in)[:, :N].T

        def jvp(Vb: Tensor) -> Tensor:  # [N, b] → [d_out, b]
            T = Vb.new_zeros(Vb.shape[1], n * d_in)
            T[:, :N] = Vb.T
            return batched_grad(JTu, u0, T.view(-1, *x.shape), chunk=chunk).T

        res_k = _block_lanczos(jvp, vjp, N, d_space, k, block, tol, vec_tol, m_max, seed,
                               dtype, req.progress, guard, device=x.device)
    U, S_k, right, info = res_k
    if len(S_k) < k:
        raise InvalidArgumentError(
            f"only {len(S_k)} of the k={k} singular values are resolvable in {dtype} (the rest "
            "are below 1e3·eps·σ₁ or the operator is zero there); ask for fewer")
    Vfull = torch.zeros(n * d_in, right.shape[1], dtype=dtype, device=right.device)
    Vfull[:N] = right
    info.update(block=block, tol=tol, vec_tol=vec_tol, guard=guard,
                seconds=time.perf_counter() - t0, hook=req.hook, position=p)
    return TopSingular(U, S_k, Vfull.reshape(n, *x.shape[2:], right.shape[1]), info)


def _ritz_errors(S: Tensor, res: Tensor) -> Tensor:
    """Quadratic error estimates ``res² / gap`` for the leading Ritz values ``S[:len(res)]``;
    the gap is to the nearest other Ritz value (to 0 for the last one)."""
    kk = len(res)
    Sx = torch.cat([S.new_tensor([float("inf")]), S, S.new_zeros(1)])
    gap = torch.minimum(Sx[:kk] - Sx[1:kk + 1], Sx[1:kk + 1] - Sx[2:kk + 2])
    return res**2 / gap.clamp_min(torch.finfo(S.dtype).tiny)


def _block_lanczos(jvp, vjp, N: int, d_space: int, k: int, block: int, tol: float,
                   vec_tol: float, m_max: int, seed: int, dtype: torch.dtype,
                   progress: bool | None, guard: int = 0, device: Any = "cpu"
                   ) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
    """Block Golub–Kahan–Lanczos for ``J`` given as ``jvp``/``vjp`` on blocks of columns:
    ``(U [d_out, k], S [k], V [N, k], info)``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # the start vector from a CPU generator (the same on every device), then on the model's
    Vj = torch.linalg.qr(torch.randn(N, block, generator=gen, dtype=dtype))[0].to(device)
    cap = m_max * block + block
    Vs, JTUs = _Columns(N, cap, Vj), _Columns(N, cap, Vj)
    Us, JVs = _Columns(d_space, cap, Vj), _Columns(d_space, cap, Vj)
    history: list[dict[str, float]] = []
    n_jvp = n_vjp = it = 0
    converged = complete = exhausted = False
    bar = progress_bar(m_max, f"matrix-free top-{k}", progress, unit="it")
    try:
        for it in range(m_max):  # noqa: B007 (reported in info)
            rem = d_space - Us.width
            Vj = Vj[:, :rem]
            if Vj.shape[1] == 0:
                exhausted = True
                break
            W = jvp(Vj)
            n_jvp += Vj.shape[1]
            Vs.add(Vj)
            JVs.add(W)
            Uj = _orth(W, Us.mat)
            if Uj.shape[1]:
                Z = vjp(Uj)
                n_vjp += Uj.shape[1]
                Us.add(Uj)
                JTUs.add(Z)
            if not Us.width:
                raise InvalidArgumentError(
                    "the operator is zero or not finite here (J·v has no usable direction for "
                    "a random v): no singular values to find")
            Ucat, Vcat = Us.mat, Vs.mat
            complete = Ucat.shape[1] >= d_space
            exhausted = not Uj.shape[1]  # J·V_j ⊆ span(U): U holds the range J reaches
            if complete or exhausted:  # Uᵀ J (from the VJPs) is J restricted to span(U)
                P, S, Qh = torch.linalg.svd(JTUs.mat.T, full_matrices=False)
                kk = min(k, len(S))
                right = Qh[:kk].T
                res = torch.linalg.vector_norm(jvp(right) - Ucat @ P[:, :kk] * S[:kk], dim=0)
                n_jvp += kk
                converged = complete or bool((res <= tol * S[:kk]).all())
                bar.update(1)
                break
            P, S, Qh = torch.linalg.svd(Ucat.T @ JVs.mat, full_matrices=False)
            kk, kg = min(k, len(S)), min(k + guard, len(S))
            right = Vcat @ Qh[:kg].T
            res = torch.linalg.vector_norm(JTUs.mat @ P[:, :kg] - right * S[:kg], dim=0)
            quad = _ritz_errors(S, res)
            ok = (quad <= tol * S[:kg]) & (res <= vec_tol * S[:kg])
            ok_guard = (quad <= GUARD_TOL * S[:kg]) & (res <= math.sqrt(GUARD_TOL) * S[:kg])
            right, res, quad = right[:, :kk], res[:kk], quad[:kk]
            history.append({"max_rel_error_estimate": float((quad / S[:kk]).max()),
                            "max_rel_residual": float((res / S[:kk]).max()),
                            "n_jvp": n_jvp, "n_vjp": n_vjp, "sigma": S[:kk].tolist()})
            bar.update(1)
            if kk == k and kg == k + guard and bool(ok[:k].all() & ok_guard[k:].all()):
                converged = True
                break
            Vj = _orth(Z, Vcat)
    finally:
        bar.close()
    S_k = S[:kk]
    quad = _ritz_errors(S, res)
    info = dict(residuals=res.tolist(), rel_residuals=(res / S_k).tolist(),
                bound_quadratic=quad.tolist(), rel_error_estimate=(quad / S_k).tolist(),
                n_jvp=n_jvp, n_vjp=n_vjp, iterations=it + 1, converged=converged,
                output_space_complete=complete, krylov_exhausted=exhausted, history=history)
    return Ucat @ P[:, :kk], S_k, right, info
