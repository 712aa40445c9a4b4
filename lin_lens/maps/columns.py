"""Columns of the detached network: its response to source tangents, at many hooks at once.

Two engines give the same columns: the forward-mode replay of the frozen network
(:class:`~lin_lens.maps.replay.Replay`: plain batched forwards, no autograd) and
:class:`GraphColumns` (the double-backward of the detached graph: SoLU, mixtures of experts and
whatever else the replay has no rule for). :func:`open_columns` picks one. On top of them,
:func:`token_parts` splits activations exactly into the part of each source token (through all
paths: ``J_i x_i``, one tangent per token instead of one backward pass per output row) and the
constant of each origin (bias, positional embedding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lin_lens._numeric import relative_error
from lin_lens._tl import canonical
from lin_lens.maps import budget
from lin_lens.maps.graph import batched_grad, detached_forward
from lin_lens.maps.replay import Replay, ReplayUnsupported
from lin_lens.progress import progress_bar


def open_columns(stack: contextlib.ExitStack, model: Any, tokens: Tensor, source: str,
                 hooks: Sequence[str], positions: Sequence[int]) -> tuple[Any, Tensor,
                                                                        dict[str, Tensor]]:
    """``(engine, source value [1, n, ...], activations {hook: [1, n, ...]})`` for the canonical
    ``hooks``; the engine's ``run(tangent)`` gives the columns at ``positions``, its
    ``run(None, origin=o)`` each origin's constant. The replay where it applies, else the graph."""
    try:
        replay: Any = Replay(model, tokens, source, hooks, positions)
    except ReplayUnsupported:  # SoLU, experts: columns from the reverse graph instead
        cols = GraphColumns(stack, model, tokens, source, hooks, positions)
        return cols, cols.x, cols.acts
    fwd = detached_forward(stack, model, tokens, source, hooks, grad=False,
                           record=replay.recorder)
    return replay, fwd.x, fwd.acts


class GraphColumns:
    """Operator columns at many hooks from one detached graph, for models the replay cannot
    follow (SoLU, mixtures of experts): with ``y`` the target activations stacked,
    ``g(u) = ∂(u·y)/∂x`` is built once with ``create_graph=True``; it is linear in ``u``, so a
    backward pass through it with a source tangent ``v`` gives ``J v`` at every hook at once (the
    double-backward trick), and with an origin's value the constant of that origin. Same
    interface as :class:`Replay` (``run``, ``origins``); ``start > 0`` is not supported
    (full-length columns)."""

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
        self.y = y
        self.u0 = torch.zeros_like(y, requires_grad=True)
        self.leaves = {"source": self.x, **fwd.constant_leaves()}
        self.g: dict[str, Tensor | None] = {}  # built per leaf on first use (create_graph)
        self.chunk = budget.preferred_chunk(self.n)

    def _g(self, name: str) -> Tensor | None:
        """``∂(u·y)/∂leaf`` with its graph, linear in ``u``; None where the leaf does not
        reach the targets (autograd then runs nothing)."""
        if name not in self.g:
            self.g[name], = torch.autograd.grad(self.y, self.leaves[name], self.u0,
                                                create_graph=True, allow_unused=True)
        return self.g[name]

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
        g = self._g(name)
        if g is None or not g.requires_grad:  # the leaf does not reach the targets
            return self._split(self.u0.new_zeros(len(T), self.u0.numel()))
        return self._split(batched_grad(g, self.u0, T, chunk=self.chunk))

    def origins(self) -> list[str]:
        return [k for k, v in self.leaves.items()
                if k != "source" and bool(v.detach().ne(0).any())]


@dataclass
class Parts:
    """Exact additive parts of activations for one input: ``act[h] = Σ_i tokens[h][i] +
    Σ_o constants[h][o]`` at ``positions``, with ``tokens[h][i] = J_i x_i`` the part of source
    token ``i`` (through all paths) and ``constants[h][o]`` the part of origin ``o`` (a bias
    parameter, ``hook_pos_embed``)."""

    positions: list[int]
    act: dict[str, Float[Tensor, "n_pos d"]]
    tokens: dict[str, Float[Tensor, "n_src n_pos d"]]
    constants: dict[str, dict[str, Float[Tensor, "n_pos d"]]]

    def relative_error(self, hook: str) -> float:
        total = self.tokens[hook].sum(0)
        for c in self.constants[hook].values():
            total = total + c
        return relative_error(self.act[hook], total)


def token_parts(model: Any, tokens: Tensor, hooks: Sequence[str], positions: Sequence[int], *,
                source: str = "hook_embed", chunk: int | None = None,
                progress: bool | None = None, max_memory: Any = None) -> Parts:
    """Every source token's part of the activation at each hook and position, and each
    origin's constant, by forward columns: one tangent per source token (``x_i`` at position
    ``i``) gives its part at every hook at once. Keys are the canonical hook names."""
    hooks = list(dict.fromkeys(canonical(model, h) for h in hooks))
    pos = list(positions)
    with contextlib.ExitStack() as stack:
        cols, x, acts = open_columns(stack, model, tokens, source, hooks, pos)
        x = x.detach()
        n = x.shape[1]
        d_out = {h: acts[h][0, 0].numel() for h in hooks}
        per_tangent = x[0].numel() + sum(len(pos) * d for d in d_out.values())
        need = budget.graph_bytes(model, n, x.dtype) + sum(
            n * len(pos) * d * budget.itemsize(x.dtype) for d in d_out.values())
        free = budget.check(need, f"token parts at {len(hooks)} hook(s) ({n} tokens)",
                            max_memory, device=x.device) - need
        chunk = chunk or max(1, min(n, free // max(1, 4 * per_tangent * x.element_size()),
                                    budget.preferred_chunk(n)))
        parts = {h: x.new_zeros(n, len(pos), d_out[h]) for h in hooks}
        origins = cols.origins()
        bar = progress_bar(n + len(origins), "token parts", progress, unit="tangent")
        try:
            for i0 in range(0, n, chunk):
                idx = torch.arange(i0, min(n, i0 + chunk), device=x.device)
                T = x.new_zeros(len(idx), *x.shape[1:])
                T[torch.arange(len(idx), device=x.device), idx] = x[0, idx]
                out = cols.run(T)
                for h in hooks:
                    parts[h][idx] = out[h].reshape(len(idx), len(pos), -1)
                bar.update(len(idx))
            consts: dict[str, dict[str, Tensor]] = {h: {} for h in hooks}
            for o in origins:
                out = cols.run(None, origin=o)
                for h in hooks:
                    v = out[h].reshape(len(pos), -1)
                    if bool(v.ne(0).any()):
                        consts[h][o] = v
                bar.update(1)
        finally:
            bar.close()
        act = {h: acts[h].detach()[0, pos].reshape(len(pos), -1) for h in hooks}
    return Parts(pos, act, parts, consts)
