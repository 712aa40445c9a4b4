"""Engines for detached linear maps: reverse mode, forward mode (many hooks per pass) and
matrix-free top-k SVD.

* **reverse** (``linear_map``'s own path): one forward pass, then all output rows as chunked
  batched VJPs (``torch.autograd.grad(..., is_grads_batched=True)``). Cost ∝ rows = n_tgt·d_out.
* **forward**: the detached network is linear in the source, every bias and the positional
  embedding, with the norm scales, attention patterns and MLP gates frozen at their values for
  this input. We record those frozen factors in one primal pass, then *replay* the model on a batch
  of basis tangents with the frozen factors substituted through the same TransformerLens hooks,
  every bias zeroed (``torch.func.functional_call``, the model is not modified) and the positional
  embedding zeroed. That replay is the JVP of the detached network (a plain batched forward, no
  autograd), and one replay gives the columns of the operator at *every* requested hook at once —
  this is the layer sweep. Cost ∝ columns = n_src·d_in, independent of the number of hooks.
  The constant term of each origin is its own replay with the source at zero and only that bias
  (or the positional embedding) at its value: exact and computed independently of ``act − Σ J x``.
  (``torch.func.jvp``/``vmap`` through the model was measured 4–8× slower per column than the
  replay, and ``torch.func.linearize`` took minutes to trace SmolLM2; see BENCHMARKS.md.)
  Where the replay has no rule (Bridges, SoLU) the columns come from :class:`GraphColumns`, the
  double-backward of the detached graph: every hook at once as well, at the cost of a VJP per
  column and without the causal truncation.
* **matrix_free**: top-k singular triplets of the operator at one position by (block)
  Golub–Kahan–Lanczos with full reorthogonalisation, using only VJPs (backward passes over the
  retained detached graph) and JVPs (backward passes through the graph of the VJP ``Jᵀu``, which
  is linear in ``u`` — the double-backward trick: the same matmuls as a VJP, no Q/K/gate or score
  work, every architecture); ``J`` is never formed. Each triplet comes with its residual
  ``‖Jᵀu − σv‖`` (a singular value lies within it of σ; ``Jv = σu`` holds by construction) and the
  quadratic estimate residual²/gap used to stop.
* Batched backward passes use ``is_grads_batched`` (vmap) with ``memory.preferred_chunk(n)``
  rows, about 1.5k token-rows per pass; at ≥ 1k tokens a "batch" is one plain backward pass,
  because vmap copies the frozen attention pattern once per row.

``engine="auto"`` picks forward when ``REPLAY_COST × columns × depth`` is below
``Σ rows × depth``. The replay also runs the frozen Q/K and gate projections that VJPs skip, but
it needs no autograd bookkeeping; measured per-column/per-row cost ratio ≈ 1.1 on SmolLM2.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lin_lens import memory
from lin_lens._hooks import LOGITS, HookSet, resolve_hook
from lin_lens.freeze import _detach, cut_hooks, detached, freezing_rules, is_bridge
from lin_lens.gates import gate_fn, softcap_gate
from lin_lens.progress import progress_bar
from lin_lens.result import LinearMap, NotExactError, default_tolerance

ENGINES = ("auto", "reverse", "forward", "matrix_free")
# Guard Ritz values beyond the k wanted must reach this relative error estimate too: a Krylov
# space can converge k values while a close singular value above σ_k has not emerged yet (seen
# on SmolLM2 in float64 at 256 tokens, with a 2 % gap); the guard values make that unlikely.
GUARD_TOL = 1e-2
REPLAY_COST = 1.1  # replay cost per column / VJP cost per row (measured on SmolLM2, BENCHMARKS.md)
DEFAULT_FWD_CHUNK = 192  # columns per replay (one token's d_in columns in 3 chunks on SmolLM2)


class ReplayUnsupported(NotImplementedError):
    """Forward-mode replay cannot reproduce this model's frozen network; use reverse mode."""


class _Stop(Exception):
    """Raised from a hook to end a pass once every target has been read."""


def _lm():
    import importlib  # late import (linear_map imports us lazily); the package attribute
    # ``lin_lens.linear_map`` is the function, so fetch the module itself.

    return importlib.import_module("lin_lens.linear_map")


def _layer_of(model: Any, hook: str) -> int:
    m = re.match(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) if m else int(model.cfg.n_layers) - 1


def _depth(model: Any, hook: str) -> float:
    return (_layer_of(model, hook) + 1) / int(model.cfg.n_layers)


# -- the frozen factors and the replay -----------------------------------------------------------

