"""The top singular triplet of every source token's operator ``J_i``, without forming ``J``: the
paper's long-context spectrum (its JAX code ran one Lanczos solve per token) with the passes
shared across tokens.

One VJP with a covector ``u`` gives ``uᵀJ_j`` for *every* token ``j`` at once, and one JVP of a
tangent placed at token ``i`` gives ``J_i v`` for that token; a batch of ``n`` tangents (one per
token) gives all of them in one pass. So every token runs its own Golub–Kahan–Lanczos
bidiagonalisation (full reorthogonalisation) in lockstep with the others:

1. **start**: ``m`` random covectors ``Ω`` give ``ΩᵀJ_i`` for every token (``m`` VJPs); the top
   right singular vector of that ``m × d_in`` block is token ``i``'s start vector;
2. **each step**: ``J_i v_i`` for all tokens (one batch of ``n`` JVPs), then ``J_iᵀ u_i`` (one
   batch of ``n`` VJPs, each token keeping its own block); the top singular triplet of each
   token's small bidiagonal matrix is its Ritz triplet;
3. it stops when every token's **residual** ``‖J_iᵀu_i − σ_i v_i‖ / σ_i`` (``J_i v_i = σ_i u_i``
   holds by construction) is below ``tol``, or after ``max_steps``; a singular value of ``J_i``
   lies within the residual of ``σ_i``.

JVPs are backward passes through the graph of ``Jᵀu`` (linear in ``u``: the double-backward
trick), so this works on every backend. Cost: ``m + steps·n`` VJPs and ``steps·n`` JVPs, against
``d_out`` VJPs for the dense ``J`` — fewer when the operators' top singular values stand apart
(trained models), not when they crowd together (random weights).
"""

from __future__ import annotations

import contextlib
import html
import time
from typing import Any

import torch
from torch import Tensor

from lin_lens._html import table
from lin_lens._tl import LOGITS
from lin_lens.errors import InvalidArgumentError
from lin_lens.maps import budget
from lin_lens.maps.graph import batched_grad, detached_forward
from lin_lens.maps.request import MapRequest
from lin_lens.progress import progress_bar


class PerTokenTop:
    """``S`` [n_src], ``U`` [n_src, d_out], ``V`` [n_src, d_in]: each source token's top singular
    triplet (``J_i v_i = S_i u_i``), and ``info`` (``residuals`` per token, ``rounds``,
    ``sketch``, ``n_vjp``, ``n_jvp``, ``seconds``)."""

    def __init__(self, S: Tensor, U: Tensor, V: Tensor, info: dict[str, Any]):
        self.S, self.U, self.V, self.info = S, U, V, info

    def __iter__(self):
        return iter((self.U, self.S, self.V))

    def __repr__(self) -> str:
        r = self.info["residuals"]
        return (f"PerTokenTop({len(self.S)} tokens, max σ₁ {float(self.S.max()):.4g}, max "
                f"residual/σ {float(r.max()):.1e}, {self.info['n_vjp']} VJPs + "
                f"{self.info['n_jvp']} JVPs)")

    def _repr_html_(self) -> str:
        rows = [(i, f"{float(s):.6g}", f"{float(r):.1e}")
                for i, (s, r) in enumerate(zip(self.S, self.info["residuals"], strict=True))]
        return (f"<b>top singular triplet per source token</b> at "
                f"<code>{html.escape(str(self.info.get('hook')))}</code>"
                + table(rows, ["token", "σ₁", "residual / σ₁"]))


