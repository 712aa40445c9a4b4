"""Exact linear maps of any hook activation with respect to an earlier hook (the input embeddings
by default), computed in detached mode.

Under detached mode the network is jointly linear in the source activation, every bias and the
positional embeddings, so for one input, by Euler's theorem for homogeneous functions,

    act[t] = Σ_i J[t, i] · x_i + Σ_origins ∂act[t]/∂b · b

Every term comes from the same reverse-mode sweep: the rows of J are the gradients with respect to
the source, and each origin's constant is its gradient dotted with its value. The constant is
therefore computed independently of ``act − Σ J x``, and the reconstruction error is a real check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from lin_lens import memory as _memory
from lin_lens._hooks import LOGITS, HookSet, resolve_hook
from lin_lens.freeze import cut_hooks, detached
from lin_lens.gates import softcap_gate
from lin_lens.progress import progress_bar
from lin_lens.result import LinearMap, NotExactError, default_tolerance

NOT_LINEAR = {
    "hook_pattern": "the attention pattern is a softmax of the input (frozen, not linear)",
    "hook_attn_scores": "attention scores are bilinear (q·k) in the input",
    "hook_scale": "a norm's scale is sqrt(mean(x²)+eps), not linear in the input",
    "hook_cos": "rotary tables do not depend on the input",
    "hook_sin": "rotary tables do not depend on the input",
    "hook_tokens": "token ids are not activations",
    "hook_expert_weights": "router weights are a softmax of the input",
    "hook_expert_indices": "router indices are discrete",
}

# Hooks that only fire while a config flag is on; we switch the flag on for the call.
_FLAG_HOOKS = {
    "hook_result": ("use_attn_result", "set_use_attn_result"),
    "hook_attn_in": ("use_attn_in", "set_use_attn_in"),
    "hook_q_input": ("use_split_qkv_input", "set_use_split_qkv_input"),
    "hook_k_input": ("use_split_qkv_input", "set_use_split_qkv_input"),
    "hook_v_input": ("use_split_qkv_input", "set_use_split_qkv_input"),
    "hook_mlp_in": ("use_hook_mlp_in", "set_use_hook_mlp_in"),
}


def to_tokens(model: Any, inputs: Any, prepend_bos: bool | None = None) -> Int[Tensor, "1 pos"]:
    """Text, a list of ids or an id tensor → one [1, pos] token tensor on the model's device."""
    if isinstance(inputs, str):
        if not inputs:
            raise ValueError("empty input text")
        kw = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
        tokens = model.to_tokens(inputs, **kw)
    else:
        tokens = torch.as_tensor(inputs)
        if tokens.numel() == 0:
            raise ValueError("empty input: no tokens")
        if tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"token ids must be integers, got {tokens.dtype}")
        if tokens.ndim == 1:
            tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ValueError(
            f"one prompt at a time: expected [pos] or [1, pos], got {list(tokens.shape)}"
        )
    if tokens.shape[1] == 0:
        raise ValueError("empty input: no tokens")
    d_vocab = getattr(model.cfg, "d_vocab", None)
    if d_vocab and (int(tokens.max()) >= d_vocab or int(tokens.min()) < 0):
        raise ValueError(f"token id out of range for d_vocab={d_vocab}")
    return tokens.to(_device(model))


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _dtype(model: Any) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def _positions(pos: Any, n: int) -> list[int]:
    if pos is None:
        idx = list(range(n))
    elif isinstance(pos, slice):
        idx = list(range(n))[pos]
    elif isinstance(pos, int):
        idx = [pos]
    else:
        idx = [int(p) for p in pos]
    out = []
    for p in idx:
        if not -n <= p < n:
            raise IndexError(f"position {p} out of range for an input of {n} tokens")
        out.append(p % n)
    if not out:
        raise IndexError(f"pos={pos!r} selects no position of an input of {n} tokens")
    return out


def _check_target(model: Any, hook: str, role: str) -> None:
    if hook == LOGITS:
        if role == "source":
            raise ValueError("the logits cannot be the source")
        return
    resolve_hook(model, hook)
    leaf = hook.rsplit(".", 1)[-1]
    if leaf in NOT_LINEAR:
        raise ValueError(f"no exact linear map at {hook!r}: {NOT_LINEAR[leaf]}")


def _is_bias(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1].lstrip("_")  # GQA stores _b_K/_b_V
    return leaf == "bias" or leaf == "b" or leaf.startswith("b_")


