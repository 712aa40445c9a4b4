"""One detached forward pass with leaves: the graph every engine differentiates.

The source activation becomes a leaf ``x``; with ``constants=True`` every other input origin
(``hook_embed`` / ``hook_pos_embed`` when they are not the source) becomes a leaf too and every
nonzero bias requires grad, so one backward pass yields a row of ``J`` and the constant of every
origin. Parameters are otherwise frozen (the graph keeps only what those gradients need).

Which firing is mapped: hooks are read in the outermost forward pass only (a forward pass that a
user's hook runs inside ours is ignored), and a source or target hook that fires more than once in
that pass is refused, since "the activation at that hook" would be ambiguous.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lin_lens._hooks import HookSet, flags_for, requires_grad
from lin_lens._tl import LOGITS, biases, canonical
from lin_lens.errors import InvalidArgumentError, UnsupportedFeatureError
from lin_lens.freeze import cut_hooks, detached


class _Stop(Exception):
    """Raised from a hook to end a pass once every target has been read."""


@dataclass
class Forward:
    """What one detached forward pass left for the engines."""

    x: Tensor  # the source leaf [1, n, *src]
    acts: dict[str, Tensor]  # canonical target name → activation [1, n, ...]; "logits" → the
    # unembedding input (the readout is applied by the engine)
    origins: dict[str, Tensor] = field(default_factory=dict)  # other input leaves, by hook name
    sources: dict[str, Tensor] = field(default_factory=dict)  # ``more_sources`` leaves
    biases: dict[str, Tensor] = field(default_factory=dict)  # nonzero biases (requires_grad on)
    logits: Tensor | None = None  # the model's own logits, when the pass ran to the end

    def constant_leaves(self) -> dict[str, Tensor]:
        return {**self.origins, **self.biases}


def detached_forward(stack: contextlib.ExitStack, model: Any, tokens: Tensor, source: str,
                     targets: Sequence[str], *, detach: bool = True, grad: bool = True,
                     constants: bool = False, full: bool = False,
                     record: Callable[[HookSet], None] | None = None,
                     more_sources: Sequence[str] = ()) -> Forward:
    """Run the model once in detached mode (``detach=False``: the ordinary network) and return
    the leaves and activations. Config flags, frozen parameters and bias grads stay in force in
    ``stack`` (the caller's backward passes and replays need them); our hooks and detached mode
    are removed before returning. ``full``: run to the end and keep the logits (otherwise the
    pass stops at the last target). ``record``: adds more hooks (after detached mode's).
    ``more_sources``: hooks whose activation becomes a leaf of its own (``fwd.sources``), cutting
    what follows from what came before (per-layer maps from one pass)."""
    targets = list(targets)
    stack.enter_context(flags_for(model, [h for h in (*targets, source, *more_sources)
                                          if h != LOGITS]))
    stack.enter_context(requires_grad(list(model.parameters()), False))
    bias = biases(model) if constants else {}
    stack.enter_context(requires_grad(bias, True))

    fwd = Forward(x=torch.empty(0), acts={}, biases=bias)
    want = {canonical(model, h) for h in targets}
    src_name = canonical(model, source)
    depth = [0]
    fired: dict[tuple[str, str], int] = {}

    def outer() -> bool:
        return depth[0] == 1

    def once(role: str, name: str) -> None:
        fired[role, name] = fired.get((role, name), 0) + 1
        if fired[role, name] > 1:
            raise InvalidArgumentError(
                f"hook {name!r} fires more than once in one forward pass; lin_lens maps one "
                "activation per hook and cannot tell which firing is meant")

    def leaf(label: str):
        def fn(t: Tensor, hook: Any) -> Tensor:
            if not outer():
                return t
            once(label, hook.name or label)
            v = t.detach().requires_grad_(grad)
            if label == "source":
                fwd.x = v
            elif label in more_sources:
                fwd.sources[label] = v
            else:
                fwd.origins[label] = v
            return v
        return fn

    def done() -> None:
        if not full and want <= fwd.acts.keys():
            raise _Stop

    def grab(t: Tensor, hook: Any) -> None:
        if not outer():
            return
        once("target", hook.name)
        if t.ndim < 2 or t.shape[0] != tokens.shape[0] or t.shape[1] != tokens.shape[1]:
            raise UnsupportedFeatureError(
                f"{hook.name!r} has shape {list(t.shape)}, not [batch, pos, …] (TransformerLens "
                "folds batch, positions and heads together there); map the hook it feeds")
        if fwd.x.numel() == 0:
            raise InvalidArgumentError(
                f"target {hook.name!r} is computed before source {source!r}")
        fwd.acts[hook.name] = t
        done()

    def unembed_in(module: Any, args: tuple) -> None:
        if outer():
            fwd.acts[LOGITS] = args[0]
            done()

    def enter(module: Any, args: Any) -> None:
        depth[0] += 1

    def leave(module: Any, args: Any, out: Any) -> None:
        depth[0] -= 1

    with contextlib.ExitStack() as inner:
        if detach:
            inner.enter_context(detached(model))
        hs = inner.enter_context(HookSet(model))
        hs.add_module_hook(model, enter, pre=True)
        hs.add_module_hook(model, leave)
        hs.add(source, leaf("source"))
        for h in more_sources:
            hs.add(h, leaf(h))
        if constants:
            for origin in ("hook_embed", "hook_pos_embed"):
                if origin in model.hook_dict and canonical(model, origin) != src_name:
                    hs.add(origin, leaf(origin))
        if record is not None:
            record(hs)
        cuts = {canonical(model, c) for c in cut_hooks(model)} if detach else set()
        for h in targets:
            if h == LOGITS:
                hs.add_module_hook(model.unembed, unembed_in, pre=True)
            else:  # before a cut: the live activation (e.g. a gated MLP's gate pre-activation)
                hs.add(h, grab, prepend=canonical(model, h) in cuts)
        inner.enter_context(torch.enable_grad() if grad else torch.no_grad())
        try:
            out = model(tokens, return_type="logits")
            fwd.logits = out
        except _Stop:
            pass
    if fwd.x.numel() == 0:
        raise InvalidArgumentError(f"source hook {source!r} did not fire in the forward pass")
    missing = want - fwd.acts.keys()
    if missing:
        raise InvalidArgumentError(f"target hook(s) did not fire: {sorted(missing)}")
    return fwd


def batched_grad(outputs: Tensor, inputs: Tensor | Sequence[Tensor], grads: Tensor,
                 allow_unused: bool = False, chunk: int | None = None) -> Any:
    """``torch.autograd.grad`` over a retained graph for a batch of cotangents
    ``grads`` [B, *outputs.shape]; results carry the leading B. ``chunk``: at most that many
    cotangents per backward pass. A pass of one is a plain backward pass (no vmap), the fastest
    form at long inputs."""
    single = isinstance(inputs, Tensor)
    ins = [inputs] if single else list(inputs)
    parts = []
    for i in range(0, len(grads), chunk or len(grads)):
        g = grads[i:i + chunk] if chunk else grads
        if len(g) == 1:
            res = torch.autograd.grad(outputs, ins, g[0], retain_graph=True,
                                      allow_unused=allow_unused)
            res = tuple(None if r is None else r.unsqueeze(0) for r in res)
        else:
            res = torch.autograd.grad(outputs, ins, g, retain_graph=True,
                                      allow_unused=allow_unused, is_grads_batched=True)
        parts.append(res)
    res = tuple(None if ps[0] is None else torch.cat(ps) for ps in zip(*parts, strict=True))
    return res[0] if single else res
