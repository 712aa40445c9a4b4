"""Forward mode: the operators at many hooks from one set of columns (the layer sweep).

Columns come from the replay of the frozen network (:mod:`.replay`, HookedTransformer) or, where
the replay has no rule (Bridges, SoLU), from :class:`GraphColumns`: the double-backward of the
detached graph, every hook at once as well, at the cost of a VJP per column and without the causal
truncation. Cost ∝ columns = n_src · d_in, independent of the number of hooks.

``choose_engine`` picks forward when ``REPLAY_COST × columns × depth`` is below ``Σ rows × depth``:
the replay runs a full frozen forward per column (the Q/K and gate projections at zero width where
TransformerLens allows it, :class:`~lin_lens.maps.replay.Replay`) but needs no autograd
bookkeeping (the measured cost ratio is in BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lin_lens._tl import LOGITS, is_bridge
from lin_lens.maps import budget
from lin_lens.maps.graph import batched_grad, detached_forward
from lin_lens.maps.replay import Replay, ReplayUnsupported, layer_of
from lin_lens.maps.request import MapRequest
from lin_lens.maps.result import LinearMap
from lin_lens.progress import progress_bar

REPLAY_COST = 1.1  # replay cost per column / VJP cost per row (BENCHMARKS.md)
DEFAULT_FWD_CHUNK = 192  # columns per replay, at least
FWD_PASS_TOKENS = 4096  # columns × positions per replay at short inputs (BENCHMARKS.md)


def _depth(model: Any, hook: str) -> float:
    return (layer_of(model, hook) + 1) / int(model.cfg.n_layers)


def forward_maps(model: Any, req: MapRequest, hooks: list[str]) -> dict[str, LinearMap]:
    """The detached map at every (canonical) hook in ``hooks`` for ``req``'s tokens, source and
    positions, by columns; ``meta["engine"]`` says which column source ran."""
    with contextlib.ExitStack() as stack:
        try:
            replay: Any = Replay(model, req.tokens, req.source, hooks, req.positions)
        except ReplayUnsupported:  # Bridges, SoLU: columns from the reverse graph instead
            replay = GraphColumns(stack, model, req.tokens, req.source, hooks, req.positions)
            x, acts = replay.x, replay.acts
        else:
            fwd = detached_forward(stack, model, req.tokens, req.source, hooks, grad=False,
                                   record=replay.recorder)
            x, acts = fwd.x, fwd.acts
        res = _columns(model, req, hooks, replay, x, acts)
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
        self.hooks, self.n = list(hooks), tokens.shape[1]
        fwd = detached_forward(stack, model, tokens, source, hooks, constants=True)
        stack.enter_context(torch.enable_grad())
        self.x, self.acts = fwd.x, fwd.acts
        pos = list(tgt)
        parts = [self.acts[h][0, pos].reshape(-1) for h in hooks]
        self.sizes = [p.numel() for p in parts]
        self.widths = [self.acts[h][0, 0].numel() for h in hooks]
        y = torch.cat(parts)
        self.u0 = torch.zeros_like(y, requires_grad=True)
        self.leaves = {"source": self.x, **fwd.constant_leaves()}
        grads = torch.autograd.grad(y, list(self.leaves.values()), self.u0, create_graph=True,
                                    allow_unused=True)
        self.g = dict(zip(self.leaves, grads, strict=True))
        self.chunk = budget.preferred_chunk(self.n)

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
            assert origin is not None
            name, T = origin, self.leaves[origin].detach()[None]
        else:
            name, T = "source", tangent.reshape(-1, *self.x.shape)
        g = self.g[name]
        if g is None or not g.requires_grad:  # the leaf does not reach the targets
            return self._split(self.u0.new_zeros(len(T), self.u0.numel()))
        return self._split(batched_grad(g, self.u0, T, chunk=self.chunk))

    def origins(self) -> list[str]:
        return [k for k, v in self.leaves.items()
                if k != "source" and bool(v.detach().ne(0).any())]


def _columns(model: Any, req: MapRequest, hooks: list[str], replay: Any, x: Tensor,
             acts: dict[str, Tensor]) -> dict[str, LinearMap]:
    """Fill every hook's J column by column (and each origin's constant) from ``replay``."""
    tokens, tgt, source = req.tokens, req.positions, req.source
    n = tokens.shape[1]
    x = x.detach()
    d_in = x[0, 0].numel()
    n_cols_src = max(tgt) + 1  # causal: later source tokens have no effect
    dtype = x.dtype
    d_out = {h: acts[h][0, 0].numel() for h in hooks}
    isz = budget.itemsize(dtype)
    need_J = sum(len(tgt) * n * d_out[h] * d_in * isz for h in hooks)
    need = need_J + budget.graph_bytes(model, n, dtype)
    b = budget.check(need, f"the operators at {len(hooks)} hooks ({len(tgt)} position(s), "
                     f"{n} source tokens)", req.max_memory, device=x.device)
    # short inputs: a source token's columns in one replay (fewer, larger matmuls)
    preferred = max(DEFAULT_FWD_CHUNK, FWD_PASS_TOKENS // n)
    chunk = req.chunk_size or budget.choose_chunk(model, n, dtype, b - need, preferred,
                                                  n_cols_src * d_in, cap=preferred)
    Js = {h: torch.zeros(len(tgt), n, d_out[h], d_in, dtype=dtype, device=x.device)
          for h in hooks}
    total = n_cols_src * d_in
    origins = replay.origins()
    bar = progress_bar(total + len(origins), f"forward mode ({len(hooks)} hooks)", req.progress,
                       unit="col")
    try:
        # Columns of source token s only reach positions ≥ s (causal), so each token's columns
        # are replayed on positions s: only — about half the work of full-length replays.
        tgt_t = torch.tensor(tgt, device=x.device)
        for s in range(n_cols_src):
            rows_t = (tgt_t >= s).nonzero().flatten()  # target rows this token reaches
            for i0 in range(0, d_in, chunk):
                i1 = min(d_in, i0 + chunk)
                B = i1 - i0
                V = torch.zeros(B, n - s, d_in, dtype=dtype, device=x.device)
                cols = torch.arange(i0, i1, device=x.device)
                V[cols - i0, 0, cols] = 1
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
                           detached=True, int_pos=req.int_pos)
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


def layer_sweep_hooks(model: Any, kinds: Sequence[str] = ("resid_post", "attn_out", "mlp_out")
                      ) -> list[str]:
    """``blocks.L.hook_<kind>`` for every layer and kind that the model has."""
    return [f"blocks.{layer}.hook_{k}" for layer in range(int(model.cfg.n_layers)) for k in kinds
            if f"blocks.{layer}.hook_{k}" in model.hook_dict]
