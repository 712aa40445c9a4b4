"""One detached forward pass with leaves: the graph every engine differentiates.

The source activation becomes a leaf ``x``; with ``constants=True`` every other input origin
(``hook_embed`` / ``hook_pos_embed`` when they are not the source) becomes a leaf too and every
nonzero bias requires grad, so one backward pass yields a row of ``J`` and the constant of every
origin. Parameters are otherwise frozen (the graph keeps only what those gradients need).

Two more kinds of leaves serve attribution graphs (and per-layer maps): a ``cuts`` hook's output
is replaced by a fresh leaf of equal value, so what follows no longer sees how it was computed
(its computed value stays in ``Forward.computed``); a ``probes`` hook gets a zero leaf added, whose
gradient is the total gradient there.

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
from lin_lens._tl import LOGITS, biases, canonical, hook_dict
from lin_lens.errors import InvalidArgumentError, UnsupportedFeatureError
from lin_lens.freeze import cut_hooks, detached, read_before_cut


class _Stop(Exception):
    """Raised from a hook to end a pass once every target has been read."""


@dataclass
class Forward:
    """What one detached forward pass left for the engines."""

    x: Tensor  # the source leaf [1, n, *src]
    acts: dict[str, Tensor]  # canonical target name → activation [1, n, ...]; "logits" → the
    # unembedding input (the readout is applied by the engine)
    origins: dict[str, Tensor] = field(default_factory=dict)  # other input leaves, by hook name
    sources: dict[str, Tensor] = field(default_factory=dict)  # ``cuts`` leaves, by hook name
    computed: dict[str, Tensor] = field(default_factory=dict)  # the live value at every cut
    # and probe
    probes: dict[str, Tensor] = field(default_factory=dict)  # zero leaves added at ``probes``
    biases: dict[str, Tensor] = field(default_factory=dict)  # nonzero biases (requires_grad on)
    logits: Tensor | None = None  # the model's own logits, when the pass ran to the end

    def constant_leaves(self) -> dict[str, Tensor]:
        return {**self.origins, **self.biases}


class _Pass:
    """The hooks of one pass: leaves in, activations out, outermost firing only."""

    def __init__(self, model: Any, tokens: Tensor, source: str, targets: list[str], full: bool,
                 grad: bool, cuts: Sequence[str], fwd: Forward):
        self.model, self.tokens, self.source = model, tokens, source
        self.want = {canonical(model, h) for h in targets}
        self.full, self.grad, self.cuts, self.fwd = full, grad, set(cuts), fwd
        self.depth = 0
        self.fired: dict[tuple[str, str], int] = {}

    def _once(self, role: str, name: str) -> None:
        self.fired[role, name] = self.fired.get((role, name), 0) + 1
        if self.fired[role, name] > 1:
            raise InvalidArgumentError(
                f"hook {name!r} fires more than once in one forward pass; lin_lens maps one "
                "activation per hook and cannot tell which firing is meant")

    def enter(self, module: Any, args: Any) -> None:
        self.depth += 1

    def leave(self, module: Any, args: Any, out: Any) -> None:
        self.depth -= 1

    def leaf(self, label: str) -> Callable:
        def fn(t: Tensor, hook: Any) -> Tensor:
            if self.depth != 1:
                return t
            self._once(label, hook.name or label)
            v = t.detach().requires_grad_(self.grad)
            if label == "source":
                self.fwd.x = v
            elif label in self.cuts:
                self.fwd.sources[label] = v
                self.fwd.computed[label] = t
            else:
                self.fwd.origins[label] = v
            return v
        return fn

    def probe(self, label: str) -> Callable:
        def fn(t: Tensor, hook: Any) -> Tensor:
            if self.depth != 1:
                return t
            self._once("probe", hook.name or label)
            p = torch.zeros_like(t, requires_grad=True)
            self.fwd.probes[label] = p
            self.fwd.computed[label] = t
            return t + p
        return fn

    def _done(self) -> None:
        if not self.full and self.want <= self.fwd.acts.keys():
            raise _Stop

    def grab(self, t: Tensor, hook: Any) -> None:
        if self.depth != 1:
            return
        self._once("target", hook.name)
        if t.ndim < 2 or t.shape[0] != self.tokens.shape[0] or t.shape[1] != self.tokens.shape[1]:
            raise UnsupportedFeatureError(
                f"{hook.name!r} has shape {list(t.shape)}, not [batch, pos, …] (TransformerLens "
                "folds batch, positions and heads together there); map the hook it feeds")
        if self.fwd.x.numel() == 0:
            raise InvalidArgumentError(
                f"target {hook.name!r} is computed before source {self.source!r}")
        self.fwd.acts[hook.name] = t
        self._done()

    def unembed_in(self, module: Any, args: tuple) -> None:
        if self.depth == 1:
            self.fwd.acts[LOGITS] = args[0]
            self._done()


def detached_forward(stack: contextlib.ExitStack, model: Any, tokens: Tensor, source: str,
                     targets: Sequence[str], *, detach: bool = True, grad: bool = True,
                     constants: bool = False, full: bool = False,
                     record: Callable[[HookSet], None] | None = None,
                     cuts: Sequence[str] = (), probes: Sequence[str] = ()) -> Forward:
    """Run the model once in detached mode (``detach=False``: the ordinary network) and return
    the leaves and activations. Config flags, frozen parameters and bias grads stay in force in
    ``stack`` (the caller's backward passes and replays need them); our hooks and detached mode
    are removed before returning. ``full``: run to the end and keep the logits (otherwise the
    pass stops at the last target). ``record``: adds more hooks (after detached mode's).
    ``cuts``: hooks whose output is replaced by a leaf of its own (``fwd.sources``; the computed
    value in ``fwd.computed``), cutting what follows from what came before. ``probes``: hooks
    that get a zero leaf added (``fwd.probes``: the total gradient there)."""
    targets = list(targets)
    stack.enter_context(flags_for(model, [h for h in (*targets, source, *cuts, *probes)
                                          if h != LOGITS]))
    stack.enter_context(requires_grad(list(model.parameters()), False))
    bias = biases(model) if constants else {}
    stack.enter_context(requires_grad(bias, True))

    fwd = Forward(x=torch.empty(0), acts={}, biases=bias)
    p = _Pass(model, tokens, source, targets, full, grad, cuts, fwd)
    src_name = canonical(model, source)
    with contextlib.ExitStack() as inner:
        if detach:
            inner.enter_context(detached(model))
        hs = inner.enter_context(HookSet(model))
        hs.add_module_hook(model, p.enter, pre=True)
        hs.add_module_hook(model, p.leave)
        hs.add(source, p.leaf("source"))
        for h in cuts:
            hs.add(h, p.leaf(h))
        for h in probes:
            hs.add(h, p.probe(h))
        if constants:
            for origin in ("hook_embed", "hook_pos_embed"):
                if origin in hook_dict(model) and canonical(model, origin) != src_name:
                    hs.add(origin, p.leaf(origin))
        if record is not None:
            record(hs)
        cut = cut_hooks(model) if detach and targets else set()
        for h in targets:
            if h == LOGITS:
                hs.add_module_hook(model.unembed, p.unembed_in, pre=True)
            else:  # before a cut: the live activation (e.g. a gated MLP's gate pre-activation)
                hs.add(h, p.grab, prepend=detach and read_before_cut(model, h, cut))
        inner.enter_context(torch.enable_grad() if grad else torch.no_grad())
        try:
            fwd.logits = model(tokens, return_type="logits")
        except _Stop:
            pass
    if fwd.x.numel() == 0:
        raise InvalidArgumentError(f"source hook {source!r} did not fire in the forward pass")
    missing = p.want - fwd.acts.keys()
    if missing:
        raise InvalidArgumentError(f"target hook(s) did not fire: {sorted(missing)}")
    return fwd


def batched_grad(outputs: Tensor | Sequence[Tensor], inputs: Tensor | Sequence[Tensor],
                 grads: Tensor | Sequence[Tensor], allow_unused: bool = False,
                 chunk: int | None = None, retain_graph: bool = True) -> Any:
    """``torch.autograd.grad`` over a retained graph for a batch of cotangents: ``grads``
    ``[B, *output.shape]`` (one per output when ``outputs`` is a list); results carry the
    leading B (None where an input is not reached, with ``allow_unused``). ``chunk``: at most
    that many cotangents per backward pass. A pass of one is a plain backward pass (no vmap),
    the fastest form at long inputs. ``retain_graph=False``: the last pass frees the graph."""
    single = isinstance(inputs, Tensor)
    ins = [inputs] if single else list(inputs)
    outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    cots = [grads] if isinstance(grads, Tensor) else list(grads)
    B = cots[0].shape[0]
    parts = []
    for i in range(0, B, chunk or B):
        g = [c[i:i + chunk] if chunk else c for c in cots]
        retain = retain_graph or i + (chunk or B) < B
        if g[0].shape[0] == 1:
            res = torch.autograd.grad(outs, ins, [c[0] for c in g], retain_graph=retain,
                                      allow_unused=allow_unused)
            res = tuple(None if r is None else r.unsqueeze(0) for r in res)
        else:
            res = torch.autograd.grad(outs, ins, g, retain_graph=retain,
                                      allow_unused=allow_unused, is_grads_batched=True)
        parts.append(res)
    res = tuple(None if ps[0] is None else ps[0] if len(ps) == 1 else torch.cat(ps)
                for ps in zip(*parts, strict=True))
    return res[0] if single else res