def per_token_top(model: Any, req: MapRequest, *, sketch: int = 32, max_steps: int = 8,
                  tol: float = 1e-3, seed: int = 0) -> PerTokenTop:
    """See the module docstring; ``req`` holds one target position."""
    if req.hook == LOGITS:
        raise InvalidArgumentError("per-token top singular triplets are for a hook's "
                                   "activation (e.g. ln_final.hook_normalized), not 'logits'")
    if sketch < 1 or max_steps < 1 or not tol > 0:
        raise InvalidArgumentError(f"sketch={sketch} and max_steps={max_steps} must be ≥ 1 and "
                                   f"tol={tol} > 0")
    t0 = time.perf_counter()
    p = req.positions[0]
    n = p + 1  # later tokens do not reach position p
    with contextlib.ExitStack() as stack:
        fwd = detached_forward(stack, model, req.tokens, req.source, [req.hook])
        stack.enter_context(torch.enable_grad())
        x = fwd.x
        y = fwd.acts[req.canonical_hook(model)].reshape(1, x.shape[1], -1)[0, p]
        d_out, d_in = y.numel(), x[0, 0].numel()
        budget.check(budget.graph_bytes(model, x.shape[1], x.dtype) * 3
                     + (2 * max_steps + 4) * n * (d_out + d_in) * x.element_size(),
                     f"per-token top triplets at {x.shape[1]} tokens", req.max_memory,
                     device=x.device)
        u0 = torch.zeros_like(y, requires_grad=True)
        (JTu,) = torch.autograd.grad(y, x, u0, create_graph=True)  # linear in u0
        chunk = req.chunk_size or budget.preferred_chunk(x.shape[1])
        bar = progress_bar(sketch + 2 * max_steps * n, "per-token top triplets", req.progress,
                           unit="pass")
        counts = {"vjp": 0, "jvp": 0}
        ar = torch.arange(n, device=x.device)
        try:
            def vjp(C: Tensor, own: bool) -> Tensor:  # [B, d_out] → [B, n, d_in] / own block
                g = batched_grad(y, x, C, chunk=chunk).reshape(len(C), -1, d_in)[:, :n]
                counts["vjp"] += len(C)
                bar.update(len(C))
                return g[ar, ar] if own else g

            def jvp(V: Tensor) -> Tensor:  # [n, d_in], token i's at i → [n, d_out]
                T = V.new_zeros(n, *x.shape)
                T[ar, 0, ar] = V.reshape(n, *x.shape[2:])
                counts["jvp"] += n
                bar.update(n)
                return batched_grad(JTu, u0, T, chunk=chunk).reshape(n, d_out)

            g = torch.Generator().manual_seed(seed)
            omega = torch.randn(sketch, d_out, generator=g, dtype=torch.float64).to(y)
            start = torch.linalg.svd(vjp(omega, False).transpose(0, 1),
                                     full_matrices=False).Vh[:, 0]  # [n, d_in]
            res = _lanczos(jvp, lambda U: vjp(U, True), start, max_steps, tol)
        finally:
            bar.close()
    S, U, V, residual, steps = res
    info = {"residuals": residual.detach(), "steps": steps, "sketch": sketch, "tol": tol,
            "converged": bool((residual <= tol).all()), "n_vjp": counts["vjp"],
            "n_jvp": counts["jvp"], "seconds": time.perf_counter() - t0, "hook": req.hook,
            "position": p}
    return PerTokenTop(S.detach(), U.detach(), V.detach(), info)


def _lanczos(jvp, vjp, v1: Tensor, max_steps: int, tol: float):
    """Batched Golub–Kahan–Lanczos (one bidiagonalisation per row of ``v1`` [n, d_in]); returns
    ``(S [n], U [n, d_out], V [n, d_in], residual/σ [n], steps)``."""
    tiny = torch.finfo(v1.dtype).tiny
    Vs = [v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp_min(tiny)]
    Us: list[Tensor] = []
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    for step in range(1, max_steps + 1):
        w = jvp(Vs[-1])
        if Us:
            w = w - betas[-1][:, None] * Us[-1]
        w = _reorth(w, Us)
        a = torch.linalg.vector_norm(w, dim=-1)
        Us.append(w / a.clamp_min(tiny)[:, None])
        alphas.append(a)
        z = vjp(Us[-1]) - a[:, None] * Vs[-1]
        z = _reorth(z, Vs)
        b = torch.linalg.vector_norm(z, dim=-1)
        betas.append(b)
        Vs.append(z / b.clamp_min(tiny)[:, None])
        B = torch.diag_embed(torch.stack(alphas, -1))
        if step > 1:
            B = B + torch.diag_embed(torch.stack(betas[:-1], -1), offset=1)
        P, sig, Qh = torch.linalg.svd(B)
        S = sig[:, 0]
        residual = b * P[:, -1, 0].abs() / S.clamp_min(tiny)
        if bool((residual <= tol).all()):
            break
    U = torch.einsum("knd,nk->nd", torch.stack(Us), P[:, :, 0])
    V = torch.einsum("knd,nk->nd", torch.stack(Vs[:-1]), Qh[:, 0, :])
    return S, U, V, residual, step


def _reorth(w: Tensor, basis: list[Tensor]) -> Tensor:
    """``w`` [n, d] minus its projection on each row's basis (twice: full reorthogonalisation)."""
    if not basis:
        return w
    Q = torch.stack(basis, 1)  # [n, k, d]
    for _ in range(2):
        w = w - torch.einsum("nkd,nk->nd", Q, torch.einsum("nkd,nd->nk", Q, w))
    return w
