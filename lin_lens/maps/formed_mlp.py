"""Gated MLPs as one matrix per token in the reverse passes of a short prompt.

In detached mode a gated MLP is linear in its input for this input: with the gate
``a_t = act(x_t W_gate)`` frozen, ``out_t = ((x_t W_in) ⊙ a_t) W_out = x_t M_t`` with
``M_t = W_in diag(a_t) W_out`` (``d × d``). A batched VJP pushes each of its R rows through the two
``d × d_mlp`` products of every token; forming ``M_t`` once per pass and applying it costs
``d²·d_mlp + R·d²`` multiply-adds per token instead of ``2·R·d·d_mlp``: a third less of the MLP's
work on SmolLM2 when all 576 rows of a residual-width operator share one pass, which is what the
reverse engine then does at short prompts (``FORMED_TOKEN_ROWS``; BENCHMARKS.md, issue 24). Below
about half of ``d`` rows per pass, forming costs more than it saves.

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
    canonical,
    hook_dict,
    is_bridge,
    nonzero_bias,
    parent_module,
    wrapped_linear,
)

FORMED_MIN_ROWS = 512  # rows per pass at least (forming M_t costs about d/2 rows' worth)
FORMED_TOKEN_ROWS = 12_288  # rows × tokens in the one pass (SmolLM2: all 576 rows up to 21 tokens)


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
    skip = source.split(".")[1] if source.startswith("blocks.") else None
    return [s for layer in range(int(model.cfg.n_layers))
            if str(layer) != skip and (s := _site(model, layer)) is not None]


def formed_rows(n_tokens: int, total_rows: int) -> int:
    """Rows per pass for the formed path, or 0 where it does not pay (fewer than
    ``FORMED_MIN_ROWS`` rows fit one pass of ``FORMED_TOKEN_ROWS`` token-rows)."""
    rows = min(total_rows, FORMED_TOKEN_ROWS // max(1, n_tokens))
    return rows if rows >= FORMED_MIN_ROWS else 0


def install(hs: HookSet, sites: list[_Site]) -> list[int]:
    """Add the hooks (after detached mode's) that give each MLP its formed gradient path.
    Returns a list that gets one entry per layer that took it, in the forward pass."""
    used: list[int] = []
    for site in sites:
        seen: dict[str, Tensor] = {}

        def gate(t: Tensor, hook: Any, seen: dict = seen, site: _Site = site) -> None:
            seen["a"] = site.act(t.detach())

        def out(module: Any, args: tuple, y: Tensor, seen: dict = seen,
                site: _Site = site) -> Tensor | None:
            a = seen.pop("a", None)
            if (a is None or not args or not isinstance(args[0], Tensor)
                    or not isinstance(y, Tensor) or not _agrees(args[0], y, a, site)):
                return None  # the ordinary path
            used.append(1)
            return _FormedGrad.apply(args[0], y.detach(), site.W_in, a, site.W_out)

        hs.add(site.gate_hook, gate)
        hs.add_module_hook(site.module, out)
    return used


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
    """Value: the MLP's output. Gradient to its input: ``g_t M_tᵀ`` per token, ``M_tᵀ`` formed
    once per backward pass (the rows of a batched VJP arrive together)."""

    @staticmethod
    def forward(ctx: Any, *args: Any, **kwargs: Any) -> Tensor:
        x, y, W_in, a, W_out = args  # x: the MLP's input (only its gradient is used)
        ctx.save_for_backward(W_in, a, W_out)
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        g, = grads
        W_in, a, W_out = ctx.saved_tensors
        # per token: M_tᵀ = W_outᵀ diag(a_t) W_inᵀ (d × d, formed transiently), then one 2-D
        # product (legacy vmap, behind is_grads_batched, batches mm well, a product against
        # a stack of per-token matrices badly)
        Wo, Wi = W_out.T, W_in.T
        gx = torch.stack([torch.mm(g[..., t, :], (Wo * a[0, t]) @ Wi)
                          for t in range(a.shape[1])], dim=-2)
        return gx, None, None, None, None
