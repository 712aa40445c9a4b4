"""The public entry points of the maps layer and the only dispatcher: a request is checked once
(:class:`~lin_lens.maps.request.MapRequest`), an engine is chosen, the engine runs, and the
result is checked for exactness. Engines never import this module."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lin_lens._precision import exact_matmul
from lin_lens._tl import LOGITS, canonical, model_device, model_dtype
from lin_lens._types import Inputs, MemoryBudget, OutIndex, Positions
from lin_lens.errors import ArgumentTypeError, InvalidArgumentError, NotExactError
from lin_lens.maps import budget
from lin_lens.maps.forward import choose_engine, forward_maps
from lin_lens.maps.layerwise import layer_maps, transform_hooks
from lin_lens.maps.matrix_free import TopSingular
from lin_lens.maps.matrix_free import top_singular as _top_singular
from lin_lens.maps.per_token import PerTokenTop, per_token_top
from lin_lens.maps.replay import ReplayUnsupported
from lin_lens.maps.request import (
    MapRequest,
    as_index,
    check_hook,
    hook_width,
    is_int_position,
    sequence_of_hooks,
)
from lin_lens.maps.result import LinearMap, default_tolerance
from lin_lens.maps.reverse import reverse_map


@exact_matmul()
def linear_map(
    model: Any,
    inputs: Inputs,
    hook: str = LOGITS,
    pos: Positions = -1,
    *,
    source: str = "hook_embed",
    direction: Float[Tensor, "*tgt d_out"] | None = None,
    out_index: OutIndex = None,
    head: int | None = None,
    detach: bool = True,
    chunk_size: int | None = None,
    progress: bool | None = None,
    check: bool = True,
    tol: float | None = None,
    prepend_bos: bool | None = None,
    engine: str = "auto",
    max_memory: MemoryBudget = None,
) -> LinearMap:
    """The exact linear map from ``source`` to the activation at ``hook`` for one input.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        inputs: text, or token ids ``[pos]`` / ``[1, pos]``.
        hook: target hook name (any name in ``model.hook_dict``) or ``"logits"``.
        pos: target position(s): an int (J loses its target axis), a list, a slice, or None (all).
        source: hook whose activation is the linear input (default the token embeddings).
        direction: an output covector ``u`` (``[d_out]`` or ``[n_tgt, d_out]``); returns the map of
            ``uᵀ act`` (d_out = 1) in a single backward pass per position.
        out_index: keep only these output coordinates (e.g. token ids for ``"logits"``).
        head: for per-head hooks (``hook_z``, ``hook_result``, ``hook_v`` …), the head to keep.
        detach: False gives the ordinary Jacobian (for comparison; it does not reconstruct).
        chunk_size: output rows per batched backward pass (default: fitted to the memory budget).
        progress: show a progress bar (default: only for long computations).
        check: raise :class:`~lin_lens.errors.NotExactError` if the reconstruction error exceeds
            ``tol``.
        tol: relative-error bound for ``check`` (default by dtype: see ``default_tolerance``).
        prepend_bos: passed to ``model.to_tokens`` for text input.
        engine: ``"auto"`` (default), ``"reverse"`` (batched VJP rows) or ``"forward"`` (columns
            for many hooks at once); ``"matrix_free"`` is :func:`top_singular`.
        max_memory: byte budget (int or e.g. ``"4GB"``; default min(available RAM / 2, 8 GB),
            or 80 % of the GPU's available memory for a model on CUDA).
            The call is refused with :class:`~lin_lens.errors.MemoryBudgetError` before any
            allocation when the operator cannot fit.

    Returns:
        a :class:`LinearMap`; ``J`` is ``[n_src, d_out, d_in]`` for an int ``pos`` and
        ``[n_tgt, n_src, d_out, d_in]`` otherwise.
    """
    req = MapRequest.build(model, inputs, hook, pos, source=source, direction=direction,
                           out_index=out_index, head=head, detach=detach, chunk_size=chunk_size,
                           progress=progress, check=check, tol=tol, prepend_bos=prepend_bos,
                           engine=engine, max_memory=max_memory)
    if req.engine == "forward" and not req.plain:
        raise InvalidArgumentError(
            "engine='forward' supports plain maps only (no direction=, out_index=, head=, "
            "detach=False, 'logits', or hook == source); use engine='reverse'")
    if req.engine == "forward" or (req.engine == "auto" and req.plain and choose_engine(
            model, req.n, req.positions, [req.hook]) == "forward"):
        return _operators(model, req, [req.hook])[req.hook]
    _preflight_reverse(model, req)
    return _checked(reverse_map(model, req), req)


@exact_matmul()
def operators_at_hooks(model: Any, tokens: Inputs, hooks: Sequence[str], pos: Positions = -1, *,
                       source: str = "hook_embed", engine: str = "auto",
                       chunk_size: int | None = None, progress: bool | None = None,
                       check: bool = True, tol: float | None = None,
                       max_memory: MemoryBudget = None) -> dict[str, LinearMap]:
    """The exact detached linear map at every hook in ``hooks`` (e.g. the layer sweep: every
    ``resid_post``, ``attn_out`` and ``mlp_out``) for one input.

    Each value is a :class:`LinearMap` exactly as ``linear_map(model, tokens, hook, pos,
    source=source)`` would return it (``J``, ``x``, ``act``, per-origin ``constants``; its
    ``relative_error`` is checked against ``tol`` when ``check``). ``engine``: ``"forward"`` (one
    set of columns gives every hook), ``"reverse"`` (VJP rows, hook by hook), or ``"auto"``.
    ``meta["engine"]`` records which engine produced each map.
    """
    if engine not in ("auto", "reverse", "forward"):
        raise InvalidArgumentError(
            f"engine must be 'auto', 'reverse' or 'forward' here, got {engine!r}")
    hooks = sequence_of_hooks(hooks)
    req = MapRequest.build(model, tokens, hooks[0], pos, source=source, chunk_size=chunk_size,
                           progress=progress, check=check, tol=tol, engine=engine,
                           max_memory=max_memory)
    for h in hooks:
        check_hook(model, h, "target")
        if h == source:
            raise InvalidArgumentError(f"source and target hook are the same: {h!r}")
    return _operators(model, req, hooks)


@exact_matmul()
def layer_transforms(model: Any, tokens: Inputs, layers: Sequence[int] | None = None,
                     pos: Positions = -1, *, chunk_size: int | None = None,
                     progress: bool | None = None, check: bool = True, tol: float | None = None,
                     max_memory: MemoryBudget = None) -> dict[int, LinearMap]:
    """Each layer's own exact map, ``blocks.L.hook_resid_pre`` → ``blocks.L.hook_resid_post``
    (all source positions), for every ``L`` in ``layers`` (default: all), keyed by layer.

    Each value is the :class:`LinearMap` that ``linear_map(model, tokens,
    f"blocks.{L}.hook_resid_post", pos, source=f"blocks.{L}.hook_resid_pre")`` returns, each
    checked against ``tol``; all come from one detached forward pass and one set of VJP rows
    (:mod:`lin_lens.maps.layerwise`).
    """
    n_layers = int(model.cfg.n_layers)
    layers = list(range(n_layers)) if layers is None else [as_index(x, "layers")
                                                          for x in layers]
    bad = [x for x in layers if not -n_layers <= x < n_layers]
    if bad or not layers:
        raise InvalidArgumentError(f"layers={layers}: {bad or 'none'} out of range for a "
                                   f"{n_layers}-layer model")
    layers = sorted({x % n_layers for x in layers})
    src, tgt = transform_hooks(layers[0])[0], transform_hooks(layers[-1])[1]
    req = MapRequest.build(model, tokens, tgt, pos, source=src, chunk_size=chunk_size,
                           progress=progress, check=check, tol=tol, engine="reverse",
                           max_memory=max_memory)
    for layer in layers:
        for role, h in zip(("source", "target"), transform_hooks(layer), strict=True):
            check_hook(model, h, role)
    res = layer_maps(model, req, layers)
    return {layer: _checked(lm, req) for layer, lm in res.items()}


def _operators(model: Any, req: MapRequest, hooks: list[str]) -> dict[str, LinearMap]:
    chosen = req.engine
    if chosen == "auto":
        chosen = choose_engine(model, req.n, req.positions, hooks)
    if chosen == "forward":
        canon = {h: canonical(model, h) for h in hooks}
        try:
            res = forward_maps(model, req, list(dict.fromkeys(canon.values())))
        except ReplayUnsupported:
            if req.engine == "forward":
                raise
        else:
            return {h: _checked(res[canon[h]], req) for h in hooks}
    out = {}
    for h in hooks:
        sub = dataclasses.replace(req, hook=h, engine="reverse")
        _preflight_reverse(model, sub)
        out[h] = _checked(reverse_map(model, sub), sub)
    return out


@exact_matmul()
def top_singular(model: Any, tokens: Inputs, hook: str = LOGITS, pos: int = -1, k: int = 16, *,
                 source: str = "hook_embed", block: int | None = None, tol: float = 1e-4,
                 vec_tol: float | None = None, guard: int | None = None,
                 max_iter: int | None = None, seed: int = 0, progress: bool | None = None,
                 max_memory: MemoryBudget = None) -> TopSingular:
    """Top-``k`` singular triplets ``U [d_out, k]``, ``S [k]``, ``V [n_src, d_in, k]`` of the
    detached operator at ``hook``/``pos`` (all source tokens stacked), without forming ``J``;
    see ``lin_lens.maps.matrix_free.top_singular`` for the method and stopping rule."""
    if not is_int_position(pos):
        raise ArgumentTypeError(f"top_singular takes one int position, got pos={pos!r}")
    req = MapRequest.build(model, tokens, hook, pos, source=source, progress=progress,
                           max_memory=max_memory)
    return _top_singular(model, req, k, block=block, tol=tol, vec_tol=vec_tol, guard=guard,
                         max_iter=max_iter, seed=seed)


@exact_matmul()
def top_singular_per_token(model: Any, tokens: Any, hook: str = "ln_final.hook_normalized",
                           pos: int = -1, *, source: str = "hook_embed", sketch: int = 32,
                           max_steps: int = 8, tol: float = 1e-3, seed: int = 0,
                           chunk_size: int | None = None,
                           progress: bool | None = None, max_memory: Any = None
                           ) -> PerTokenTop:
    """The top singular triplet of every source token's operator ``J_i`` at ``hook``/``pos``
    (the paper's per-token spectrum at long contexts), without forming ``J``: one
    Golub–Kahan–Lanczos solve per token from a shared sketch, run in lockstep so that every
    pass serves all tokens (:mod:`lin_lens.maps.per_token`); it stops when every residual
    ``‖J_iᵀu_i − σ_i v_i‖/σ_i`` is below ``tol`` or after ``max_steps``, and reports them."""
    if not is_int_position(pos):
        raise ArgumentTypeError(f"top_singular_per_token takes one int position, got {pos!r}")
    req = MapRequest.build(model, tokens, hook, pos, source=source, progress=progress,
                           chunk_size=chunk_size, max_memory=max_memory)
    return per_token_top(model, req, sketch=sketch, max_steps=max_steps, tol=tol, seed=seed)


def _checked(lm: LinearMap, req: MapRequest) -> LinearMap:
    """Refuse a detached map whose reconstruction error exceeds the tolerance."""
    if req.check and lm.detached:
        bound = req.tol if req.tol is not None else default_tolerance(lm.act4.dtype)
        err = lm.relative_error
        lm.meta["checked_error"] = err  # what the check measured (summaries reuse it)
        if not err <= bound:
            raise NotExactError(lm, bound, _cause(lm))
    return lm


def _cause(lm: LinearMap) -> str | None:
    """The real reason a map is not exact when it is not an unfrozen nonlinearity."""
    dtype = str(lm.act4.dtype).replace("torch.", "")
    if not bool(torch.isfinite(lm.x).all()):
        return ("The source activation contains NaN or inf: check the input embeddings and the "
                "model's weights.")
    if not bool(torch.isfinite(lm.act4).all()):
        return (f"The model's own activation at {lm.hook!r} contains NaN or inf (an overflow in "
                f"{dtype}, or non-finite weights); no map can reproduce it.")
    if not bool(torch.isfinite(lm.J4).all()) or not all(
            bool(torch.isfinite(v).all()) for v in lm.constants.values()):
        return (f"The operator contains NaN or inf: an intermediate value overflowed in {dtype} "
                "or a weight is not finite.")
    return None


def _preflight_reverse(model: Any, req: MapRequest) -> None:
    """Refuse, before any allocation, a reverse-mode map that cannot fit the memory budget."""
    n_t = len(req.positions)
    dm = int(model.cfg.d_model)
    d_in = dm
    if req.direction is not None:
        d_act = d_out = 1
    elif req.hook == LOGITS:
        oi = req.out_index
        d_out = int(model.cfg.d_vocab) if oi is None else len(torch.as_tensor(oi).reshape(-1))
        d_act = min(dm, d_out) if oi is not None else dm
    else:
        d_act = d_out = hook_width(model, req.hook)
    est = budget.estimate_linear_map(model, req.n, n_t, d_act, d_out, d_in, model_dtype(model),
                                     16)
    budget.check(est["total"], f"linear_map at {req.hook!r} ({n_t} position(s) × {req.n} "
                 f"tokens, J {n_t}×{req.n}×{d_out}×{d_in})", req.max_memory,
                 device=model_device(model))
