"""Per-head operators: one exact linear map per attention head of a layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lin_lens._precision import exact_matmul
from lin_lens._types import Inputs, Positions
from lin_lens.maps import LinearMap, linear_map


def W_O(model: Any, layer: int) -> Tensor:
    return model.blocks[layer].attn.W_O.detach()  # [n_heads, d_head, d_model]


@exact_matmul()
def head_operators(model: Any, inputs: Inputs, layer: int, pos: Positions = -1, *,
                   source: str = "hook_embed", **kw: Any) -> list[LinearMap]:
    """One exact :class:`LinearMap` per head of ``layer``: its output ``z_h W_O[h]`` (TL's
    ``attn.hook_result``, without ``b_O`` and before any post-attention norm).

    Computed from a single map at ``attn.hook_z`` (``n_heads·d_head`` rows instead of
    ``n_heads·d_model``): ``J_h = W_O[h]ᵀ J_z[h]``, a rank ≤ d_head operator per source token.
    ``kw`` goes to :func:`lin_lens.linear_map`.
    """
    lz = linear_map(model, inputs, f"blocks.{layer}.attn.hook_z", pos, source=source, **kw)
    Wo = W_O(model, layer).to(lz.J4.dtype)
    n_heads, d_head, _ = Wo.shape
    J = lz.J4.reshape(*lz.J4.shape[:2], n_heads, d_head, -1)
    act = lz.act4.reshape(-1, n_heads, d_head)
    maps = []
    for h in range(n_heads):
        Jh = torch.einsum("tsdi,dm->tsmi", J[:, :, h], Wo[h])
        consts = {k: v.reshape(-1, n_heads, d_head)[:, h] @ Wo[h] for k, v in lz.constants.items()}
        lm = LinearMap(Jh, lz.x, act[:, h] @ Wo[h], consts, f"blocks.{layer}.attn.hook_result",
                       lz.source, lz.positions, (Wo.shape[-1],), tokens=lz.tokens,
                       detached=lz.detached, int_pos=lz.int_pos)
        lm.meta = {"head": h, "layer": layer}
        maps.append(lm)
    return maps
