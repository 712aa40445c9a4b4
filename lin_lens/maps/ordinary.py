"""The ordinary (not detached) network's reconstruction, for comparison: ``J x + Σ_b J_b b`` at one
hook in a single forward-mode pass, with every linear input (embeddings, positional embeddings,
biases) as its own tangent — instead of a full ordinary Jacobian (d_out backward passes). It is
what ``linear_map(..., detach=False).reconstruct()`` returns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from lin_lens._hooks import HookSet, slots_of, swapped
from lin_lens._precision import exact_matmul
from lin_lens._tl import LOGITS, biases, hook_dict, model_device
from lin_lens.errors import InvalidArgumentError


@exact_matmul()
def ordinary_reconstruction(model: Any, tokens: Tensor, hook: str, pos: int | Sequence[int]
                            ) -> Tensor:
    """The ordinary Jacobian's reconstruction of the activation at ``hook`` (or ``"logits"``):
    ``[d_out]`` for an int ``pos``, ``[n_pos, d_out]`` for a list of positions."""
    out: dict[str, Tensor | None] = {}
    tokens = torch.as_tensor(tokens).to(model_device(model))

    def dual(t: Tensor, hook: Any) -> Tensor:
        return fwAD.make_dual(t, t)

    def grab(t: Tensor, hook: Any) -> None:
        out["jvp"] = fwAD.unpack_dual(t).tangent

    with fwAD.dual_level(), torch.no_grad(), HookSet(model) as hs:
        for h in ("hook_embed", "hook_pos_embed"):
            if h in hook_dict(model):
                hs.add(h, dual)
        if hook != LOGITS:
            hs.add(hook, grab)
        params = {n: fwAD.make_dual(p.detach(), p.detach())
                  for n, p in biases(model, nonzero=False).items()}
        with swapped(slots_of(model, list(params)), params):  # not functional_call: Bridges
            res = model(tokens, return_type="logits")
        if hook == LOGITS:
            out["jvp"] = fwAD.unpack_dual(res).tangent
    jvp = out.get("jvp")
    if jvp is None:
        raise InvalidArgumentError(f"no forward-mode tangent reached {hook!r}")
    if isinstance(pos, int):
        return jvp[0, pos].reshape(-1)
    idx = list(pos)
    return jvp[0, idx].reshape(len(idx), -1)