@contextlib.contextmanager
def _flags_for(model: Any, hooks: Sequence[str]) -> Iterator[None]:
    """Switch on the config flags the named hooks need; restore the user's values after."""
    restore = []
    try:
        for h in hooks:
            spec = _FLAG_HOOKS.get(h.rsplit(".", 1)[-1])
            if spec is None or not hasattr(model, spec[1]):
                continue
            flag, setter = spec
            before = bool(getattr(model.cfg, flag, False))
            if not before:
                getattr(model, setter)(True)
                restore.append((setter, before))
        yield
    finally:
        for setter, before in reversed(restore):
            getattr(model, setter)(before)


@contextlib.contextmanager
def _bias_grads(model: Any) -> Iterator[dict[str, Tensor]]:
    """Non-zero bias parameters with requires_grad on for the call; the user's flags restored
    after. An all-zero bias (TransformerLens keeps them for Llama-style models) contributes an
    exactly zero constant, so it is left out of the graph and its gradient never computed."""
    biases = {n: p for n, p in model.named_parameters()
              if _is_bias(n) and p.is_floating_point() and bool(p.detach().ne(0).any())}
    before = {n: p.requires_grad for n, p in biases.items()}
    try:
        for p in biases.values():
            p.requires_grad_(True)
        yield biases
    finally:
        for n, p in biases.items():
            p.requires_grad_(before[n])


class _Capture:
    """Forward-pass bookkeeping: leaves we create and the activation we read."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.leaves: dict[str, Tensor] = {}
        self.act: Tensor | None = None

    def leaf(self, label: str):
        def fn(t: Tensor, hook: Any) -> Tensor:
            self.order.append(label)
            leaf = t.detach().requires_grad_(True)
            self.leaves[label] = leaf
            return leaf

        return fn

    def add_leaves(self, model: Any, hs: HookSet, source: str) -> None:
        """The source as leaf "source", and every input origin that is not the source
        (``hook_embed``, ``hook_pos_embed``) as a leaf of its own, for its constant."""
        hs.add(source, self.leaf("source"))
        src_name = resolve_hook(model, source).name or source
        for origin in ("hook_embed", "hook_pos_embed"):
            if origin not in model.hook_dict:
                continue
            if (resolve_hook(model, origin).name or origin) != src_name:
                hs.add(origin, self.leaf(origin))

    def read(self, t: Tensor, hook: Any = None) -> None:
        self.order.append("target")
        self.act = t


def _unembed(model: Any) -> tuple[Tensor, Tensor | None]:
    W_U = model.W_U
    b_U = getattr(model, "b_U", None)
    return W_U, b_U


def linear_map(
    model: Any,
    inputs: str | Sequence[int] | Tensor,
    hook: str = LOGITS,
    pos: int | Sequence[int] | slice | None = -1,
    *,
    source: str = "hook_embed",
    direction: Tensor | None = None,
    out_index: Sequence[int] | Tensor | None = None,
    head: int | None = None,
    detach: bool = True,
    chunk_size: int | None = None,
    progress: bool | None = None,
    check: bool = True,
    tol: float | None = None,
    prepend_bos: bool | None = None,
    engine: str = "auto",
    max_memory: int | float | str | None = None,
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
        check: raise :class:`NotExactError` if the reconstruction error exceeds ``tol``.
        tol: relative-error bound for ``check`` (default by dtype: see ``default_tolerance``).
        prepend_bos: passed to ``model.to_tokens`` for text input.
        engine: ``"auto"`` (default), ``"reverse"`` (batched VJP rows) or ``"forward"`` (batched
            replay columns); see :mod:`lin_lens.engines`. ``"matrix_free"`` is
            :func:`lin_lens.engines.top_singular`.
        max_memory: byte budget (int or e.g. ``"4GB"``; default min(available RAM / 2, 8 GB)).
            The call is refused with :class:`lin_lens.memory.MemoryBudgetError` before any
            allocation when the operator cannot fit.

    Returns:
        a :class:`LinearMap`; ``J`` is ``[n_src, d_out, d_in]`` for an int ``pos`` and
        ``[n_tgt, n_src, d_out, d_in]`` otherwise.
    """
    if engine != "reverse":  # engines: auto choice, forward mode, memory preflight
        from lin_lens.engines import linear_map_with_engine

        return linear_map_with_engine(
            model, inputs, hook, pos, engine, max_memory, source=source, direction=direction,
            out_index=out_index, head=head, detach=detach, chunk_size=chunk_size,
            progress=progress, check=check, tol=tol, prepend_bos=prepend_bos)
    tokens = to_tokens(model, inputs, prepend_bos)
    _check_target(model, source, "source")
    _check_target(model, hook, "target")
    n = tokens.shape[1]
    tgt = _positions(pos, n)
    if direction is not None and out_index is not None:
        raise ValueError("give either direction or out_index, not both")

    cap = _Capture()
    hs = HookSet(model)
    ctx = detached(model) if detach else contextlib.nullcontext()
    flag_hooks = [h for h in (hook, source) if h != LOGITS]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_flags_for(model, flag_hooks))
        stack.enter_context(ctx)
        stack.enter_context(hs)
        biases = stack.enter_context(_bias_grads(model))
        stack.enter_context(torch.enable_grad())

        cap.add_leaves(model, hs, source)
        if hook == LOGITS:
            hs.add_module_hook(model.unembed, lambda m, args: cap.read(args[0]), pre=True)
        else:
            hs.add(hook, cap.read, prepend=hook in cut_hooks(model) if detach else False)

        logits = model(tokens, return_type="logits")

        if "source" not in cap.leaves:
            raise ValueError(f"source hook {source!r} did not fire in the forward pass")
        if cap.act is None:
            raise ValueError(f"target hook {hook!r} did not fire in the forward pass")
        if cap.order.index("target") < cap.order.index("source"):
            raise ValueError(f"target {hook!r} is computed before source {source!r}")

        lm = _solve(
            model, cap, biases, logits, hook, tgt, source, direction, out_index, head,
            chunk_size, progress,
        )
    lm.tokens = tokens[0].detach().cpu()
    lm.detached = detach
    lm.int_pos = isinstance(pos, int)
    if check and detach:
        bound = tol if tol is not None else default_tolerance(lm.act.dtype)
        if not lm.relative_error <= bound:
            raise NotExactError(lm, bound)
    return lm


