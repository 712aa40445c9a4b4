"""Forward-mode replay: the frozen network run on batches of source tangents.

The detached network is linear in the source, every bias and the positional embedding, with the
norm scales, attention patterns and MLP gates frozen at their values for this input. We record
those frozen factors in one primal pass, then *replay* the model on a batch of basis tangents with
the frozen factors substituted through the same TransformerLens hooks (:mod:`.replay_plan`),
every bias zeroed and the positional embedding zeroed. Biases and skipped projections are swapped
for stand-ins for the length of a replay and put back after, also on Ctrl-C
(:func:`lin_lens._hooks.swapped`; ``torch.func.functional_call`` restores a Bridge's doubly
reachable parameters to the stand-in).
That replay is the JVP of the detached network (a plain batched forward, no autograd), and one
replay gives the columns of the operator at *every* requested hook at once. The constant term of
each origin is its own replay with the source at zero and only that origin at its value: exact and
computed independently of ``act − Σ J x``. (Why a replay and not ``torch.func.jvp``: BENCHMARKS.md.)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lin_lens._hooks import HookSet, slots_of, swapped
from lin_lens._tl import LOGITS, biases, block_of, canonical, hook_dict
from lin_lens.errors import InvalidArgumentError
from lin_lens.freeze.gates import gate_fn
from lin_lens.maps.graph import _Stop
from lin_lens.maps.replay_plan import (
    QK_BRANCH,
    ReplayUnsupported,
    replay_plan,
    replays,
    unused_projections,
)

__all__ = ["Replay", "ReplayUnsupported", "layer_of", "replays"]



def layer_of(model: Any, hook: str) -> int:
    """The block index of ``blocks.L.…`` hooks; the last layer for everything after them."""
    b = block_of(hook)
    return int(model.cfg.n_layers) - 1 if b is None else b


class Replay:
    """Frozen factors of one input, and the linear (detached, bias-free) network replayed on
    batches of source tangents.

    Use :meth:`recorder` inside a detached forward pass to fill the factors, then :meth:`run`.
    """

    def __init__(self, model: Any, tokens: Tensor, source: str, targets: Sequence[str],
                 positions: Sequence[int]):
        self.model, self.tokens, self.source = model, tokens, source
        self.targets = [canonical(model, h) for h in targets]
        self.positions = list(positions)
        plan = replay_plan(model)
        self.freeze = plan.freeze
        self.pre_post = plan.pre_post
        act = getattr(model.cfg, "act_fn", None)
        self._gate = gate_fn(act) if self.pre_post else None
        # one frozen value per firing, in order (a norm fires three times per block with
        # use_split_qkv_input: on the q, k and v inputs)
        self.values: dict[str, list[Tensor]] = {}
        self.gates: dict[str, list[Tensor]] = {}
        # an additive positional embedding is an origin; a Bridge's rotary table (its
        # "hook_pos_embed" alias) only reaches the frozen pattern
        pos = canonical(model, "hook_pos_embed") if "hook_pos_embed" in hook_dict(model) else ""
        self.pos_origin = bool(pos) and "rotary" not in pos and pos != canonical(model, source)
        last = max(layer_of(model, h) for h in self.targets)
        blocks_only = all(h.startswith("blocks.") for h in self.targets)
        self.stop_at = last + 1 if blocks_only else None
        self.biases = biases(model, nonzero=False)
        self._zeros = {n: torch.zeros_like(p) for n, p in self.biases.items()}
        # stand-ins for projections that only feed frozen values; biases there have no constant
        self._narrow, self._dead = unused_projections(model, plan, self.targets, self.biases)
        self._slots = slots_of(model, [*self._zeros, *self._narrow])
        self._narrow_tried = not self._narrow

    # primal pass ------------------------------------------------------------------------------
    def recorder(self, hs: HookSet) -> None:
        """Add hooks (after detached mode's) that record the frozen factors."""
        def rec(t: Tensor, hook: Any) -> None:
            self.values.setdefault(hook.name, []).append(t.detach())

        def rec_pre(t: Tensor, hook: Any) -> None:
            assert self._gate is not None  # set whenever pre_post is
            self.gates.setdefault(hook.name, []).append(self._gate(t.detach()))

        for h in self.freeze:
            hs.add(h, rec)
        for pre, _ in self.pre_post:
            hs.add(pre, rec_pre, prepend=True)

    # replay -----------------------------------------------------------------------------------
    def _sliced(self, name: str, v: Tensor, start: int) -> Tensor | None:
        """The frozen value for a replay of positions ``start:`` (None: leave the hook alone)."""
        if start == 0:
            return v
        n = self.tokens.shape[1]
        if name.endswith("hook_pattern"):
            return v[..., start:, start:]
        if ".attn.q_" in name or ".attn.k_" in name:  # q/k norms only feed the frozen pattern
            return None  # (and a Bridge's may be [batch, head, pos, 1]: not sliceable by pos)
        if v.ndim >= 2 and v.shape[0] == 1 and v.shape[1] == n:
            return v[:, start:]
        raise ReplayUnsupported(f"cannot slice the frozen value at {name!r}")

    def run(self, tangent: Tensor | None, origin: str | None = None,
            readout_input: bool = False, start: int = 0) -> dict[str, Tensor]:
        """Outputs ``{target: [B, n_pos, d]}`` of the linear network for source ``tangent``
        ``[B, n, *src]`` (None: zero source, batch 1), with only ``origin`` (a bias name or
        ``"hook_pos_embed"``) at its value. ``readout_input``: also read the unembedding input
        (key ``"logits"``). ``start``: replay positions ``start:`` only — exact when the tangent
        is zero before ``start`` (causal attention; the pattern is frozen, so position-dependent
        rotary and masks only touch the discarded Q/K); outputs then cover only the target
        positions ≥ ``start``."""
        if start and any(QK_BRANCH.search(h) for h in self.targets):
            # a shifted replay moves the rotary angle and leaves q/k norms live: exact after
            # the frozen pattern only (the caller falls back to full-length columns)
            raise ReplayUnsupported("a target in the Q/K branch needs full-length replays")
        B = 1 if tangent is None else tangent.shape[0]
        tokens = self.tokens[:, start:].expand(B, -1)
        params = {**self._zeros, **self._narrow}
        if origin is not None and origin in self.biases:
            params[origin] = self.biases[origin].detach()
        try:
            p = self._run(tokens, params, tangent, origin, readout_input, start, B)
        except RuntimeError:
            if self._narrow_tried:
                raise
            # a Hugging Face layer that reshapes by the narrowed width: replay at full width
            self._narrow, self._narrow_tried = {}, True
            return self.run(tangent, origin, readout_input, start)
        self._narrow_tried = True
        missing = p.want - p.out.keys()
        if missing:
            raise InvalidArgumentError(f"hooks did not fire in the replay: {sorted(missing)}")
        return p.out

    def _run(self, tokens: Tensor, params: dict[str, Tensor], tangent: Tensor | None,
             origin: str | None, readout_input: bool, start: int, B: int) -> _ReplayPass:
        model = self.model
        p = _ReplayPass(self, tangent, origin, readout_input, start, B)
        first = [h for h in self.targets if h in self.freeze]
        with (HookSet(model) as hs, swapped(self._slots, params), torch.no_grad(),
              warnings.catch_warnings()):
            # a Bridge warns that a norm with an edited scale is recomputed: that is the point
            warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
            hs.add(self.source, p.src)
            if self.pos_origin:
                hs.add("hook_pos_embed", p.pos_embed)
            for h in first:
                hs.add(h, p.grab)
            for h in self.freeze:
                hs.add(h, p.frozen)
            for pre, post in self.pre_post:
                hs.add(pre, p.keep_pre)
                hs.add(post, p.post_for(pre))
            for h in self.targets:
                if h not in first:
                    hs.add(h, p.grab)
            if readout_input:
                hs.add_module_hook(model.unembed, p.unembed_in, pre=True)
            kw: dict[str, Any] = {"return_type": "logits"}  # _Stop skips the W_U matmul
            if self.stop_at is not None and not readout_input:
                kw["stop_at_layer"] = self.stop_at
            try:
                model(tokens, **kw)
            except _Stop:
                pass
        return p

    def origins(self) -> list[str]:
        # a narrowed q/k bias only feeds the frozen pattern: its constant is exactly zero
        names = [n for n, p in self.biases.items()
                 if n not in self._dead and bool(p.detach().ne(0).any())]
        return names + (["hook_pos_embed"] if self.pos_origin else [])


class _ReplayPass:
    """The hooks of one replay: the tangent in, frozen factors substituted, targets out."""

    def __init__(self, replay: Replay, tangent: Tensor | None, origin: str | None,
                 readout_input: bool, start: int, B: int):
        self.r, self.tangent, self.origin, self.start, self.B = replay, tangent, origin, start, B
        self.want = set(replay.targets) | ({LOGITS} if readout_input else set())
        self.pos = torch.tensor([t - start for t in replay.positions if t >= start],
                                device=replay.tokens.device, dtype=torch.long)
        self.out: dict[str, Tensor] = {}
        self.seen: dict[str, Tensor] = {}
        self.fired: dict[str, int] = {}

    def _nth(self, name: str) -> int:  # which firing of ``name`` this is, in this replay
        k = self.fired.get(name, 0)
        self.fired[name] = k + 1
        return k

    def _done(self) -> None:
        if self.want <= self.out.keys():
            raise _Stop

    def grab(self, t: Tensor, hook: Any) -> None:
        self.out[hook.name] = t[:, self.pos].reshape(self.B, len(self.pos), -1)
        self._done()

    def src(self, t: Tensor, hook: Any) -> Tensor:
        return torch.zeros_like(t) if self.tangent is None else self.tangent.reshape(t.shape)

    def pos_embed(self, t: Tensor, hook: Any) -> Tensor:
        return t if self.origin == "hook_pos_embed" else torch.zeros_like(t)

    def frozen(self, t: Tensor, hook: Any) -> Tensor:
        r = self.r
        v = r._sliced(hook.name, r.values[hook.name][self._nth(hook.name)], self.start)
        if v is None:
            return t
        shape = t.shape
        if t.shape[-1] == 0 and v.shape[-1] != 0:  # a narrowed gate (replay_plan)
            if v.shape[0] == 1:
                return v  # broadcast by the gate product: act() once, not per tangent
            shape = (*t.shape[:-1], v.shape[-1])
        if v.shape[0] != shape[0] and v.shape[0] != 1:  # batch folded into dim 0 (q/k norm)
            v = v.repeat(shape[0] // v.shape[0], *([1] * (v.ndim - 1)))
        return v.expand(shape)

    def keep_pre(self, t: Tensor, hook: Any) -> None:
        self.seen[hook.name] = t

    def post_for(self, pre: str):
        def post(t: Tensor, hook: Any) -> Tensor:
            gate = self.r._sliced(pre, self.r.gates[pre][self._nth(pre)], self.start)
            assert gate is not None  # None only for q/k-norm values, never a gate
            return gate * self.seen.pop(pre)
        return post

    def unembed_in(self, module: Any, args: Any) -> None:
        self.out[LOGITS] = args[0][:, self.pos].reshape(self.B, len(self.pos), -1)
        self._done()
