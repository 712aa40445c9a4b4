"""The two detached forward passes an attribution graph needs, and its batched backward passes.

* The **probe** pass adds a zero leaf to every node output (``out + 0``): the gradient of the
  target there is the *total* gradient ∂J/∂out over all paths; times the output, each node's
  total effect on the target.
* The **cut** pass replaces every node output by a fresh leaf holding the same value. The network
  downstream of a leaf no longer sees how the output was computed, so differentiating any node's
  *computed* output (or the target) gives only the *direct* effects of the nodes before it; times
  their outputs, the edges into that node. Both run in detached mode, so the network between
  leaves is exactly linear and Euler's identity makes every value the sum of its edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lin_lens._tl import LOGITS, HookSet
from lin_lens.errors import InvalidArgumentError
from lin_lens.graph._naming import is_gated

# Hooks with no exact linear map from the input: refused as a target hook.
NOT_LINEAR = {
    "hook_pattern": "an attention pattern is a softmax of the input",
    "hook_attn_scores": "attention scores are bilinear (q·k) in the input",
    "hook_scale": "a norm's scale is sqrt(mean(x²)+eps)",
    "hook_cos": "rotary tables do not depend on the input",
    "hook_sin": "rotary tables do not depend on the input",
    "hook_tokens": "token ids are not activations",
    "hook_expert_weights": "router weights are a softmax of the input",
    "hook_expert_indices": "router indices are discrete",
}


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
        assert self.direction is not None  # a target is ids or a direction
        return (row * self.direction.to(row.dtype)).sum().reshape(1)


def read_before_cut(model: Any, hook: str) -> bool:
    """A gated MLP's gate pre-activation is linear but detached mode cuts it right at its hook:
    read it before the cut (every other linear hook is read after lin_lens's own hooks)."""
    parts = hook.split(".")
    if hook.endswith("mlp.hook_pre") and len(parts) > 1 and parts[1].isdigit():
        return is_gated(model, int(parts[1]))
    return False


class Pass:
    """One forward pass (in the caller's detached mode) with node outputs made leaves.

    ``cut=True``: each output is replaced by a leaf of equal value (``origs`` keeps the
    computed output, ``leaves`` the leaf). ``cut=False``: a zero leaf is added (a probe).
    ``values`` are the outputs' values; ``act`` the target hook's activation (or the logits).
    """

    def __init__(self, model: Any, tokens: Tensor, hooks: list[str], target_hook: str,
                 cut: bool):
        self.cut = cut
        self.values: dict[str, Tensor] = {}
        self.leaves: dict[str, Tensor] = {}
        self.origs: dict[str, Tensor] = {}
        self.act: Tensor | None = None
        with HookSet(model) as hs:
            if target_hook != LOGITS:
                hs.add(target_hook, self._read, prepend=read_before_cut(model, target_hook))
            for name in hooks:
                hs.add(name, self._leaf(name))
            logits = model(tokens, return_type="logits")
        if target_hook == LOGITS:
            self.act = logits
        if self.act is None:
            raise InvalidArgumentError(
                f"target hook {target_hook!r} did not fire in the forward pass")
        self.logits = logits.detach()

    def _read(self, t: Tensor, hook: Any = None) -> None:
        self.act = t

    def _leaf(self, name: str):
        def fn(t: Tensor, hook: Any) -> Tensor:
            self.values[name] = t.detach()
            if self.cut:
                self.origs[name] = t
                leaf = t.detach().requires_grad_(True)
                self.leaves[name] = leaf
                return leaf
            probe = torch.zeros_like(t, requires_grad=True)
            self.leaves[name] = probe
            return t + probe

        return fn


def grad_batch(outputs: list[Tensor], inputs: list[Tensor], cots: list[Tensor]
               ) -> list[Tensor | None]:
    """Gradients of ``outputs`` for a batch of cotangents ``[B, *shape]``; each result keeps the
    leading B (None where an input is not reached). A batch of one is a plain backward pass."""
    B = cots[0].shape[0]
    if B == 1:
        res = torch.autograd.grad(outputs, inputs, [c[0] for c in cots], retain_graph=True,
                                  allow_unused=True)
        return [None if r is None else r.unsqueeze(0) for r in res]
    return list(torch.autograd.grad(outputs, inputs, cots, retain_graph=True,
                                    allow_unused=True, is_grads_batched=True))