def _solve(model, cap, biases, logits, hook, tgt, source, direction, out_index, head,
           chunk_size, progress) -> LinearMap:
    act = cap.act  # [1, n, *rest]
    x = cap.leaves["source"]
    origins = {k: v for k, v in cap.leaves.items() if k != "source"}
    n_t = len(tgt)
    flat = act.reshape(act.shape[0], act.shape[1], -1)[0]  # [n, d_act]
    d_act = flat.shape[-1]
    out_shape = tuple(act.shape[2:])

    # Output rows as covectors on the captured activation, and the readout for logits.
    readout = None  # (W [d_act, V], b [V] | None, gate [n_t, V] | None)
    if hook == LOGITS:
        W_U, b_U = _unembed(model)
        z = flat[tgt].detach() @ W_U.detach() + (b_U.detach() if b_U is not None else 0)
        capv = getattr(model.cfg, "output_logits_soft_cap", None)
        g = softcap_gate(z, capv) if capv and capv > 0 else None
        readout = (W_U.detach(), None if b_U is None else b_U.detach(), g)
        value = logits[0, tgt].detach()  # the model's own logits: [n_t, V]
        out_shape = (value.shape[-1],)
    else:
        value = flat[tgt].detach()  # [n_t, d_act]
        if head is not None:
            if len(out_shape) < 2:
                raise ValueError(
                    f"head= needs a per-head hook; {hook!r} has shape {list(out_shape)}"
                )
            if not -out_shape[0] <= head < out_shape[0]:
                raise IndexError(f"head {head} out of range ({out_shape[0]} heads)")
            h = head % out_shape[0]
            per = int(torch.tensor(out_shape[1:]).prod())
            out_index = list(range(h * per, (h + 1) * per))
            out_shape = out_shape[1:]

    d_space = value.shape[-1]
    if out_index is not None:
        idx = torch.as_tensor(out_index, dtype=torch.long, device=value.device).reshape(-1)
        if idx.numel() == 0 or int(idx.max()) >= d_space or int(idx.min()) < -d_space:
            raise IndexError(f"out_index out of range for an output of size {d_space}")
        idx = idx % d_space
    else:
        idx = None

    if direction is not None:
        u = torch.as_tensor(direction, dtype=value.dtype, device=value.device)
        if u.ndim == 1:
            u = u.expand(n_t, -1)
        if u.shape != (n_t, d_space):
            raise ValueError(
                f"direction must be [{d_space}] or [{n_t}, {d_space}], got {list(u.shape)}"
            )
        # covector in activation space
        cov = _pull_back(u, readout)  # [n_t, d_act]
        J, consts = _vjp_rows(model, cap, biases, x, origins, act, tgt, cov[:, None, :],
                              chunk_size, progress)
        out_value = (u * value).sum(-1, keepdim=True)
        consts = _readout_offsets(consts, readout, u[:, None, :], hook)
        return LinearMap(J=J, x=_flat_source(x), act=out_value, constants=consts, hook=hook,
                         source=source, positions=tgt, out_shape=(1,), direction=u)

    rows = idx if (idx is not None and (readout is None or idx.numel() < d_act)) else None
    if readout is not None and rows is not None:
        # few logit rows: pull each back through the readout
        sel = torch.zeros(len(rows), d_space, dtype=value.dtype, device=value.device)  # [R, V]
        sel[torch.arange(len(rows)), rows] = 1
        cov = _pull_back(sel.expand(n_t, -1, -1).reshape(-1, d_space), readout, repeat=len(rows))
        cov = cov.reshape(n_t, len(rows), d_act)
        J, consts = _vjp_rows(model, cap, biases, x, origins, act, tgt, cov, chunk_size, progress)
        consts = _readout_offsets(consts, readout, sel.expand(n_t, -1, -1), hook)
        value = value[:, rows]
    else:
        eye_rows = rows if readout is None else None
        J, consts = _vjp_onehot(model, cap, biases, x, origins, act, tgt, d_act, eye_rows,
                                chunk_size, progress)
        if readout is not None:
            J, consts = _apply_readout(J, consts, readout, idx)
            if idx is not None:
                value = value[:, idx]
        elif rows is not None:
            value = value[:, rows]
    if idx is not None and head is None:
        out_shape = (int(idx.numel()),)
    return LinearMap(J=J, x=_flat_source(x), act=value, constants=consts, hook=hook,
                     source=source, positions=tgt, out_shape=out_shape,
                     out_index=None if head is not None else idx)


