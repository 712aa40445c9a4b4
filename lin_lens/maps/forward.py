"""Forward mode: the operators at many hooks from one set of columns (the layer sweep).

Columns come from the replay of the frozen network (:mod:`.replay`, both backends) or, where
the replay has no rule (SoLU, mixtures of experts), from :class:`GraphColumns`: the
double-backward of the detached graph, every hook at once as well, at about a VJP per column
(more with many hooks) and without the causal truncation. Cost ∝ columns = n_src · d_in,
(nearly) independent of the number of hooks.

``choose_engine`` picks forward when ``cost × columns × depth`` is below ``Σ rows × depth``, with
``REPLAY_COST`` for the replay (a full frozen forward per column, the Q/K and gate projections at
zero width or skipped, :mod:`.replay_plan`, but no autograd bookkeeping) and ``GRAPH_COST``
for graph columns (the measured ratios are in BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lin_lens._tl import LOGITS, hook_dict
from lin_lens.maps import budget
from lin_lens.maps.columns import open_columns
from lin_lens.maps.replay import Replay, ReplayUnsupported, layer_of, replays
from lin_lens.maps.request import MapRequest
from lin_lens.maps.result import LinearMap
from lin_lens.progress import progress_bar

REPLAY_COST = 1.1  # replay cost per column / VJP cost per row (BENCHMARKS.md)
# graph columns: cost per full-length column / VJP cost per row, at the deepest hook's
# depth, growing with the hooks stacked into the graph (SmolLM2 Bridge, 8 tokens: 18 and 90
# sweep hooks; BENCHMARKS.md, "TransformerBridge")
GRAPH_COST, GRAPH_COST_PER_HOOK = 0.92, 0.005
DEFAULT_FWD_CHUNK = 192  # columns per replay, at least
FWD_PASS_TOKENS = 4096  # columns × positions per replay at short inputs (BENCHMARKS.md)


def _depth(model: Any, hook: str) -> float:
    return (layer_of(model, hook) + 1) / int(model.cfg.n_layers)


def forward_maps(model: Any, req: MapRequest, hooks: list[str]) -> dict[str, LinearMap]:
    """The detached map at every (canonical) hook in ``hooks`` for ``req``'s tokens, source and
    positions, by columns; ``meta["engine"]`` says which column source ran."""
    with contextlib.ExitStack() as stack:
        replay, x, acts = open_columns(stack, model, req.tokens, req.source, hooks,
                                       req.positions)
        res = _columns(model, req, hooks, replay, x, acts)
        for m in res.values():
            m.meta["engine"] = "forward" if isinstance(replay, Replay) else "forward (graph)"
        return res


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
    if LOGITS in hooks:
        return "reverse"
    d_in = d_in or int(model.cfg.d_model)
    dm = int(model.cfg.d_model)
    rows = sum(len(tgt) * (d_out or {}).get(h, dm) * _depth(model, h) for h in hooks)
    depth = max(_depth(model, h) for h in hooks)
    if not replays(model):  # graph columns: every source token, full length
        per = GRAPH_COST + GRAPH_COST_PER_HOOK * len(set(hooks))
        cols = per * (max(tgt) + 1) * d_in * depth
    else:  # token s's columns are replayed on positions s: only
        full_len = sum((n_tokens - s) / n_tokens for s in range(max(tgt) + 1))
        cols = REPLAY_COST * full_len * d_in * depth
    return "forward" if cols < rows else "reverse"


def layer_sweep_hooks(model: Any, kinds: Sequence[str] = ("resid_post", "attn_out", "mlp_out")
                      ) -> list[str]:
    """``blocks.L.hook_<kind>`` for every layer and kind that the model has."""
    return [f"blocks.{layer}.hook_{k}" for layer in range(int(model.cfg.n_layers)) for k in kinds
            if f"blocks.{layer}.hook_{k}" in hook_dict(model)]
