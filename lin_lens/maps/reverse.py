"""Reverse mode: one detached forward pass, then the rows of the operator as chunked batched VJPs.

Under detached mode the network is jointly linear in the source activation, every bias and the
positional embeddings, so for one input, by Euler's theorem for homogeneous functions,

    act[t] = Σ_i J[t, i] · x_i + Σ_origins ∂act[t]/∂b · b

Every term comes from the same backward passes: the rows of J are the gradients with respect to
the source, and each origin's constant is its gradient dotted with its value. The constant is
therefore computed independently of ``act − Σ J x``, and the reconstruction error is a real check.
Cost ∝ rows = n_tgt · d_out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lin_lens._tl import LOGITS
from lin_lens.errors import InvalidArgumentError, InvalidPositionError
from lin_lens.maps import budget, by_layer
from lin_lens.maps import formed_mlp as formed
from lin_lens.maps.graph import Forward, batched_grad, detached_forward
from lin_lens.maps.readout import Readout
from lin_lens.maps.request import MapRequest
from lin_lens.maps.result import LinearMap
from lin_lens.progress import progress_bar


def reverse_map(model: Any, req: MapRequest) -> LinearMap:
    """The map ``req`` asks for, by VJP rows (``req.detach=False``: the ordinary Jacobian). An
    operator with enough rows for forming to pay crosses the network one block at a time, its
    gated MLPs formed per token once per block (:mod:`.by_layer`, :mod:`.formed_mlp`)."""
    sites = _formed_sites(model, req)
    cuts = by_layer.cut_hooks(model, req.source, req.hook) if sites else []
    made: list[formed.Formed] = []  # the forward pass's formed paths, when installed

    def record(hs: Any) -> None:
        made.append(formed.install(hs, sites))

    with contextlib.ExitStack() as stack:
        fwd = detached_forward(stack, model, req.tokens, req.source, [req.hook],
                               detach=req.detach, constants=True, full=req.hook == LOGITS,
                               record=record if cuts else None, cuts=cuts)
        stack.enter_context(torch.enable_grad())
        cuts = [c for c in cuts if c in fwd.sources]  # those the pass reached before its target
        lm = _solve(model, req, fwd, _ByLayer(cuts, made[0]) if cuts else None)
    lm.tokens = req.tokens[0].detach().cpu()
    lm.detached = req.detach
    lm.int_pos = req.int_pos
    lm.meta["engine"] = "reverse"
    if cuts:
        lm.meta["blocks_one_at_a_time"] = len(cuts) + 1
    if made and made[0].used:
        lm.meta["formed_mlps"] = len(made[0].used)
    return lm


@dataclass
class _ByLayer:
    cuts: list[str]  # the block inputs cut into leaves, in forward order
    formed: formed.Formed


def _formed_sites(model: Any, req: MapRequest) -> list[Any]:
    """The gated MLPs to form, where forming pays for this request's rows and its block-by-block
    buffers fit the memory budget; else none."""
    if not (req.detach and req.direction is None and req.head is None
            and req.out_index is None and req.n <= by_layer.MAX_TOKENS):
        return []
    sites = formed.formed_sites(model, req.source)
    d = int(model.cfg.d_model)
    rows = len(req.positions) * d
    if not formed.pays(rows, sites):
        return []
    p = next(iter(model.parameters()))
    isz = budget.itemsize(p.dtype)
    # J, the rows' cotangents at a cut (as large), one block's formed matrices, the graph
    need = 2 * rows * req.n * d * isz + req.n * d * d * isz + budget.graph_bytes(model, req.n,
                                                                                p.dtype)
    return sites if need <= budget.budget(req.max_memory, p.device) else []


def _rows(req: MapRequest, out_shape: tuple[int, ...], d_space: int
          ) -> tuple[Tensor | None, tuple[int, ...]]:
    """The output rows kept (``out_index`` or one head's block) and the output shape."""
    if req.head is not None:
        if len(out_shape) < 2:
            raise InvalidArgumentError(
                f"head={req.head} needs a per-head hook; {req.hook!r} has shape {list(out_shape)}")
        if not -out_shape[0] <= req.head < out_shape[0]:
            raise InvalidPositionError(f"head {req.head} out of range ({out_shape[0]} heads)")
        h = req.head % out_shape[0]
        per = int(torch.tensor(out_shape[1:]).prod())
        return torch.arange(h * per, (h + 1) * per), out_shape[1:]
    if req.out_index is None:
        return None, out_shape
    idx = req.out_index
    if int(idx.max()) >= d_space or int(idx.min()) < -d_space:
        raise InvalidPositionError(f"out_index out of range for an output of size {d_space}")
    return idx % d_space, (int(idx.numel()),)


def _solve(model: Any, req: MapRequest, fwd: Forward, layered: _ByLayer | None = None
           ) -> LinearMap:
    act = fwd.acts[req.canonical_hook(model)]  # [1, n, *rest]
    tgt = req.positions
    n_t = len(tgt)
    flat = act.reshape(act.shape[0], act.shape[1], -1)[0]  # [n, d_act]
    d_act = flat.shape[-1]
    readout = None
    if req.hook == LOGITS:
        readout = Readout.at(model, flat[tgt])
        assert fwd.logits is not None  # a pass to the logits keeps them
        value = fwd.logits[0, tgt].detach()  # the model's own logits: [n_t, V]
        out_shape: tuple[int, ...] = (value.shape[-1],)
    else:
        value = flat[tgt].detach()  # [n_t, d_act]
        out_shape = tuple(act.shape[2:])
    d_space = value.shape[-1]
    idx, out_shape = _rows(req, out_shape, d_space)
    if idx is not None:
        idx = idx.to(value.device)

    common: dict[str, Any] = dict(x=fwd.x.detach()[0].reshape(fwd.x.shape[1], -1), hook=req.hook,
                  source=req.source, positions=tgt)
    if req.direction is not None:
        u = torch.as_tensor(req.direction, dtype=value.dtype, device=value.device)
        if u.ndim == 1:
            u = u.expand(n_t, -1)
        if u.shape != (n_t, d_space):
            raise InvalidArgumentError(
                f"direction must be [{d_space}] or [{n_t}, {d_space}], got {list(u.shape)}")
        cov = u if readout is None else readout.pull_back(u)  # [n_t, d_act]
        J, consts = vjp_rows(model, req, fwd, act, cov[:, None, :])
        consts = _with_bias(consts, readout, u[:, None, :])
        lm = LinearMap(J=J, act=(u * value).sum(-1, keepdim=True), constants=consts,
                       out_shape=(1,), direction=u, **common)
        lm.error_scale = (u.abs() * value.abs()).sum(-1, keepdim=True)
        return lm

    if readout is not None and idx is not None and idx.numel() < d_act:
        # few logit rows: pull each back through the readout
        R = len(idx)
        sel = torch.zeros(R, d_space, dtype=value.dtype, device=value.device)  # [R, V]
        sel[torch.arange(R, device=idx.device), idx] = 1
        cov = readout.pull_back(sel.expand(n_t, -1, -1).reshape(-1, d_space), repeat=R)
        J, consts = vjp_rows(model, req, fwd, act, cov.reshape(n_t, R, d_act))
        consts = _with_bias(consts, readout, sel.expand(n_t, -1, -1))
        value = value[:, idx]
    else:
        rows = idx if readout is None else None
        sel = torch.arange(d_act, device=act.device) if rows is None else rows
        eye = torch.zeros(len(sel), d_act, dtype=act.dtype, device=act.device)
        eye[torch.arange(len(sel), device=act.device), sel] = 1
        J, consts = vjp_rows(model, req, fwd, act, eye.expand(n_t, -1, -1), layered)
        if readout is not None:
            J, consts = readout.select(idx).apply(J, consts)
        if idx is not None:
            value = value[:, idx]
    return LinearMap(J=J, act=value, constants=consts, out_shape=out_shape,
                     out_index=None if req.head is not None else idx, **common)


def _with_bias(consts: dict[str, Tensor], readout: Readout | None, sel: Tensor
               ) -> dict[str, Tensor]:
    """Add the unembedding bias, a constant origin outside the captured activation."""
    off = None if readout is None else readout.bias_offset(sel)
    return consts if off is None else {**consts, "unembed.b_U": off}


def vjp_rows(model: Any, req: MapRequest, fwd: Forward, act: Tensor, cov: Tensor,
             layered: _ByLayer | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Batched VJPs for covectors ``cov [n_t, R, d_act]`` at the target positions: J
    ``[n_t, n_src, R, d_in]`` and the constant of every origin ``[n_t, R]``; ``layered``: the
    rows cross the network block by block (:mod:`.by_layer`)."""
    x = fwd.x
    n_t, R, d_act = cov.shape
    total = n_t * R
    n_src, d_in = x.shape[1], x[0, 0].numel()
    j_bytes = n_t * n_src * R * d_in * x.element_size()
    budget.check(j_bytes, f"the operator J [{n_t}, {n_src}, {R}, {d_in}]", req.max_memory,
                 device=x.device)
    chunk = req.chunk_size or default_chunk(
        model, act, x, total, 2 * j_bytes if layered else j_bytes, req.max_memory,
        by_layer.preferred_chunk(n_src) if layered else None)
    leaves = fwd.constant_leaves()
    names = list(leaves)
    J = torch.empty(n_t, n_src, R, d_in, dtype=x.dtype, device=x.device)
    consts = {k: torch.zeros(n_t, R, dtype=x.dtype, device=x.device) for k in names}
    flat_act = act.reshape(1, act.shape[1], -1)
    batches, top = cotangents(flat_act, cov, req.positions, chunk)
    if layered is None:
        bar = progress_bar(total, "linear map rows", req.progress, unit="row")
        rows = row_batches(flat_act, [x, *leaves.values()], batches, top, bar)
    else:
        outs = [*(fwd.computed[c] for c in layered.cuts), flat_act]
        segments = list(zip(outs, [x, *(fwd.sources[c] for c in layered.cuts)], strict=True))
        bar = progress_bar(len(segments), "linear map, block by block", req.progress,
                           unit="block")
        rows = by_layer.row_batches(segments, list(leaves.values()), batches, top,
                                    layered.formed.clear, bar)
    try:
        for t_idx, r_idx, grads in rows:
            k = len(t_idx)
            if grads[0] is not None:
                J[t_idx, :, r_idx] = grads[0].reshape(k, n_src, -1)
            elif layered is None:  # unreached (block by block: a batch's part above the source)
                J[t_idx, :, r_idx] = 0
            for name, val, g in zip(names, leaves.values(), grads[1:], strict=True):
                if g is not None:  # a batch's gradients may come in parts (by block)
                    consts[name][t_idx, r_idx] += (g * val.detach()).reshape(k, -1).sum(-1)
    finally:
        bar.close()
        if layered is not None:
            layered.formed.clear()
    return J, {k: v for k, v in consts.items() if bool(v.ne(0).any())}


def cotangents(output: Tensor, cov: Tensor, tgt: Sequence[int], chunk: int
               ) -> tuple[list[tuple[Tensor, Tensor]], Callable[[Tensor, Tensor], Tensor]]:
    """The ``(t_idx, r_idx)`` rows of each batch of ``chunk``, and their cotangent at
    ``output [*lead, 1, n, d]``: row ``(t, r)`` puts covector ``cov[t, r] [d]`` at position
    ``tgt[t]`` of every leading slice at once."""
    n_t, R, d = cov.shape
    lead, n, dev = output.shape[:-3], output.shape[-2], output.device
    rows_t = torch.arange(n_t, device=dev).repeat_interleave(R)
    rows_r = torch.arange(R, device=dev).repeat(n_t)
    tgt_t = torch.tensor(list(tgt), device=dev)
    batches = [(rows_t[s:s + chunk], rows_r[s:s + chunk]) for s in range(0, n_t * R, chunk)]

    def top(t_idx: Tensor, r_idx: Tensor) -> Tensor:
        k = len(t_idx)
        go = torch.zeros(k, 1, n, d, dtype=output.dtype, device=dev)
        go[torch.arange(k, device=dev), 0, tgt_t[t_idx]] = cov[t_idx, r_idx]
        return go.reshape(k, *([1] * len(lead)), 1, n, d).expand(k, *lead, 1, n, d)

    return batches, top


def row_batches(output: Tensor, inputs: list[Tensor], batches: list[tuple[Tensor, Tensor]],
                top: Callable[[Tensor, Tensor], Tensor], bar: Any
                ) -> Iterator[tuple[Tensor, Tensor, tuple]]:
    """Batched VJPs of ``output``, one backward pass per batch of :func:`cotangents`. Yields
    ``(t_idx, r_idx, grads)``, each grad ``[k, *input.shape]`` or None (unreached); ``bar``
    advances by each batch once the caller has used it."""
    for t_idx, r_idx in batches:
        yield t_idx, r_idx, batched_grad(output, inputs, top(t_idx, r_idx), allow_unused=True)
        bar.update(len(t_idx))


def default_chunk(model: Any, act: Tensor, x: Tensor, total: int, reserved: int,
                   max_memory: int | None, preferred: int | None = None) -> int:
    """Rows per batched VJP: the tuned size (BENCHMARKS.md) or ``preferred``, shrunk to fit the
    memory budget."""
    n = act.shape[1]
    free = (budget.budget(max_memory, x.device) - reserved
            - budget.graph_bytes(model, n, x.dtype))
    pref = preferred or budget.preferred_chunk(n)
    return budget.choose_chunk(model, n, x.dtype, max(free, 0), pref, total or pref,
                               cap=max(pref, budget.MAX_CHUNK))
