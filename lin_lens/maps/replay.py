"""Forward-mode replay: the frozen network run on batches of source tangents.

The detached network is linear in the source, every bias and the positional embedding, with the
norm scales, attention patterns and MLP gates frozen at their values for this input. We record
those frozen factors in one primal pass, then *replay* the model on a batch of basis tangents with
the frozen factors substituted through the same TransformerLens hooks, every bias zeroed
(``torch.func.functional_call``, the model is not modified) and the positional embedding zeroed.
That replay is the JVP of the detached network (a plain batched forward, no autograd), and one
replay gives the columns of the operator at *every* requested hook at once. The constant term of
each origin is its own replay with the source at zero and only that origin at its value: exact and
computed independently of ``act − Σ J x``. (Why a replay and not ``torch.func.jvp``: BENCHMARKS.md.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lin_lens._hooks import HookSet
from lin_lens._tl import LOGITS, biases, canonical, hook_dict, is_bridge
from lin_lens.errors import InvalidArgumentError, UnsupportedFeatureError
from lin_lens.freeze import freezing_rules
from lin_lens.freeze.gates import gate_fn
from lin_lens.maps.graph import _Stop

_QK_BRANCH = re.compile(r"\.attn\.(hook_q|hook_k|hook_rot_[qk]|[qk]_norm\.)")


class ReplayUnsupported(UnsupportedFeatureError):
    """Forward-mode replay cannot reproduce this model's frozen network (the forward engine then
    takes its columns from the graph instead)."""


def layer_of(model: Any, hook: str) -> int:
    """The block index of ``blocks.L.…`` hooks; the last layer for everything after them."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) if m else int(model.cfg.n_layers) - 1


