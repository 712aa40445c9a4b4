"""Layer sweep: the operator of every layer for one prompt and position, summarised per layer.

Kinds of operator (all exact, all for the same target position):

* ``resid_post`` / ``attn_out`` / ``mlp_out``: cumulative, from the token embeddings
  (``hook_embed``) to ``blocks.L.hook_resid_post`` / ``hook_attn_out`` / ``hook_mlp_out``.
* ``transform``: layer L's own map, ``blocks.L.hook_resid_pre`` → ``blocks.L.hook_resid_post``
  (all source positions).

Per layer and kind we keep: the per-token and stacked stable ranks, the top-k singular values of the
*focus* operator (``focus="stacked"``: ``[d_out, n_src·d_in]``, or a source-token index), its top-k
singular vectors decoded to tokens (output side through the final norm and ``W_U``, input side by
cosine with ``W_E``; see :mod:`lin_lens.decoding`), and the absolute cosines of its top-2 left
(``proj_u``) and right (``proj_v``) singular vectors with those of the final layer's operator of the
same kind (``attn_out`` / ``mlp_out`` are compared with the final ``resid_post``; transforms with
the last layer's transform, whose input space differs per layer, so ``proj_v`` there is only a
cosine between coordinate vectors). Absolute values: singular vectors have a sign ambiguity.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from lin_lens._html import table
from lin_lens._precision import exact_matmul
from lin_lens._tl import model_device, model_dtype
from lin_lens._types import Inputs
from lin_lens.decoding import TokenList, decode_vectors, token_strings
from lin_lens.errors import ArgumentTypeError, InvalidArgumentError, InvalidPositionError
from lin_lens.maps import LinearMap, budget, layer_transforms, operators_at_hooks, to_tokens
from lin_lens.maps.request import as_index, is_int_position, positions
from lin_lens.progress import progress_bar
from lin_lens.spectrum import SVD, map_spectra, stable_rank, svd

KINDS = ("resid_post", "attn_out", "mlp_out", "transform")
_HOOK = {"resid_post": "blocks.{}.hook_resid_post", "attn_out": "blocks.{}.hook_attn_out",
         "mlp_out": "blocks.{}.hook_mlp_out"}


@dataclass
class LayerSweep:
    """Per-layer tables for one prompt and position. Plain data; ``maps`` only with
    ``keep_maps=True``. Tensors are indexed ``[layer index, …]`` (see ``layers``)."""

    tokens: list[str]
    position: int
    layers: list[int]
    kinds: list[str]
    focus: Literal["stacked"] | int
    stable_rank: dict[str, Float[Tensor, "n_layers n_src"]]  # by kind
    stacked_stable_rank: dict[str, Float[Tensor, " n_layers"]]
    S: dict[str, Float[Tensor, "n_layers k"]]
    proj_u: dict[str, Float[Tensor, "n_layers 2 2"]]  # |cos(u_l,i, u_final,j)|
    proj_v: dict[str, Float[Tensor, "n_layers 2 2"]]
    out_tokens: dict[str, list[list[TokenList | None]]]  # kind → layer → k decoded U
    in_tokens: dict[str, list[list[TokenList | None]]]
    relative_error: dict[str, Float[Tensor, " n_layers"]]
    maps: dict[tuple[str, int], LinearMap] | None = None
    meta: dict = field(default_factory=dict)

    def table(self, kind: str = "resid_post") -> list[dict]:
        """One row per layer: stable ranks, s₁, projections, decoded top vector."""
        rows = []
        for li, layer in enumerate(self.layers):
            u = self.out_tokens[kind][li][0] if self.out_tokens[kind][li] else None
            v = self.in_tokens[kind][li][0] if self.in_tokens[kind][li] else None
            rows.append({
                "layer": layer,
                "stable rank (stacked)": float(self.stacked_stable_rank[kind][li]),
                "stable rank (last token)": float(self.stable_rank[kind][li, -1]),
                "s1": float(self.S[kind][li, 0]),
                "|u1·u1_final|": float(self.proj_u[kind][li, 0, 0]),
                "|u2·u2_final|": float(self.proj_u[kind][li, 1, 1])
                if self.proj_u[kind].shape[1] > 1 else float("nan"),
                "U1": None if u is None else u.tokens,
                "V1": None if v is None else v.tokens,
            })
        return rows

    def to_dict(self) -> dict:
        def tl(x):
            return None if x is None else x.to_dict()

        return {
            "tokens": self.tokens, "position": self.position, "layers": self.layers,
            "kinds": self.kinds, "focus": self.focus,
            **{f"{name}": {k: v.tolist() for k, v in getattr(self, name).items()}
               for name in ("stable_rank", "stacked_stable_rank", "S", "proj_u", "proj_v",
                            "relative_error")},
            "out_tokens": {k: [[tl(t) for t in r] for r in v] for k, v in self.out_tokens.items()},
            "in_tokens": {k: [[tl(t) for t in r] for r in v] for k, v in self.in_tokens.items()},
        }

    def __str__(self) -> str:
        lines = []
        for kind in self.kinds:
            lines.append(f"[{kind}]  layer  sr(stacked)  sr(last)  s1  |u1·u1_final|  U1 | V1")
            for r in self.table(kind):
                lines.append(
                    f"  {r['layer']:>3} {r['stable rank (stacked)']:8.2f} "
                    f"{r['stable rank (last token)']:8.2f} {r['s1']:9.3g} "
                    f"{r['|u1·u1_final|']:6.2f}  {' '.join(r['U1'] or ['-'])} | "
                    f"{' '.join(r['V1'] or ['-'])}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        out = []
        for kind in self.kinds:
            rows = self.table(kind)
            out.append(table([list(r.values()) for r in rows], list(rows[0]),
                             caption=f"{kind} (focus {self.focus}) at position {self.position}"))
        return "".join(out)


def _focus_svd(lm: LinearMap, focus: Literal["stacked"] | int, k: int) -> SVD:
    if focus == "stacked":
        return svd(lm, k, stacked=True)
    J = lm.J[focus]
    return svd(J, k, x=lm.x[focus])


def _abs_cos(A: Tensor, B: Tensor) -> Tensor:
    A = A / A.norm(dim=0, keepdim=True).clamp_min(1e-30)
    B = B / B.norm(dim=0, keepdim=True).clamp_min(1e-30)
    return (A.T @ B).abs()


@exact_matmul()
def layer_sweep(model: Any, inputs: Inputs, pos: int = -1, *, layers: list[int] | None = None,
                kinds: tuple[str, ...] = KINDS, focus: Literal["stacked"] | int = "stacked",
                k: int = 2, top: int = 5, keep_maps: bool = False, progress: bool | None = None,
                **kw: Any) -> LayerSweep:
    """Operators of every layer (``layers``, default all; the last layer is always added as the
    reference for projections) for one prompt and position. ``kw`` goes to
    :func:`lin_lens.operators_at_hooks` for the cumulative kinds (e.g. ``chunk_size``,
    ``engine``) and, less ``engine``, to :func:`lin_lens.layer_transforms` for the transforms.
    See the module docstring."""
    if not is_int_position(pos):
        raise ArgumentTypeError(f"layer_sweep takes one int position, got pos={pos!r}")
    tokens = to_tokens(model, inputs)
    t = positions(pos, tokens.shape[1])[0]
    n_layers = model.cfg.n_layers
    if layers is not None:
        bad = [x for x in layers if not -n_layers <= as_index(x, "layers") < n_layers]
        if bad:
            raise InvalidPositionError(f"layers={list(layers)}: {bad} out of range for a "
                                       f"{n_layers}-layer model")
    layers = sorted(set(range(n_layers) if layers is None else [int(x) % n_layers for x in layers])
                    | {n_layers - 1})
    bad = [kd for kd in kinds if kd not in KINDS]
    if bad:
        raise InvalidArgumentError(f"unknown kinds {bad}; choose from {KINDS}")
    cum = [kd for kd in kinds if kd != "transform"]
    per: dict[str, list[dict]] = {kd: [] for kd in kinds}
    maps: dict[tuple[str, int], LinearMap] = {}
    n_maps = len(layers) * (len(cum) + ("transform" in kinds))
    bar = progress_bar(n_maps, "layer sweep", progress, unit="map")
    try:
        cum_ops: dict[str, LinearMap] = {}
        if cum:  # one call for every layer: the forward engine gets all hooks from one replay
            hooks = [_HOOK[kd].format(layer) for layer in layers for kd in cum]
            cum_ops = operators_at_hooks(model, tokens, hooks, t, source="hook_embed", **kw)
        pending: dict[int, LinearMap] = {}
        groups = _transform_groups(model, tokens, layers, t, kw) if "transform" in kinds else None
        for layer in layers:
            got = {kd: cum_ops.pop(_HOOK[kd].format(layer)) for kd in cum}
            if groups is not None:
                if layer not in pending:
                    pending.update(next(groups))
                got["transform"] = pending.pop(layer)
            for kd, lm in got.items():
                per[kd].append(_summarise(model, lm, focus, k))
                if keep_maps:
                    maps[(kd, layer)] = lm
            bar.update(len(got))
    finally:
        bar.close()
    _decode_all(model, [r for rows in per.values() for r in rows], k, top)
    return _assemble(model, tokens, t, layers, list(kinds), focus, per,
                     maps if keep_maps else None)


def _transform_groups(model: Any, tokens: Tensor, layers: list[int], t: int, kw: dict
                      ) -> Iterator[dict[int, LinearMap]]:
    """The layers' own maps, as many layers per :func:`layer_transforms` pass (one forward, one
    set of VJP rows) as half the memory budget holds, so that a long input streams."""
    kw = {a: v for a, v in kw.items() if a != "engine"}
    size = _layers_per_pass(model, tokens.shape[1], kw.get("max_memory"))
    for i in range(0, len(layers), size):
        yield layer_transforms(model, tokens, layers[i:i + size], t, **kw)


def _layers_per_pass(model: Any, n_tokens: int, max_memory: Any) -> int:
    d = int(model.cfg.d_model)
    per_layer = n_tokens * d * d * budget.itemsize(model_dtype(model))
    room = budget.budget(max_memory, model_device(model)) // 2
    return max(1, room // max(1, per_layer))


def _summarise(model: Any, lm: LinearMap, focus: Literal["stacked"] | int, k: int) -> dict:
    """One map's numbers: a top-k SVD (of the Gram matrix, lin_lens.spectrum) and stable ranks
    from ‖J‖_F² and s_max; no full SVD. The vectors to decode are decoded for all maps at once."""
    d_model = model.cfg.d_model
    n_src, d_in = lm.J.shape[0], lm.J.shape[-1]
    if focus == "stacked":
        sr, f = map_spectra(lm, max(k, 2))
        ssr = f.stable_rank
        U, V = f.U, f.Vh.T
        Vb = V.T.reshape(-1, n_src, d_in)  # decode v on the source token carrying most of it
        V_dec = Vb[torch.arange(Vb.shape[0], device=Vb.device), Vb.norm(dim=-1).argmax(-1)].T
    else:
        f = _focus_svd(lm, focus, max(k, 2))
        sr, ssr = stable_rank(lm), stable_rank(lm, stacked=True)
        U, V = f.U, f.Vh.T
        V_dec = V
    return {"sr": sr, "ssr": ssr, "S": f.S[:k], "U": U[:, :2], "V": V[:, :2],
            "to_out": U[:, :k] if lm.J.shape[-2] == d_model else None,
            "to_in": V_dec[:, :k] if d_in == d_model else None,
            "err": lm.meta["checked_error"] if "checked_error" in lm.meta else lm.relative_error}


def _decode_all(model: Any, rows: list[dict], k: int, top: int) -> None:
    """Decode every map's vectors in one vocabulary product per space (``out``, ``in``)."""
    for key, space, name in (("to_out", "out", "out"), ("to_in", "in", "in")):
        have = [r for r in rows if r[key] is not None]
        decoded = (decode_vectors(model, torch.cat([r[key] for r in have], dim=1), space, top)
                   if have else [])
        start = 0
        for r in have:
            n = r[key].shape[1]
            r[name], start = decoded[start:start + n], start + n
        for r in rows:
            if r.pop(key) is None:
                r[name] = [None] * k


def _assemble(model, tokens, t, layers, kinds, focus, per, maps) -> LayerSweep:
    sr, ssr, S, pu, pv, outs, ins, err = {}, {}, {}, {}, {}, {}, {}, {}
    for kd in kinds:
        rows = per[kd]
        ref = per["resid_post"][-1] if (kd != "transform" and "resid_post" in per) else rows[-1]
        sr[kd] = torch.stack([r["sr"] for r in rows])
        ssr[kd] = torch.stack([torch.as_tensor(r["ssr"]) for r in rows])
        S[kd] = torch.stack([r["S"] for r in rows])
        pu[kd] = torch.stack([_abs_cos(r["U"], ref["U"]) for r in rows])
        pv[kd] = torch.stack([_abs_cos(r["V"], ref["V"]) for r in rows])
        outs[kd] = [r["out"] for r in rows]
        ins[kd] = [r["in"] for r in rows]
        err[kd] = torch.tensor([r["err"] for r in rows])
    return LayerSweep(token_strings(model, tokens[0]), t, layers, kinds, focus, sr, ssr, S, pu,
                      pv, outs, ins, err, maps)
