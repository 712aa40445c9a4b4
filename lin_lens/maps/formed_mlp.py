"""Gated MLPs as one matrix per token in reverse passes that carry many rows.

In detached mode a gated MLP is linear in its input for this input: with the gate
``a_t = act(x_t W_gate)`` frozen, ``out_t = ((x_t W_in) ⊙ a_t) W_out = x_t M_t`` with
``M_t = W_in diag(a_t) W_out`` (``d × d``). Pushing R rows through the factored MLP costs
``2·R·d·d_mlp`` multiply-adds per token; forming ``M_t`` once and applying it costs
``d²·d_mlp + R·d²``, less once ``R > d·d_mlp / (2·d_mlp − d)`` (:func:`pays`; 354 rows on
SmolLM2, whose whole residual-width operator has 576: a third less of the MLP's work). The
reverse engine then crosses the network one block at a time (:mod:`.by_layer`), so each layer's
``M_t`` are formed once for all the rows and dropped (:meth:`Formed.clear`) before the next
layer: ``n·d²`` values at a time, not ``n·L·d²``.

Forward values are untouched: a torch hook on each MLP module returns the module's own output,
with a gradient path through ``M_t`` to the module input in place of the MLP's graph (hooks
inside the MLP keep theirs). Each layer first checks that its output equals
``((x W_in) ⊙ act(gate)) W_out`` at rounding level; a layer that does not (another MLP formula)
or that has biases, and the layer of a source inside it, keep the ordinary path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from lin_lens._hooks import HookSet
from lin_lens._tl import (
    block_of,
    canonical,
    hook_dict,
    is_bridge,
    nonzero_bias,
    parent_module,
    wrapped_linear,
)


@dataclass
class _Site:
    """One gated MLP: its module, gate hook and the weights of ``x ↦ ((x W_in) ⊙ a) W_out``."""

    module: torch.nn.Module
    gate_hook: str
    W_in: Tensor  # [d, d_mlp]
    W_out: Tensor  # [d_mlp, d]
    act: Callable[[Tensor], Tensor]


def _site(model: Any, layer: int) -> _Site | None:
    prefix = f"blocks.{layer}.mlp"
    hd = hook_dict(model)
    if not all(f"{prefix}.{h}" in hd for h in ("hook_pre", "hook_pre_linear", "hook_post")):
        return None  # not a gated MLP
    module = model.get_submodule(prefix)
    gate = canonical(model, f"{prefix}.hook_pre")
    if not is_bridge(model):
        if getattr(model.cfg, "load_in_4bit", False) or any(
                nonzero_bias(module, b) is not None for b in ("b_in", "b_out")):
            return None
        W_in, W_out = getattr(module, "W_in", None), getattr(module, "W_out", None)
        act = getattr(module, "act_fn", None)
    else:  # the Hugging Face layers whose outputs / inputs the MLP hooks read
        lins = [wrapped_linear(parent_module(model, canonical(model, f"{prefix}.{h}")))
                for h in ("hook_pre", "hook_pre_linear", "hook_post")]
        if any(lin is None or nonzero_bias(lin, "bias") is not None for lin in lins):
            return None
        W_in, W_out = lins[1].weight.T, lins[2].weight.T  # pyright: ignore[reportOptionalMemberAccess]
        act = getattr(getattr(module, "original_component", None), "act_fn", None)
    if not (isinstance(W_in, Tensor) and isinstance(W_out, Tensor) and callable(act)
            and W_in.dim() == 2 and W_out.dim() == 2):
        return None
    act_fn = cast(Callable[[Tensor], Tensor], act)
    return _Site(module, gate, W_in.detach(), W_out.detach(), act_fn)


def formed_sites(model: Any, source: str) -> list[_Site]:
    """The gated, bias-free MLPs that can take the formed gradient (all but the source's layer
    when the source is inside a block)."""
    skip = block_of(source)
    return [s for layer in range(int(model.cfg.n_layers))
            if layer != skip and (s := _site(model, layer)) is not None]


def pays(rows: int, sites: list[_Site]) -> bool:
    """Whether forming ``M_t`` once for ``rows`` rows costs less than the factored products."""
    if not sites:
        return False
    d, d_mlp = sites[0].W_in.shape
    return rows * (2 * d_mlp - d) > d * d_mlp


class Formed:
    """The formed gradient paths of one forward pass: ``used`` gets one entry per layer that
    took it; a layer's ``M_tᵀ`` are formed at its first backward pass and kept until
    :meth:`clear` (the engine clears them once every row has crossed that layer), in one
    buffer that every layer reuses (fresh pages for each layer cost page faults)."""

    def __init__(self) -> None:
        self.used: list[int] = []
        self._key: int | None = None
        self._M: Tensor | None = None  # [n, d, d]: M_tᵀ of layer ``_key``

    def clear(self) -> None:
        self._key = None

    def matrices(self, key: int, W_in: Tensor, a: Tensor, W_out: Tensor) -> Tensor:
        """``M_tᵀ = W_outᵀ diag(a_t) W_inᵀ`` ``[n, d, d]`` for every token of layer ``key``,
        formed per token (all at once would hold a ``[n, d, d_mlp]`` temporary)."""
        if self._key != key:
            if self._key is not None:
                raise RuntimeError("formed MLP matrices of two layers at once: the engine must "
                                   "clear one layer's before the next")
            n, d = a.shape[1], W_out.shape[1]
            if self._M is None or self._M.shape != (n, d, d) or self._M.dtype != a.dtype:
                self._M = torch.empty(n, d, d, dtype=a.dtype, device=a.device)
            Wo, Wi = W_out.T, W_in.T
            for t in range(n):
                torch.mm(Wo * a[0, t], Wi, out=self._M[t])
            self._key = key
        assert self._M is not None
        return self._M


def install(hs: HookSet, sites: list[_Site]) -> Formed:
    """Add the hooks (after detached mode's) that give each MLP its formed gradient path."""
    formed = Formed()
    for key, site in enumerate(sites):
        seen: dict[str, Tensor] = {}

        def gate(t: Tensor, hook: Any, seen: dict = seen, site: _Site = site) -> None:
            seen["a"] = site.act(t.detach())

        def out(module: Any, args: tuple, y: Tensor, seen: dict = seen, site: _Site = site,
                key: int = key) -> Tensor | None:
            a = seen.pop("a", None)
            if (a is None or not args or not isinstance(args[0], Tensor)
                    or not isinstance(y, Tensor) or not _agrees(args[0], y, a, site)):
                return None  # the ordinary path
            formed.used.append(key)
            return _FormedGrad.apply(args[0], y.detach(), site.W_in, a, site.W_out, formed, key)

        hs.add(site.gate_hook, gate)
        hs.add_module_hook(site.module, out)
    return formed


def _agrees(x: Tensor, y: Tensor, a: Tensor, site: _Site) -> bool:
    """The module's output is ``((x W_in) ⊙ a) W_out`` at rounding level (batch of one)."""
    if x.dim() != 3 or x.shape[0] != 1 or y.shape != x.shape or a.shape[:2] != x.shape[:2]:
        return False
    with torch.no_grad():
        ref = ((x @ site.W_in) * a) @ site.W_out
        tol = 1e-3 if y.dtype not in (torch.float32, torch.float64) else (
            1e-4 if y.dtype == torch.float32 else 1e-10)
        return bool((ref - y).abs().max() <= tol * max(float(y.abs().max()), 1e-30))


class _FormedGrad(torch.autograd.Function):
    """Value: the MLP's output. Gradient to its input: ``g_t M_tᵀ`` per token, with ``M_tᵀ``
    from the pass's :class:`Formed`."""

    @staticmethod
    def forward(ctx: Any, *args: Any, **kwargs: Any) -> Tensor:
        x, y, W_in, a, W_out, formed, key = args  # x: the MLP's input (only its gradient is used)
        ctx.save_for_backward(W_in, a, W_out)
        ctx.formed, ctx.key = formed, key
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        g, = grads
        M = ctx.formed.matrices(ctx.key, *ctx.saved_tensors)
        # one 2-D product per token: legacy vmap (behind is_grads_batched) batches mm well, a
        # product against a stack of per-token matrices badly (it fell back to a loop per row)
        gx = torch.stack([torch.mm(g[..., t, :], M[t]) for t in range(M.shape[0])], dim=-2)
        return gx, None, None, None, None, None, None
