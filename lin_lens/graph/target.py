"""What an attribution graph explains: logits or a direction on a hook, at one position."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lin_lens._tl import LOGITS
from lin_lens.errors import InvalidArgumentError


@dataclass
class Target:
    """What the graph explains: logits ``ids`` or ``direction·act`` at ``hook``, position ``pos``.

    ``weights`` (sum 1) combine several targets into the objective ``J = Σ_k w_k T_k`` whose
    total gradient reads head and MLP outputs; ``probs`` are the softmax probabilities of logit
    targets (None for a direction).
    """

    hook: str
    pos: int
    ids: list[int] | None
    direction: Tensor | None
    labels: list[str]
    weights: Tensor
    probs: Tensor | None

    def read(self, act: Tensor) -> Tensor:
        """The target values ``[k]`` from the activation ``[1, pos, ...]`` (or the logits)."""
        row = act[0, self.pos].reshape(-1)
        if self.ids is not None:
            return row[self.ids]
        assert self.direction is not None  # a target has ids or a direction
        return (row * self.direction.to(row.dtype)).sum().reshape(1)


def resolve_target(target: Any, hook: str, pos: int, act: Tensor, logits: Tensor,
                   str_token) -> Target:
    """``target``: None (the top logit), a token id, a list of ids, or a float direction.
    (``hook`` is already checked to have an exact linear map.)"""
    row = act[0, pos].reshape(-1).detach()
    probs_all = torch.softmax(logits[0, pos].double(), -1)
    u = None if target is None else torch.as_tensor(target)
    if u is None or not (u.is_floating_point() or u.is_complex()):
        if hook != LOGITS:
            raise InvalidArgumentError(
                f"target={target!r} names logits, but hook={hook!r}: give a float direction of "
                f"size {row.numel()} for that hook")
        ids = [int(logits[0, pos].argmax())] if u is None else [int(t) for t in u.reshape(-1)]
        if not ids or min(ids) < 0 or max(ids) >= row.numel() or len(set(ids)) != len(ids):
            raise InvalidArgumentError(
                f"target={target!r}: token ids must be distinct and in [0, {row.numel()})")
        probs = probs_all[ids].to(row.dtype)
        w = probs / probs.sum() if float(probs.sum()) > 0 else torch.full_like(probs, 1 / len(ids))
        return Target(hook, pos, ids, None, [str_token(i) for i in ids], w, probs)
    if u.is_complex() or u.numel() != row.numel():
        raise InvalidArgumentError(
            f"target: a direction on {hook!r} must be a float tensor of {row.numel()} entries, "
            f"got {tuple(u.shape)} {u.dtype}")
    u = u.reshape(-1).to(device=row.device, dtype=row.dtype)
    return Target(hook, pos, None, u, [f"direction on {hook}"], row.new_ones(1), None)