class Replay:
    """Frozen factors of one input, and the linear (detached, bias-free) network replayed on
    batches of source tangents.

    Use :meth:`recorder` inside a detached forward pass to fill the factors, then :meth:`run`.
    """

    def __init__(self, model: Any, tokens: Tensor, source: str, targets: Sequence[str],
                 positions: Sequence[int]):
        if is_bridge(model):
            raise ReplayUnsupported("forward-mode replay follows HookedTransformer only")
        self.model, self.tokens, self.source = model, tokens, source
        self.targets, self.positions = list(targets), list(positions)
        self.freeze: list[str] = []  # hooks whose value is replaced by the recorded one
        self.pre_post: list[tuple[str, str]] = []  # plain MLPs: (pre hook, post hook)
        act = getattr(model.cfg, "act_fn", None)
        for r in freezing_rules(model):
            leaf = r.hook.rsplit(".", 1)[-1]
            if r.detaches and leaf in ("hook_scale", "hook_pattern", "hook_pre"):
                self.freeze.append(r.hook)
            elif leaf == "hook_pre" and r.kind == "cut":
                self.pre_post.append((r.hook, r.hook[: -len("hook_pre")] + "hook_post"))
            elif leaf == "hook_post" and r.kind == "relinearize":
                continue
            elif leaf == "hook_v" and r.kind == "cut":
                continue  # clip_qkv check, values unaffected
            else:
                raise ReplayUnsupported(f"no replay rule for freezing hook {r.hook!r}")
        if any(post not in hook_dict(model) for _, post in self.pre_post):
            raise ReplayUnsupported("plain MLP without hook_post")
        self._gate = gate_fn(act) if self.pre_post else None
        # one frozen value per firing, in order (a norm fires three times per block with
        # use_split_qkv_input: on the q, k and v inputs)
        self.values: dict[str, list[Tensor]] = {}
        self.gates: dict[str, list[Tensor]] = {}
        self.pos_origin = ("hook_pos_embed" in hook_dict(model)
                           and canonical(model, "hook_pos_embed") != canonical(model, source))
        last = max(layer_of(model, h) for h in self.targets)
        blocks_only = all(h.startswith("blocks.") for h in self.targets)
        self.stop_at = last + 1 if blocks_only else None
        self.biases = biases(model, nonzero=False)
        self._zeros = {n: torch.zeros_like(p) for n, p in self.biases.items()}
        self._narrow = {**self._unused_gate_weights(), **self._unused_qk_weights()}

    def _unused_gate_weights(self) -> dict[str, Tensor]:
        """A zero-width stand-in for every gated MLP's ``W_gate``: its output, the gate
        pre-activation, is replaced by the recorded value, so computing it for every tangent is a
        quarter of the replay's multiply-adds thrown away (``x @ W_gate`` then gives
        ``[B, pos, 0]`` and :meth:`run`'s hook puts the frozen value in its place)."""
        out: dict[str, Tensor] = {}
        for h in self.freeze:
            mlp = h[: -len("hook_pre")]  # "blocks.L.mlp."
            if (not h.endswith("mlp.hook_pre") or h in self.targets  # a target reads it live
                    or mlp + "hook_pre_linear" not in hook_dict(self.model)):
                continue
            name = mlp + "W_gate"
            try:
                W = self.model.get_parameter(name)
            except AttributeError:
                continue
            if W.dim() == 2:
                out[name] = W.detach()[:, :0]
        return out

    def _unused_qk_weights(self) -> dict[str, Tensor]:
        """Zero-width stand-ins for the query and key projections (and the rotary tables) of
        every attention layer whose pattern is frozen: q and k only feed that pattern, so the
        replay would compute them for every tangent and throw them away (≈ a sixth of a Llama
        layer's multiply-adds, plus the rotary). With width 0 the scores are a zero
        ``[B, head, q, k]`` tensor, softmaxed and then replaced by the frozen pattern.

        Left live (nothing narrowed) where a target reads the Q/K branch, or where TransformerLens
        reshapes q/k by their width (q/k norms), rescales the rotary tables in the forward
        (dynamic NTK) or holds quantised weights."""
        model, cfg = self.model, self.model.cfg
        if (any(_QK_BRANCH.search(h) for h in self.targets)
                or getattr(cfg, "use_qk_norm", False) or getattr(cfg, "load_in_4bit", False)
                or getattr(cfg, "use_dynamic_ntk_rope", False)):
            return {}
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        out: dict[str, Tensor] = {}
        for layer in range(int(cfg.n_layers)):
            prefix = f"blocks.{layer}.attn."
            if prefix + "hook_pattern" not in self.freeze:
                continue
            attn = model.get_submodule(prefix[:-1])
            if any(getattr(attn, n, None) is not None for n in ("q_norm", "k_norm")):
                continue
            names = [n for n in ("W_Q", "_W_Q", "W_K", "_W_K", "b_Q", "_b_Q", "b_K", "_b_K")
                     if prefix + n in params]
            if not ({"W_Q", "_W_Q"} & set(names) and {"W_K", "_W_K"} & set(names)):
                continue
            narrow = {prefix + n: params[prefix + n].detach()[..., :0] for n in names}
            for n in ("rotary_sin", "rotary_cos"):
                if prefix + n in buffers:
                    narrow[prefix + n] = buffers[prefix + n][..., :0]
            out.update(narrow)
        return out

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
        if v.ndim >= 2 and v.shape[0] == 1 and v.shape[1] == n:
            return v[:, start:]
        if ".attn.q_" in name or ".attn.k_" in name:  # q/k norms only feed the frozen pattern
            return None
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
        model = self.model
        if start and any(_QK_BRANCH.search(h) for h in self.targets):
            # a shifted replay moves the rotary angle and leaves q/k norms live: exact after
            # the frozen pattern only (the caller falls back to full-length columns)
            raise ReplayUnsupported("a target in the Q/K branch needs full-length replays")
        B = 1 if tangent is None else tangent.shape[0]
        tokens = self.tokens[:, start:].expand(B, -1)
        params = {**self._zeros, **self._narrow}
        if origin is not None and origin in self.biases:
            params[origin] = self.biases[origin].detach()
        p = _ReplayPass(self, tangent, origin, readout_input, start, B)
        first = [h for h in self.targets if h in self.freeze]
        with HookSet(model) as hs, torch.no_grad():
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
                torch.func.functional_call(model, params, (tokens,), kw, strict=False)
            except _Stop:
                pass
        missing = p.want - p.out.keys()
        if missing:
            raise InvalidArgumentError(f"hooks did not fire in the replay: {sorted(missing)}")
        return p.out

    def origins(self) -> list[str]:
        # a narrowed q/k bias only feeds the frozen pattern: its constant is exactly zero
        names = [n for n, p in self.biases.items()
                 if n not in self._narrow and bool(p.detach().ne(0).any())]
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
        if t.shape[-1] == 0 and v.shape[-1] != 0:  # a narrowed gate (_unused_gate_weights)
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
