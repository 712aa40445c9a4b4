"""What the forward replay substitutes and what it skips, read from the freezing rules.

:func:`replay_plan` maps every freezing rule to a substitution (a frozen value recorded in the
primal pass and put back in each replay); :func:`unused_projections` lists the projections whose
output only feeds a frozen value (queries, keys, a gated MLP's gate) and the stand-ins that let
the replay skip their multiply-adds: zero-width weights on HookedTransformer, and on a Bridge the
Hugging Face gate layer's weight at width 0 and the q/k layers swapped for :class:`_Zeros`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lin_lens._tl import canonical, hook_dict, is_bridge, parent_module, wrapped_linear
from lin_lens.errors import UnsupportedFeatureError
from lin_lens.freeze import freezing_rules

QK_BRANCH = re.compile(r"\.attn\.(hook_q|hook_k|hook_rot_[qk]|[qk]_norm\.|[qk]\.)")


class ReplayUnsupported(UnsupportedFeatureError):
    """Forward-mode replay cannot reproduce this model's frozen network (the forward engine then
    takes its columns from the graph instead)."""


@dataclass
class ReplayPlan:
    """What the replay substitutes, by canonical hook name."""

    freeze: list[str] = field(default_factory=list)  # value replaced by the recorded one
    pre_post: list[tuple[str, str]] = field(default_factory=list)  # plain MLPs: pre, post
    gated: list[tuple[str, str]] = field(default_factory=list)  # gated MLPs: module, gate hook


def replay_plan(model: Any) -> ReplayPlan:
    """Which hooks the replay substitutes for ``model``'s freezing rules; raises
    :class:`ReplayUnsupported` for a rule it has no substitute for (SoLU's LayerNorm inside the
    MLP, mixtures of experts)."""
    plan = ReplayPlan()
    rules = freezing_rules(model)
    native_norms = {r.hook.rsplit(".", 1)[0] for r in rules
                    if r.hook.endswith(".hook_normalized") and r.kind == "relinearize"}
    for r in rules:
        prefix, leaf = r.hook.rsplit(".", 1) if "." in r.hook else ("", r.hook)
        if leaf == "hook_scale" and (r.detaches or prefix in native_norms):
            # a Bridge norm on Hugging Face's kernel: given a scale, it divides by it as the
            # python path does, so both replay alike
            plan.freeze.append(canonical(model, r.hook))
        elif prefix in native_norms and leaf in ("hook_in", "hook_normalized"):
            continue  # detached mode's relinearisation; the replay freezes the scale
        elif r.detaches and leaf in ("hook_pattern", "hook_pre"):
            plan.freeze.append(canonical(model, r.hook))
            if leaf == "hook_pre" and prefix + ".hook_pre_linear" in hook_dict(model):
                plan.gated.append((prefix, plan.freeze[-1]))
        elif leaf == "hook_pre" and r.kind == "cut":
            if prefix + ".hook_post" not in hook_dict(model):
                raise ReplayUnsupported(f"plain MLP {prefix} without hook_post")
            plan.pre_post.append((canonical(model, r.hook),
                                  canonical(model, prefix + ".hook_post")))
        elif leaf == "hook_post" and r.kind == "relinearize":
            continue
        elif leaf == "hook_v" and r.kind == "cut":
            continue  # clip_qkv check, values unaffected
        else:
            raise ReplayUnsupported(f"no replay rule for freezing hook {r.hook!r}")
    return plan


def replays(model: Any) -> bool:
    """Whether the forward replay follows ``model`` (else columns come from the graph)."""
    try:
        replay_plan(model)
    except ReplayUnsupported:
        return False
    return True


def unused_projections(model: Any, plan: ReplayPlan, targets: list[str],
                       biases: dict[str, Tensor]) -> tuple[dict[str, Any], set[str]]:
    """``(stand-ins by parameter, buffer or module name, the biases that only feed a frozen
    value)`` for a replay of ``targets`` (canonical names)."""
    out = {**_gate_weights(model, plan, targets), **_qk_weights(model, plan, targets)}
    held = {id(p) for name, m in out.items() if isinstance(m, _Zeros)
            for p in model.get_submodule(name).parameters()}
    dead = {n for n, p in biases.items() if n in out or id(p) in held}
    return out, dead


def _gate_weights(model: Any, plan: ReplayPlan, targets: list[str]) -> dict[str, Tensor]:
    """A zero-width stand-in for every gated MLP's gate projection: its output, the gate
    pre-activation, is replaced by the recorded value, so computing it for every tangent is a
    quarter of the replay's multiply-adds thrown away (``x @ W_gate`` then gives
    ``[B, pos, 0]`` and :meth:`Replay.run`'s hook puts the frozen value in its place). On a Bridge,
    the Hugging Face linear layer whose output the gate hook reads."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, Tensor] = {}
    for mlp, h in plan.gated:
        if h in targets:  # a target reads it live
            continue
        if is_bridge(model):
            lin = wrapped_linear(parent_module(model, h))
            if lin is None or not h.endswith(".hook_out"):
                continue
            out[names[id(lin.weight)]] = lin.weight.detach()[:0]
            if lin.bias is not None:
                out[names[id(lin.bias)]] = lin.bias.detach()[:0]
            continue
        try:
            W = model.get_parameter(mlp + ".W_gate")
        except AttributeError:
            continue
        if W.dim() == 2:
            out[mlp + ".W_gate"] = W.detach()[:, :0]
    return out


