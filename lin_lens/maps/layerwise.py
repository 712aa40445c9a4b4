"""Per-layer operators from one pass: layer L's own map ``blocks.L.hook_resid_pre`` →
``blocks.L.hook_resid_post`` for many layers at once (the layer sweep's ``transform`` kind).

Every selected layer's input becomes a leaf of its own (``detached_forward(cuts=...)``),
cut from the layers below, so layer L's output depends on its own leaf only. A batch of cotangents
placed at *every* selected layer's output then yields row r of every layer's operator in one
backward pass: the same rows and multiply-adds as one reverse map per layer, but one forward pass
instead of one per layer (each up to its layer) and one autograd call per chunk instead of one per
chunk and layer. Constants are per origin, as in :mod:`.reverse`; a bias is credited to the block
that holds it (the cuts keep it from reaching any other selected layer's output; a bias outside
the selected blocks that reaches one is refused, and a wrong credit would fail that map's
reconstruction check).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lin_lens._tl import canonical
from lin_lens.errors import UnsupportedFeatureError
from lin_lens.maps import budget
from lin_lens.maps.graph import detached_forward
from lin_lens.maps.request import MapRequest
from lin_lens.maps.result import LinearMap
from lin_lens.maps.reverse import cotangents, default_chunk, row_batches
from lin_lens.progress import progress_bar

ENGINE = "reverse (layers in one pass)"


def transform_hooks(layer: int) -> tuple[str, str]:
    """(source, target) of layer ``layer``'s own map."""
    return f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post"


def layer_maps(model: Any, req: MapRequest, layers: Sequence[int]) -> dict[int, LinearMap]:
    """``{L: layer L's map}`` at ``req``'s tokens and positions for sorted, distinct ``layers``."""
    srcs, tgts = zip(*(transform_hooks(L) for L in layers), strict=True)
    tgt = req.positions
    n_t, n = len(tgt), req.tokens.shape[1]
    with contextlib.ExitStack() as stack:
        fwd = detached_forward(stack, model, req.tokens, srcs[0], list(tgts), constants=True,
                               cuts=srcs[1:])
        stack.enter_context(torch.enable_grad())
        xs = [fwd.x, *(fwd.sources[s] for s in srcs[1:])]
        ys = [fwd.acts[canonical(model, h)] for h in tgts]
        widths = {y[0, 0].numel() for y in ys} | {x[0, 0].numel() for x in xs}
        if len(widths) != 1:
            raise UnsupportedFeatureError(
                f"layer inputs and outputs of different widths {sorted(widths)}: map each layer "
                "with linear_map(..., source=f'blocks.{L}.hook_resid_pre') instead")
        d = widths.pop()
        x0 = fwd.x
        j_bytes = len(layers) * n_t * n * d * d * budget.itemsize(x0.dtype)
        budget.check(j_bytes + budget.graph_bytes(model, n, x0.dtype),
                     f"{len(layers)} per-layer operators ({n_t} position(s), {n} source tokens)",
                     req.max_memory, device=x0.device)
        total = n_t * d
        chunk = req.chunk_size or default_chunk(model, ys[0], x0, total, j_bytes,
                                                 req.max_memory)
        bias_names = list(fwd.biases)
        owner = _owners(model, fwd.biases)
        inputs = [*xs, *fwd.biases.values()]
        Y = torch.stack([y.reshape(1, n, d) for y in ys])  # [L, 1, n, d]
        Js = [torch.empty(n_t, n, d, d, dtype=x0.dtype, device=x0.device) for _ in layers]
        consts: list[dict[str, Tensor]] = [{} for _ in layers]
        eye = torch.eye(d, dtype=x0.dtype, device=x0.device).expand(n_t, d, d)  # row r: e_r
        bar = progress_bar(total, f"per-layer maps ({len(layers)} layers)", req.progress,
                           unit="row")
        try:
            batches = row_batches(Y, inputs, *cotangents(Y, eye, tgt, chunk), bar)
            for t_idx, r_idx, grads in batches:
                k = len(t_idx)
                for i, g in enumerate(grads[:len(xs)]):
                    Js[i][t_idx, :, r_idx] = 0 if g is None else g.reshape(k, n, d)
                for name, val, g in zip(bias_names, fwd.biases.values(), grads[len(xs):],
                                        strict=True):
                    if g is None or not bool(g.ne(0).any()):
                        continue
                    layer = owner[name]
                    if layer is None or layer not in layers:
                        raise UnsupportedFeatureError(
                            f"bias {name!r} reaches a layer's output past the cut at its input; "
                            "map each layer with linear_map(..., source=...) instead")
                    c = consts[list(layers).index(layer)].setdefault(
                        name, torch.zeros(n_t, d, dtype=x0.dtype, device=x0.device))
                    c[t_idx, r_idx] = (g * val.detach()).reshape(k, -1).sum(-1)
        finally:
            bar.close()
    out = {}
    tokens = req.tokens[0].detach().cpu()
    for i, layer in enumerate(layers):
        lm = LinearMap(J=Js[i], x=xs[i].detach()[0].reshape(n, -1),
                       act=ys[i].detach()[0, tgt].reshape(n_t, -1), constants=consts[i],
                       hook=tgts[i], source=srcs[i], positions=tgt,
                       out_shape=tuple(ys[i].shape[2:]), tokens=tokens, detached=True,
                       int_pos=req.int_pos)
        lm.meta["engine"] = ENGINE
        out[layer] = lm
    return out


def _owners(model: Any, params: dict[str, Tensor]) -> dict[str, int | None]:
    """The block each parameter lives in, by identity (a Bridge names them after the wrapped
    Hugging Face modules), None outside the blocks."""
    where = {id(p): i for i, blk in enumerate(getattr(model, "blocks", []))
             for p in blk.parameters()}
    return {name: where.get(id(p)) for name, p in params.items()}