def _flat_source(x: Tensor) -> Tensor:
    """[1, n_src, *rest] leaf → [n_src, d_in] (per-head sources are flattened)."""
    return x.detach()[0].reshape(x.shape[1], -1)


def _pull_back(u: Tensor, readout, repeat: int = 1) -> Tensor:
    """Covector u on the output → covector on the captured activation."""
    if readout is None:
        return u
    W, _, g = readout
    if g is not None:
        g = g.repeat_interleave(repeat, dim=0) if repeat > 1 else g
        u = u * g
    return u @ W.T


def _readout_offsets(consts: dict, readout, sel: Tensor, hook: str) -> dict:
    """Add the unembedding bias (a constant origin outside the captured activation)."""
    if readout is None or readout[1] is None:
        return consts
    W, b, g = readout
    gb = b * g if g is not None else b.expand(sel.shape[0], -1)  # [n_t, V]
    consts = dict(consts)
    if bool(b.ne(0).any()):
        consts["unembed.b_U"] = (sel * gb[:, None, :]).sum(-1)  # [n_t, R]
    return consts


def _apply_readout(J: Tensor, consts: dict, readout, idx: Tensor | None):
    """J on the unembedding input [t, s, d_model, d_in] → J on the logits [t, s, V, d_in]."""
    W, b, g = readout
    if idx is not None:
        W = W[:, idx]
        b = None if b is None else b[idx]
        g = None if g is None else g[:, idx]
    Jo = torch.einsum("tshi,hv->tsvi", J, W)
    out = {k: v @ W for k, v in consts.items()}
    if g is not None:
        Jo = Jo * g[:, None, :, None]
        out = {k: v * g for k, v in out.items()}
    if b is not None and bool(b.ne(0).any()):
        out["unembed.b_U"] = b * g if g is not None else b.expand(J.shape[0], -1).clone()
    return Jo, out


def _vjp_onehot(model, cap, biases, x, origins, act, tgt, d_act, rows, chunk_size, progress):
    """Rows are unit covectors on the activation (optionally a subset ``rows``)."""
    n_t = len(tgt)
    sel = torch.arange(d_act, device=act.device) if rows is None else rows
    eye = torch.zeros(len(sel), d_act, dtype=act.dtype, device=act.device)
    eye[torch.arange(len(sel)), sel] = 1
    return _vjp_rows(model, cap, biases, x, origins, act, tgt, eye.expand(n_t, -1, -1),
                     chunk_size, progress)