def _qk_weights(model: Any, plan: ReplayPlan, targets: list[str]) -> dict[str, Any]:
    """Zero-width stand-ins for the query and key projections (and the rotary tables) of
    every attention layer whose pattern is frozen: q and k only feed that pattern, so the
    replay would compute them for every tangent and throw them away (≈ a sixth of a Llama
    layer's multiply-adds, plus the rotary). With width 0 the scores are a zero
    ``[B, head, q, k]`` tensor, softmaxed and then replaced by the frozen pattern.

    Left live (nothing narrowed) where a target reads the Q/K branch, or where TransformerLens
    reshapes q/k by their width (q/k norms), rescales the rotary tables in the forward
    (dynamic NTK) or holds quantised weights."""
    cfg = model.cfg
    if any(QK_BRANCH.search(h) for h in targets):
        return {}
    if is_bridge(model):
        return _qk_projections(model, plan)
    if (getattr(cfg, "use_qk_norm", False) or getattr(cfg, "load_in_4bit", False)
            or getattr(cfg, "use_dynamic_ntk_rope", False)):
        return {}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    out: dict[str, Any] = {}
    for layer in range(int(cfg.n_layers)):
        prefix = f"blocks.{layer}.attn."
        if prefix + "hook_pattern" not in plan.freeze:
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


def _qk_projections(model: Any, plan: ReplayPlan) -> dict[str, torch.nn.Module]:
    """On a Bridge: the Hugging Face query and key projections of every attention layer
    whose pattern is frozen, swapped for a module that returns zeros of their width (the
    Bridge reshapes q/k by head, so width 0 is not an option there; rotary and q/k norms
    then act on zeros, and the scores are replaced by the frozen pattern)."""
    paths = {id(m): n for n, m in model.named_modules()}
    out: dict[str, torch.nn.Module] = {}
    for layer in range(int(model.cfg.n_layers)):
        prefix = f"blocks.{layer}.attn"
        if prefix + ".hook_pattern" not in plan.freeze:
            continue
        attn = model.get_submodule(prefix)
        q, k = (wrapped_linear(getattr(attn, s, None)) for s in "qk")
        if q is not None and k is not None:
            out.update({paths[id(lin)]: _Zeros(lin.out_features) for lin in (q, k)})
    return out


class _Zeros(torch.nn.Module):
    """Stands in for a projection whose output only feeds a frozen value: zeros of its width,
    without the multiply-adds."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(*x.shape[:-1], self.width)