class Replay:
    """Frozen factors of one input, and the linear (detached, bias-free) network replayed on
    batches of source tangents.

    Use :meth:`recorder` inside a detached forward pass to fill the factors, then :meth:`run`.
    """

    def __init__(self, model: Any, tokens: Tensor, source: str, targets: Sequence[str],
                 positions: Sequence[int]):
        if is_bridge(model):
            raise ReplayUnsupported("forward-mode replay supports HookedTransformer only")
        self.model, self.tokens, self.source = model, tokens, source
        self.targets, self.positions = list(targets), list(positions)
        self.freeze: list[str] = []  # hooks whose value is replaced by the recorded one
        self.pre_post: list[tuple[str, str]] = []  # plain MLPs: (pre hook, post hook)
        act = getattr(model.cfg, "act_fn", None)
        for r in freezing_rules(model):
            leaf = r.hook.rsplit(".", 1)[-1]
            if r.fn is _detach and leaf in ("hook_scale", "hook_pattern", "hook_pre"):
                self.freeze.append(r.hook)
            elif leaf == "hook_pre" and r.kind == "cut":
                self.pre_post.append((r.hook, r.hook[: -len("hook_pre")] + "hook_post"))
            elif leaf == "hook_post" and r.kind == "relinearize":
                continue
            elif leaf == "hook_v" and r.kind == "cut":
                continue  # clip_qkv check, values unaffected
            else:
                raise ReplayUnsupported(f"no replay rule for freezing hook {r.hook!r}")
        if any(post not in model.hook_dict for _, post in self.pre_post):
            raise ReplayUnsupported("plain MLP without hook_post")
        self._gate = gate_fn(act) if self.pre_post else None
        self.values: dict[str, Tensor] = {}
        self.gates: dict[str, Tensor] = {}
        src = resolve_hook(model, source).name or source
        self.pos_origin = ("hook_pos_embed" in model.hook_dict
                           and (resolve_hook(model, "hook_pos_embed").name or "hook_pos_embed")
                           != src)
        last = max(_layer_of(model, h) for h in self.targets)
        blocks_only = all(h.startswith("blocks.") for h in self.targets)
        self.stop_at = last + 1 if blocks_only else None
        self.biases = {n: p for n, p in model.named_parameters()
                       if _lm()._is_bias(n) and p.is_floating_point()}
        self._zeros = {n: torch.zeros_like(p) for n, p in self.biases.items()}

    # primal pass ------------------------------------------------------------------------------
    def recorder(self, hs: HookSet) -> None:
        """Add hooks (after detached mode's) that record the frozen factors."""
        def rec(t: Tensor, hook: Any) -> None:
            self.values[hook.name] = t.detach()

        def rec_pre(t: Tensor, hook: Any) -> None:
            self.gates[hook.name] = self._gate(t.detach())

        for h in self.freeze:
            hs.add(h, rec)
        for pre, _ in self.pre_post:
            hs.add(pre, rec_pre, prepend=True)

    # replay -----------------------------------------------------------------------------------
    def _sliced(self, name: str, v: Tensor, start: int) -> Tensor | None:
        """The frozen value for a replay of positions ``start:`` (None: leave the hook alone)."""
        if start == 0:
            return v
        n = self.tokens.shape[1]
        if name.endswith("hook_pattern"):
            return v[..., start:, start:]
        if v.ndim >= 2 and v.shape[0] == 1 and v.shape[1] == n:
            return v[:, start:]
        if ".attn.q_" in name or ".attn.k_" in name:  # q/k norms only feed the frozen pattern
            return None
        raise ReplayUnsupported(f"cannot slice the frozen value at {name!r}")

    def run(self, tangent: Tensor | None, origin: str | None = None,
            readout_input: bool = False, start: int = 0) -> dict[str, Tensor]:
        """Outputs ``{target: [B, n_pos, d]}`` of the linear network for source ``tangent``
        ``[B, n, *src]`` (None: zero source, batch 1), with only ``origin`` (a bias name or
        ``"hook_pos_embed"``) at its value. ``readout_input``: also read the unembedding input
        (key ``"logits"``). ``start``: replay positions ``start:`` only — exact when the tangent
        is zero before ``start`` (causal attention; the pattern is frozen, so position-dependent
        rotary and masks only touch the discarded Q/K); outputs then cover only the target
        positions ≥ ``start``."""
        model = self.model
        B = 1 if tangent is None else tangent.shape[0]
        tokens = self.tokens[:, start:].expand(B, -1)
        out: dict[str, Tensor] = {}
        want = set(self.targets) | ({LOGITS} if readout_input else set())
        pos = torch.tensor([t - start for t in self.positions if t >= start],
                           device=tokens.device, dtype=torch.long)
        params = dict(self._zeros)
        if origin is not None and origin in self.biases:
            params[origin] = self.biases[origin].detach()
        seen: dict[str, Tensor] = {}

        def done() -> None:
            if want <= out.keys():
                raise _Stop

        def grab(t: Tensor, hook: Any) -> None:
            out[hook.name] = t[:, pos].reshape(B, len(pos), -1)
            done()

        def src(t: Tensor, hook: Any) -> Tensor:
            return torch.zeros_like(t) if tangent is None else tangent.reshape(t.shape)

        def pos_embed(t: Tensor, hook: Any) -> Tensor:
            return t if origin == "hook_pos_embed" else torch.zeros_like(t)

        def frozen(t: Tensor, hook: Any) -> Tensor:
            v = self._sliced(hook.name, self.values[hook.name], start)
            if v is None:
                return t
            if v.shape[0] != t.shape[0] and v.shape[0] != 1:  # batch folded into dim 0 (q/k norm)
                v = v.repeat(t.shape[0] // v.shape[0], *([1] * (v.ndim - 1)))
            return v.expand(t.shape)

        def keep_pre(t: Tensor, hook: Any) -> None:
            seen[hook.name] = t

        def post_for(pre: str):
            def post(t: Tensor, hook: Any) -> Tensor:
                return self._sliced(pre, self.gates[pre], start) * seen.pop(pre)
            return post

        def unembed_in(module, args) -> None:
            out[LOGITS] = args[0][:, pos].reshape(B, len(pos), -1)
            done()

        hs = HookSet(model)
        first = [h for h in self.targets if h in self.freeze]
        with hs, torch.no_grad():
            hs.add(self.source, src)
            if self.pos_origin:
                hs.add("hook_pos_embed", pos_embed)
            for h in first:
                hs.add(h, grab)
            for h in self.freeze:
                hs.add(h, frozen)
            for pre, post in self.pre_post:
                hs.add(pre, keep_pre)
                hs.add(post, post_for(pre))
            for h in self.targets:
                if h not in first:
                    hs.add(h, grab)
            if readout_input:
                hs.add_module_hook(model.unembed, unembed_in, pre=True)
            kw: dict[str, Any] = {"return_type": "logits"}  # _Stop skips the W_U matmul
            if self.stop_at is not None and not readout_input:
                kw["stop_at_layer"] = self.stop_at
            try:
                torch.func.functional_call(model, params, (tokens,), kw, strict=False)
            except _Stop:
                pass
        missing = want - out.keys()
        if missing:
            raise ValueError(f"hooks did not fire in the replay: {sorted(missing)}")
        return out

    def origins(self) -> list[str]:
        names = [n for n, p in self.biases.items() if bool(p.detach().ne(0).any())]
        return names + (["hook_pos_embed"] if self.pos_origin else [])


@contextlib.contextmanager
def _params_frozen(model: Any) -> Iterator[None]:
    """requires_grad off on every parameter for the block (the graph then keeps only what the
    input gradient needs); the user's flags restored after, also on KeyboardInterrupt."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in before:
            p.requires_grad_(False)
        yield
    finally:
        for p, rg in before:
            p.requires_grad_(rg)


def _run_primal(stack: contextlib.ExitStack, model: Any, tokens: Tensor, source: str,
                targets: Sequence[str], replay: Replay | None,
                grad: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """One detached forward pass: returns (source leaf x, {target: act [1, n, ...]}) and records
    the replay's frozen factors. The config flags the hooks need stay on in ``stack`` (the replay
    needs them too); detached mode and our hooks are removed before returning."""
    lm = _lm()
    stack.enter_context(lm._flags_for(model, [h for h in (*targets, source) if h != LOGITS]))
    with contextlib.ExitStack() as inner:
        return _primal_pass(inner, model, tokens, source, targets, replay, grad)


def _primal_pass(stack: contextlib.ExitStack, model: Any, tokens: Tensor, source: str,
                 targets: Sequence[str], replay: Replay | None,
                 grad: bool) -> tuple[Tensor, dict[str, Tensor]]:
    stack.enter_context(detached(model))
    hs = stack.enter_context(HookSet(model))
    acts: dict[str, Tensor] = {}
    leaf: dict[str, Tensor] = {}
    want = set(targets)
    cuts = cut_hooks(model)

    def src(t: Tensor, hook: Any) -> Tensor:
        leaf["x"] = t.detach().requires_grad_(grad)
        return leaf["x"]

    def grab(t: Tensor, hook: Any) -> None:
        if "x" not in leaf:
            raise ValueError(f"target {hook.name!r} is computed before source {source!r}")
        acts[hook.name] = t
        if want <= acts.keys():
            raise _Stop

    def unembed_in(module, args) -> None:
        acts[LOGITS] = args[0]
        if want <= acts.keys():
            raise _Stop

    hs.add(source, src)
    if replay is not None:
        replay.recorder(hs)
    for h in targets:
        if h == LOGITS:
            hs.add_module_hook(model.unembed, unembed_in, pre=True)
        else:
            hs.add(h, grab, prepend=h in cuts)
    stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
    try:
        model(tokens, return_type="logits")  # _Stop ends the pass at the last target (skips W_U)
    except _Stop:
        pass
    if "x" not in leaf:
        raise ValueError(f"source hook {source!r} did not fire in the forward pass")
    missing = want - acts.keys()
    if missing:
        raise ValueError(f"target hooks did not fire: {sorted(missing)}")
    return leaf["x"], acts


# -- forward mode: operators at many hooks -------------------------------------------------------

def _forward_maps(model: Any, tokens: Tensor, hooks: Sequence[str], tgt: list[int], source: str,
                  chunk_size: int | None, progress: bool | None, max_memory: Any,
                  int_pos: bool) -> dict[str, LinearMap]:
    with contextlib.ExitStack() as stack:
        try:
            replay: Any = Replay(model, tokens, source, hooks, tgt)
        except ReplayUnsupported:  # Bridges, SoLU: columns from the reverse graph instead
            replay = GraphColumns(stack, model, tokens, source, hooks, tgt)
            x, acts = replay.x, replay.acts
        else:
            x, acts = _run_primal(stack, model, tokens, source, hooks, replay, grad=False)
        res = _forward_columns(model, tokens, hooks, tgt, source, chunk_size, progress,
                               max_memory, int_pos, replay, x, acts)
        for m in res.values():
            m.meta["engine"] = "forward" if isinstance(replay, Replay) else "forward (graph)"
        return res


class GraphColumns:
    """Operator columns at many hooks from one detached graph, for models the replay cannot
    follow (Bridges, SoLU): with ``y`` the target activations stacked, ``g(u) = ∂(u·y)/∂x`` is
    built once with ``create_graph=True``; it is linear in ``u``, so a backward pass through it
    with a source tangent ``v`` gives ``J v`` at every hook at once (the double-backward trick),
    and with an origin's value the constant of that origin. Same interface as :class:`Replay`
    (``run``, ``origins``); ``start > 0`` is not supported (full-length columns)."""

    def __init__(self, stack: contextlib.ExitStack, model: Any, tokens: Tensor, source: str,
                 hooks: Sequence[str], tgt: Sequence[int]):
        lm = _lm()
        self.hooks, self.n = list(hooks), tokens.shape[1]
        stack.enter_context(lm._flags_for(model, [h for h in (*hooks, source) if h != LOGITS]))
        stack.enter_context(_params_frozen(model))
        biases = stack.enter_context(lm._bias_grads(model))
        stack.enter_context(detached(model))
        hs = stack.enter_context(HookSet(model))
        cap = lm._Capture()
        cap.add_leaves(model, hs, source)
        acts: dict[str, Tensor] = {}
        cuts = cut_hooks(model)
        for h in hooks:
            hs.add(h, lambda t, hook: acts.__setitem__(hook.name, t), prepend=h in cuts)
        stack.enter_context(torch.enable_grad())
        if all(h.startswith("blocks.") for h in hooks) and not is_bridge(model):
            model(tokens, stop_at_layer=max(_layer_of(model, h) for h in hooks) + 1)
        else:
            model(tokens)
        missing = set(hooks) - acts.keys()
        if "source" not in cap.leaves or missing:
            raise ValueError(f"hooks did not fire: {sorted(missing) or [source]}")
        self.x, self.acts = cap.leaves["source"], acts
        pos = list(tgt)
        parts = [acts[h][0, pos].reshape(-1) for h in hooks]
        self.sizes = [p.numel() for p in parts]
        self.widths = [acts[h][0, 0].numel() for h in hooks]
        y = torch.cat(parts)
        self.u0 = torch.zeros_like(y, requires_grad=True)
        self.leaves = {"source": self.x,
                       **{k: v for k, v in cap.leaves.items() if k != "source"}, **biases}
        grads = torch.autograd.grad(y, list(self.leaves.values()), self.u0, create_graph=True,
                                    allow_unused=True)
        self.g = dict(zip(self.leaves, grads, strict=True))
        self.chunk = memory.preferred_chunk(self.n)

    def _split(self, Y: Tensor) -> dict[str, Tensor]:  # [B, ΣY] → {hook: [B, n_t, d]}
        out = {}
        for h, part, w in zip(self.hooks, Y.split(self.sizes, dim=1), self.widths, strict=True):
            out[h] = part.reshape(Y.shape[0], -1, w)
        return out

    def run(self, tangent: Tensor | None, origin: str | None = None,
            readout_input: bool = False, start: int = 0) -> dict[str, Tensor]:
        if start or readout_input:
            raise ReplayUnsupported("graph columns are full-length and hook-only")
        if tangent is None:  # the constant of one origin: J_origin · its value
            name, T = origin, self.leaves[origin].detach()[None]
        else:
            name, T = "source", tangent.reshape(-1, *self.x.shape)
        g = self.g[name]
        if g is None or not g.requires_grad:  # the leaf does not reach the targets
            return self._split(self.u0.new_zeros(len(T), self.u0.numel()))
        return self._split(_lm().batched_grad(g, self.u0, T, chunk=self.chunk))

    def origins(self) -> list[str]:
        return [k for k, v in self.leaves.items()
                if k != "source" and bool(v.detach().ne(0).any())]


def _forward_columns(model, tokens, hooks, tgt, source, chunk_size, progress, max_memory,
                     int_pos, replay, x, acts) -> dict[str, LinearMap]:
    n = tokens.shape[1]
    x = x.detach()
    d_in = x[0, 0].numel()
    n_cols_src = max(tgt) + 1  # causal: later source tokens have no effect
    dtype = x.dtype
    d_out = {h: acts[h][0, 0].numel() for h in hooks}
    isz = memory.itemsize(dtype)
    need_J = sum(len(tgt) * n * d_out[h] * d_in * isz for h in hooks)
    need = need_J + memory.graph_bytes(model, n, dtype)
    b = memory.check(need, f"the operators at {len(hooks)} hooks ({len(tgt)} position(s), "
                     f"{n} source tokens)", max_memory)
    chunk = chunk_size or memory.choose_chunk(model, n, dtype, b - need, DEFAULT_FWD_CHUNK,
                                              n_cols_src * d_in)
    Js = {h: torch.zeros(len(tgt), n, d_out[h], d_in, dtype=dtype, device=x.device)
          for h in hooks}
    total = n_cols_src * d_in
    origins = replay.origins()
    bar = progress_bar(total + len(origins), f"forward mode ({len(hooks)} hooks)", progress,
                       unit="col")
    try:
        # Columns of source token s only reach positions ≥ s (causal), so each token's columns
        # are replayed on positions s: only — about half the work of full-length replays.
        tgt_t = torch.tensor(tgt)
        for s in range(n_cols_src):
            rows_t = (tgt_t >= s).nonzero().flatten()  # target rows this token reaches
            for i0 in range(0, d_in, chunk):
                i1 = min(d_in, i0 + chunk)
                B = i1 - i0
                V = torch.zeros(B, n - s, d_in, dtype=dtype, device=x.device)
                V[torch.arange(B), 0, torch.arange(i0, i1)] = 1
                try:
                    out = replay.run(V.view(B, n - s, *x.shape[2:]), start=s)
                except ReplayUnsupported:  # a frozen value we cannot slice: full length
                    Vf = torch.zeros(B, n, d_in, dtype=dtype, device=x.device)
                    Vf[:, s:] = V
                    out = replay.run(Vf.view(B, n, *x.shape[2:]))
                    out = {h: o[:, rows_t] for h, o in out.items()}
                for h in hooks:
                    Js[h][rows_t, s, :, i0:i1] = out[h].permute(1, 2, 0)
                bar.update(B)
        consts: dict[str, dict[str, Tensor]] = {h: {} for h in hooks}
        for o in origins:
            out = replay.run(None, origin=o)
            for h in hooks:
                v = out[h][0]
                if bool(v.ne(0).any()):
                    consts[h][o] = v
            bar.update(1)
    finally:
        bar.close()
    x2 = x[0].reshape(n, -1)
    res = {}
    for h in hooks:
        act = acts[h].detach()
        res[h] = LinearMap(J=Js[h], x=x2, act=act[0, tgt].reshape(len(tgt), -1),
                           constants=consts[h], hook=h, source=source, positions=tgt,
                           out_shape=tuple(act.shape[2:]), tokens=tokens[0].detach().cpu(),
                           detached=True, int_pos=int_pos)
    return res


def choose_engine(model: Any, n_tokens: int, tgt: Sequence[int], hooks: Sequence[str],
                  d_out: dict[str, int] | None = None, d_in: int | None = None) -> str:
    """``"forward"`` when the replay's column count beats the VJPs' row count (cost model in the
    module docstring), else ``"reverse"``."""
    if is_bridge(model) or LOGITS in hooks:
        return "reverse"
    d_in = d_in or int(model.cfg.d_model)
    dm = int(model.cfg.d_model)
    rows = sum(len(tgt) * (d_out or {}).get(h, dm) * _depth(model, h) for h in hooks)
    # token s's columns are replayed on positions s: only
    full_len = sum((n_tokens - s) / n_tokens for s in range(max(tgt) + 1))
    cols = REPLAY_COST * full_len * d_in * max(_depth(model, h) for h in hooks)
    return "forward" if cols < rows else "reverse"


def operators_at_hooks(model: Any, tokens: Any, hooks: Sequence[str], pos: Any = -1, *,
                       source: str = "hook_embed", engine: str = "auto",
                       chunk_size: int | None = None, progress: bool | None = None,
                       check: bool = True, tol: float | None = None,
                       max_memory: Any = None) -> dict[str, LinearMap]:
    """The exact detached linear map at every hook in ``hooks`` (e.g. the layer sweep: every
    ``resid_post``, ``attn_out`` and ``mlp_out``) for one input.

    Each value is a :class:`LinearMap` exactly as ``linear_map(model, tokens, hook, pos,
    source=source)`` would return it (``J``, ``x``, ``act``, per-origin ``constants``; its
    ``relative_error`` is checked against ``tol`` when ``check``). ``engine``: ``"forward"`` (one
    replay gives every hook's columns), ``"reverse"`` (VJP rows, hook by hook), or ``"auto"``.
    ``meta["engine"]`` records which engine produced each map.
    """
    lm = _lm()
    if engine not in ("auto", "reverse", "forward"):
        raise ValueError(f"engine must be 'auto', 'reverse' or 'forward' here, got {engine!r}")
    tokens = lm.to_tokens(model, tokens)
    hooks = list(dict.fromkeys(hooks))
    if not hooks:
        raise ValueError("no hooks given")
    lm._check_target(model, source, "source")
    for h in hooks:
        lm._check_target(model, h, "target")
        if h == source:
            raise ValueError(f"source and target hook are the same: {h!r}")
    canon = {h: h if h == LOGITS else (resolve_hook(model, h).name or h) for h in hooks}
    n = tokens.shape[1]
    tgt = lm._positions(pos, n)
    int_pos = isinstance(pos, int)
    chosen = engine
    if engine == "auto":
        chosen = choose_engine(model, n, tgt, hooks)
    if chosen == "forward":
        try:
            res = _forward_maps(model, tokens, [canon[h] for h in hooks], tgt, source, chunk_size,
                                progress, max_memory, int_pos)
            out = {h: res[canon[h]] for h in hooks}
        except ReplayUnsupported:
            if engine == "forward":
                raise
            chosen = "reverse"
        else:
            if check:
                dt = next(iter(out.values())).act.dtype
                bound = tol if tol is not None else default_tolerance(dt)
                for m in out.values():
                    if not m.relative_error <= bound:
                        raise NotExactError(m, bound)
            return out
    out = {}
    with memory.memory_budget(max_memory) if max_memory is not None else contextlib.nullcontext():
        for h in hooks:
            m = lm.linear_map(model, tokens, h, pos, source=source, engine="reverse",
                              chunk_size=chunk_size, progress=progress, check=check, tol=tol)
            m.meta["engine"] = "reverse"
            out[h] = m
    return out


def layer_sweep_hooks(model: Any, kinds: Sequence[str] = ("resid_post", "attn_out", "mlp_out")
                      ) -> list[str]:
    """``blocks.L.hook_<kind>`` for every layer and kind that the model has."""
    return [f"blocks.{layer}.hook_{k}" for layer in range(int(model.cfg.n_layers)) for k in kinds
            if f"blocks.{layer}.hook_{k}" in model.hook_dict]


# -- linear_map dispatch -------------------------------------------------------------------------

def linear_map_with_engine(model: Any, inputs: Any, hook: str, pos: Any, engine: str,
                           max_memory: Any, **kw: Any) -> LinearMap:
    """``linear_map`` with ``engine`` and ``max_memory``: preflight, then the chosen engine."""
    lm = _lm()
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "matrix_free":
        raise ValueError("the matrix-free engine never forms J; call "
                         "lin_lens.engines.top_singular(model, tokens, hook, pos, k=...) for the "
                         "top singular triplets instead")
    plain = (kw.get("direction") is None and kw.get("out_index") is None
             and kw.get("head") is None and kw.get("detach", True) and hook != LOGITS
             and hook != kw.get("source", "hook_embed"))
    tokens = lm.to_tokens(model, inputs, kw.pop("prepend_bos", None))
    n = tokens.shape[1]
    if engine == "forward" and not plain:
        raise ValueError("engine='forward' supports plain maps only (no direction=, out_index=, "
                         "head=, detach=False, or 'logits'); use engine='reverse'")
    if engine == "forward" or (engine == "auto" and plain and choose_engine(
            model, n, lm._positions(pos, n), [hook]) == "forward"):
        # "auto" lets operators_at_hooks fall back to reverse mode where replay has no rule
        return operators_at_hooks(model, tokens, [hook], pos, source=kw.get("source", "hook_embed"),
                                  engine=engine, chunk_size=kw.get("chunk_size"),
                                  progress=kw.get("progress"), check=kw.get("check", True),
                                  tol=kw.get("tol"), max_memory=max_memory)[hook]
    _preflight_reverse(model, tokens, hook, pos, max_memory, kw)
    with memory.memory_budget(max_memory) if max_memory is not None else contextlib.nullcontext():
        return lm.linear_map(model, tokens, hook, pos, engine="reverse", **kw)


def _preflight_reverse(model: Any, tokens: Tensor, hook: str, pos: Any, max_memory: Any,
                       kw: dict) -> None:
    lm = _lm()
    n = tokens.shape[1]
    n_t = len(lm._positions(pos, n))
    dtype = lm._dtype(model)
    dm = int(model.cfg.d_model)
    src = kw.get("source", "hook_embed")
    d_in = dm if src in ("hook_embed", "hook_pos_embed") or "resid" in src else dm
    if kw.get("direction") is not None:
        d_act = d_out = 1
    elif hook == LOGITS:
        d_act = dm
        oi = kw.get("out_index")
        d_out = int(model.cfg.d_vocab) if oi is None else len(torch.as_tensor(oi).reshape(-1))
        d_act = min(d_act, d_out) if oi is not None else d_act
    else:
        d_act = d_out = dm if "hook_mlp_out" in hook or "resid" in hook or "attn_out" in hook \
            else _hook_width(model, hook)
    est = memory.estimate_linear_map(model, n, n_t, d_act, d_out, d_in, dtype, 16)
    memory.check(est["total"], f"linear_map at {hook!r} ({n_t} position(s) × {n} tokens, "
                 f"J {n_t}×{n}×{d_out}×{d_in})", max_memory)


def _hook_width(model: Any, hook: str) -> int:
    cfg = model.cfg
    leaf = hook.rsplit(".", 1)[-1]
    if leaf in ("hook_pre", "hook_post", "hook_pre_linear", "hook_mid"):
        return int(cfg.d_mlp)
    if leaf in ("hook_q", "hook_z"):
        return int(cfg.n_heads * cfg.d_head)
    if leaf in ("hook_k", "hook_v"):
        return int((getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * cfg.d_head)
    if leaf == "hook_result":
        return int(cfg.n_heads * cfg.d_model)
    return int(cfg.d_model)


# -- matrix-free top-k SVD -----------------------------------------------------------------------

class TopSingular:
    """``U`` [d_out, k], ``S`` [k], ``V`` [n_src, d_in, k] (``V[..., j]`` reshaped to the source
    activation) and ``info``; unpacks as ``U, S, V``.

    ``info``: ``residuals`` ‖Jᵀu_j − σ_j v_j‖ (a true singular value lies within it of σ_j;
    ``Jv_j = σ_j u_j`` holds exactly), ``rel_residuals`` (residual / σ_j), ``bound_quadratic``
    (residual² / gap to the nearest other Ritz value, the usual sharper estimate) and
    ``rel_error_estimate`` (that over σ_j, what ``tol`` bounds), ``n_jvp``, ``n_vjp``,
    ``iterations``, ``converged``, ``block``, ``guard``, ``history`` (per iteration), ``seconds``.
    """

    def __init__(self, U: Tensor, S: Tensor, V: Tensor, info: dict[str, Any]):
        self.U, self.S, self.V, self.info = U, S, V, info

    def __iter__(self):
        return iter((self.U, self.S, self.V))

    def _repr_html_(self) -> str:
        i = self.info
        rows = "".join(
            f"<tr><td>{j + 1}</td><td>{float(s):.6g}</td><td>{r:.1e}</td><td>{e:.1e}</td></tr>"
            for j, (s, r, e) in enumerate(zip(self.S, i["rel_residuals"],
                                              i.get("rel_error_estimate", i["rel_residuals"]),
                                              strict=True)))
        return (f"<b>top {len(self.S)} singular triplets</b> of the detached operator at "
                f"<code>{i.get('hook')}</code>, position {i.get('position')}: "
                f"{i['n_jvp']} JVPs + {i['n_vjp']} VJPs, converged {i['converged']}, "
                f"{i.get('seconds', float('nan')):.1f} s<table><tr><th>j</th><th>σ</th>"
                f"<th>residual / σ</th><th>σ error estimate / σ</th></tr>{rows}</table>")

    def __repr__(self) -> str:
        return (f"TopSingular(k={len(self.S)}, σ₁={float(self.S[0]):.4g}, "
                f"max rel residual {max(self.info['rel_residuals']):.2e}, "
                f"{self.info['n_jvp']} JVPs + {self.info['n_vjp']} VJPs)")


def _orth(W: Tensor, bases: list[Tensor]) -> Tensor:
    """Orthonormal basis of the part of ``W`` orthogonal to every block in ``bases``; columns
    that were (numerically) already in their span are dropped, so the result may be narrower."""
    scale = float(torch.linalg.vector_norm(W, dim=0).max()) if W.numel() else 0.0
    if scale == 0.0:
        return W[:, :0]
    for _ in range(2):  # classical Gram–Schmidt twice, against every earlier block
        for Q in bases:
            W = W - Q @ (Q.T @ W)
    Q, R = torch.linalg.qr(W)
    keep = R.diagonal().abs() > 1e3 * torch.finfo(W.dtype).eps * scale
    Q = Q[:, keep]
    for Qb in bases:  # once more after dropping, for orthogonality to working precision
        Q = Q - Qb @ (Qb.T @ Q)
    return torch.linalg.qr(Q)[0] if Q.shape[1] else Q


def top_singular(model: Any, tokens: Any, hook: str = LOGITS, pos: int = -1, k: int = 16, *,
                 source: str = "hook_embed", block: int | None = None, tol: float = 1e-4,
                 vec_tol: float | None = None, guard: int | None = None,
                 max_iter: int | None = None, seed: int = 0,
                 progress: bool | None = None, max_memory: Any = None) -> TopSingular:
    """Top-``k`` singular triplets of the detached operator at ``hook``/``pos`` (all source
    tokens stacked: ``J`` is ``[d_out, n_src·d_in]``) without forming ``J``.

    Block Golub–Kahan–Lanczos with full reorthogonalisation; each iteration costs ``block``
    JVPs and ``block`` VJPs. The default is single-vector Lanczos (``block=1``, the fewest
    products: 41 + 41 for the top 16 on SmolLM2 at 256 tokens, against 112 + 112 with
    ``block=16``) from 32 tokens on, and ``min(k, 8)`` below, where batched products are several
    times cheaper per vector. Pass ``block ≥`` the multiplicity when singular values may repeat
    exactly. Both come from one retained detached graph: VJPs
    are batched backward passes, and JVPs are batched backward passes through the graph of the
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
    import time

    lm = _lm()
    tokens = lm.to_tokens(model, tokens)
    if not isinstance(pos, int):
        raise TypeError("top_singular takes one int position")
    lm._check_target(model, source, "source")
    lm._check_target(model, hook, "target")
    n = tokens.shape[1]
    block = int(block or (1 if n >= 32 else min(k, 8)))
    guard = max(2, k // 4) if guard is None else int(guard)
    vec_tol = math.sqrt(tol) if vec_tol is None else vec_tol
    p = lm._positions(pos, n)[0]
    t0 = time.perf_counter()
    dtype = lm._dtype(model)
    m_max = max_iter or math.ceil((6 * k + 32) / block)
    d_model = int(model.cfg.d_model)
    vec_bytes = (p + 1) * d_model * memory.itemsize(dtype)  # one vector in the source space
    need = memory.graph_bytes(model, n, dtype) + vec_bytes * block * (4 + 2 * m_max)
    memory.check(need, f"matrix-free SVD at {n} tokens", max_memory,
                 hint="Use fewer tokens, a smaller k/max_iter, or raise max_memory.")
    hk = hook if hook == LOGITS else (resolve_hook(model, hook).name or hook)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_params_frozen(model))
        x, acts = _run_primal(stack, model, tokens, source, [hk], None, grad=True)
        stack.enter_context(torch.enable_grad())
        y = acts[hk].reshape(1, n, -1)[0, p]
        if hk == LOGITS:  # the readout is linear given the frozen soft-cap gate
            W_U = model.W_U.detach()
            b_U = getattr(model, "b_U", None)
            z = y.detach() @ W_U + (0 if b_U is None else b_U.detach())
            cap = getattr(model.cfg, "output_logits_soft_cap", None)
            y = y @ W_U
            if cap and cap > 0:
                y = y * softcap_gate(z, cap)
        d_in = x[0, 0].numel()
        N = (p + 1) * d_in
        d_space = y.shape[-1]
        # Jᵀu as a differentiable function of a dummy u: linear in u, so its VJP is J.
        u0 = torch.zeros_like(y, requires_grad=True)
        JTu, = torch.autograd.grad(y, x, u0, create_graph=True)

        chunk = memory.preferred_chunk(n)

        def vjp(Ub: Tensor) -> Tensor:  # [d_out, b] → [N, b]
            gx = lm.batched_grad(y, x, Ub.T.contiguous(), chunk=chunk)
            return gx.reshape(Ub.shape[1], n * d_in)[:, :N].T

        def jvp(Vb: Tensor) -> Tensor:  # [N, b] → [d_out, b]
            T = Vb.new_zeros(Vb.shape[1], n * d_in)
            T[:, :N] = Vb.T
            return lm.batched_grad(JTu, u0, T.view(-1, *x.shape), chunk=chunk).T

        res_k = _block_lanczos(jvp, vjp, N, d_space, k, block, tol, vec_tol, m_max, seed,
                               dtype, progress, guard)
    U, S_k, right, info = res_k
    Vfull = torch.zeros(n * d_in, right.shape[1], dtype=dtype)
    Vfull[:N] = right
    info.update(block=block, tol=tol, vec_tol=vec_tol, guard=guard,
                seconds=time.perf_counter() - t0, hook=hook, position=p)
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
                   progress: bool | None, guard: int = 0
                   ) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
    """Block Golub–Kahan–Lanczos for ``J`` given as ``jvp``/``vjp`` on blocks of columns:
    ``(U [d_out, k], S [k], V [N, k], info)``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Vj = torch.linalg.qr(torch.randn(N, block, generator=gen, dtype=dtype))[0]
    Vs: list[Tensor] = []
    JVs: list[Tensor] = []
    Us: list[Tensor] = []
    JTUs: list[Tensor] = []
    history: list[dict[str, float]] = []
    n_jvp = n_vjp = it = 0
    converged = complete = exhausted = False
    bar = progress_bar(m_max, f"matrix-free top-{k}", progress, unit="it")
    try:
        for it in range(m_max):  # noqa: B007 (reported in info)
            rem = d_space - sum(u.shape[1] for u in Us)
            Vj = Vj[:, :rem]
            if Vj.shape[1] == 0:
                exhausted = True
                break
            W = jvp(Vj)
            n_jvp += Vj.shape[1]
            Vs.append(Vj)
            JVs.append(W)
            Uj = _orth(W, Us)
            if Uj.shape[1]:
                Z = vjp(Uj)
                n_vjp += Uj.shape[1]
                Us.append(Uj)
                JTUs.append(Z)
            Ucat, Vcat = torch.cat(Us, 1), torch.cat(Vs, 1)
            complete = Ucat.shape[1] >= d_space
            exhausted = not Uj.shape[1]  # J·V_j ⊆ span(U): U holds the range J reaches
            if complete or exhausted:  # Uᵀ J (from the VJPs) is J restricted to span(U)
                P, S, Qh = torch.linalg.svd(torch.cat(JTUs, 1).T, full_matrices=False)
                kk = min(k, len(S))
                right = Qh[:kk].T
                res = torch.linalg.vector_norm(jvp(right) - Ucat @ P[:, :kk] * S[:kk], dim=0)
                n_jvp += kk
                converged = complete or bool((res <= tol * S[:kk]).all())
                bar.update(1)
                break
            P, S, Qh = torch.linalg.svd(Ucat.T @ torch.cat(JVs, 1), full_matrices=False)
            kk, kg = min(k, len(S)), min(k + guard, len(S))
            right = Vcat @ Qh[:kg].T
            res = torch.linalg.vector_norm(torch.cat(JTUs, 1) @ P[:, :kg] - right * S[:kg], dim=0)
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
            Vj = _orth(Z, Vs)
    finally:
        bar.close()
    S_k = S[:kk]
    quad = _ritz_errors(S, res)
    info = dict(residuals=res.tolist(), rel_residuals=(res / S_k).tolist(),
                bound_quadratic=quad.tolist(), rel_error_estimate=(quad / S_k).tolist(),
                n_jvp=n_jvp, n_vjp=n_vjp, iterations=it + 1, converged=converged,
                output_space_complete=complete, krylov_exhausted=exhausted, history=history)
    return Ucat @ P[:, :kk], S_k, right, info