def _vjp_rows(model, cap, biases, x, origins, act, tgt, cov, chunk_size, progress):
    """Batched VJPs for covectors ``cov[t, r]`` at target positions; returns J [t, s, r, d_in]
    and the constant of every origin [t, r]."""
    n_t, R, d_act = cov.shape
    total = n_t * R
    rows_t = torch.arange(n_t).repeat_interleave(R)
    rows_r = torch.arange(R).repeat(n_t)
    n_src = x.shape[1]
    j_bytes = n_t * n_src * R * x[0, 0].numel() * x.element_size()
    _memory.check(j_bytes, f"the operator J [{n_t}, {n_src}, {R}, {x[0, 0].numel()}]")
    chunk = chunk_size or _default_chunk(act, x, model=model, total=total, reserved=j_bytes)
    inputs = [x] + list(origins.values()) + list(biases.values())
    names = list(origins) + list(biases)
    J = torch.empty(n_t, n_src, R, x[0, 0].numel(), dtype=x.dtype, device=x.device)
    consts = {k: torch.zeros(n_t, R, dtype=x.dtype, device=x.device) for k in names}
    flat_act = act.reshape(1, act.shape[1], -1)
    tgt_t = torch.tensor(tgt, device=act.device)
    bar = progress_bar(total, "linear map rows", progress, unit="row")
    try:
        for start in range(0, total, chunk):
            t_idx = rows_t[start:start + chunk]
            r_idx = rows_r[start:start + chunk]
            k = len(t_idx)
            go = torch.zeros(k, 1, act.shape[1], d_act, dtype=act.dtype, device=act.device)
            go[torch.arange(k), 0, tgt_t[t_idx]] = cov[t_idx, r_idx]
            grads = batched_grad(flat_act, inputs, go, allow_unused=True)
            gx = grads[0]
            if gx is not None:
                J[t_idx, :, r_idx] = gx.reshape(k, n_src, -1)
            else:
                J[t_idx, :, r_idx] = 0
            for name, val, g in zip(names, inputs[1:], grads[1:], strict=True):
                if g is not None:
                    consts[name][t_idx, r_idx] = (g * val.detach()).reshape(k, -1).sum(-1)
            bar.update(k)
    finally:
        bar.close()
    consts = {k: v for k, v in consts.items() if bool(v.ne(0).any())}
    return J, consts


def batched_grad(outputs: Tensor, inputs: Tensor | Sequence[Tensor], grads: Tensor,
                 allow_unused: bool = False, chunk: int | None = None) -> Any:
    """``torch.autograd.grad`` over a retained graph for a batch of cotangents
    ``grads`` [B, *outputs.shape]; results carry the leading B. ``chunk``: at most that many
    cotangents per backward pass. A pass of one is a plain backward pass (no vmap), the fastest
    form at long inputs."""
    single = isinstance(inputs, Tensor)
    ins = [inputs] if single else list(inputs)
    parts = []
    for i in range(0, len(grads), chunk or len(grads)):
        g = grads[i:i + chunk] if chunk else grads
        if len(g) == 1:
            res = torch.autograd.grad(outputs, ins, g[0], retain_graph=True,
                                      allow_unused=allow_unused)
            res = tuple(None if r is None else r.unsqueeze(0) for r in res)
        else:
            res = torch.autograd.grad(outputs, ins, g, retain_graph=True,
                                      allow_unused=allow_unused, is_grads_batched=True)
        parts.append(res)
    res = tuple(None if ps[0] is None else torch.cat(ps) for ps in zip(*parts, strict=True))
    return res[0] if single else res


def _default_chunk(act: Tensor, x: Tensor, model: Any = None, total: int | None = None,
                   reserved: int = 0) -> int:
    """Rows per batched VJP: the tuned size (BENCHMARKS.md), shrunk to fit the memory budget."""
    if model is None:
        return _memory.PREFERRED_CHUNK
    n = act.shape[1]
    free = _memory.budget() - reserved - _memory.graph_bytes(model, n, x.dtype)
    pref = _memory.preferred_chunk(n)
    return _memory.choose_chunk(model, n, x.dtype, max(free, 0), pref, total or pref)
