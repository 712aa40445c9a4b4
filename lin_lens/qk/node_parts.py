"""Small pieces of :mod:`lin_lens.qk.nodes`: the detached forward values node parts read, node
labels parsed back to layer and index, and batched helpers over per-job marginals."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lin_lens._tl import canonical, clean_name, hook_dict
from lin_lens.freeze import detached


def const_dots(consts: dict[str, Tensor], p: int, h: int, u: Tensor) -> Tensor:
    """Each constant origin's marginal ``c[p, h] · u`` ``[n_origins]``."""
    if not consts:
        return u.new_zeros(0)
    return torch.stack([c[p, h] @ u for c in consts.values()])


def top_indices(margs: Tensor, top: int, batch: int = 256) -> list[list[int]]:
    """The ``top`` largest |values| of each row of ``margs`` ``[n_jobs, n_parts]``, in
    batches of rows."""
    out: list[list[int]] = []
    for i in range(0, margs.shape[0], batch):
        block = margs[i:i + batch].abs()
        out += block.topk(min(top, block.shape[1]), dim=1).indices.tolist()
    return out


def const_kind(o: str) -> str:
    return "pos_embed" if o == "hook_pos_embed" else "bias"


def node_cache(model: Any, tokens: Tensor, last: int, extra: set[str] | None = None) -> Any:
    """The detached forward values node parts read, for layers up to ``last``: embeddings,
    every head's ``hook_z``, MLP activations and outputs, norm scales, the residual streams
    (and the hooks in ``extra``, so that one forward pass serves other readers too)."""
    leaves = ("hook_embed", "hook_pos_embed", "attn.hook_z", "mlp.hook_post", "hook_mlp_out",
              "hook_scale", "hook_resid_pre")
    wanted = [h for h in hook_dict(model) if h.endswith(leaves) and (
        not h.startswith("blocks.") or int(h.split(".")[1]) <= last)]
    names = set(wanted) | {canonical(model, h) for h in wanted} | set(extra or ())
    kw = {"stop_at_layer": last + 1} if last + 1 < int(model.cfg.n_layers) else {}
    with torch.no_grad(), detached(model):
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names, **kw)
    return cache


class FailedSum:
    """What NotExactError reports when the writes do not sum (no map to carry)."""

    def __init__(self, hook: str, err: float):
        self.hook, self.relative_error = hook, err


def layer_of(label: str) -> int:
    if label.startswith("L"):
        return int(label[1:].replace(".", "H").split("H")[0])
    if label.startswith("blocks."):
        return int(label.split(".")[1])
    return -1


def index_of(label: str) -> int:
    if label.startswith("L") and "H" in label:
        return int(label.split("H")[1])
    return -1


def origin_name(o: str) -> str:
    if o == "hook_pos_embed":
        return "pos_embed"
    return clean_name(o)
