"""Which hook freezes what: one :class:`Rule` per hook, built from TransformerLens hook names.

==========================  ==================================================================
what                         how
==========================  ==================================================================
norm scales (``hook_scale``) ``.detach()``; on a Bridge norm that runs Hugging Face's own kernel
                             (native autograd) the *normalized* value is relinearised instead,
                             which keeps the forward bit-identical there (see ``_norm_rule``)
attention (``hook_pattern``) ``.detach()`` — V stays on the gradient path
gated MLP (``mlp.hook_pre``) ``.detach()`` the gate pre-activation, so act(gate) is frozen and the
                             up projection carries the linear path
mixture of experts           ``.detach()`` the router weights and each expert's gate
plain MLP (``mlp.hook_post``) value kept, gradient ``g(pre)·d pre`` with the analytic gate g
                             (``mlp.hook_mid`` for SoLU-LN)
final logit soft cap         value kept, gradient ``tanh(z/c)/(z/c)·dz`` (torch hooks on unembed;
                             installed by :mod:`lin_lens.freeze.mode`)
==========================  ==================================================================
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lin_lens._tl import hook_dict, is_bridge, parent_module, plain_attention_bridge, unique_hooks
from lin_lens.errors import UnsupportedFeatureError
from lin_lens.freeze.gates import check_gate, gate_fn, relinearize


@dataclass(frozen=True)
class Rule:
    """One freezing hook. ``cut`` rules only cut or observe (a value captured *before* them is
    still the live linear activation); ``relinearize`` rules replace the gradient path (capture
    after)."""

    hook: str
    fn: Callable
    kind: Literal["cut", "relinearize"]
    detaches: bool = False  # the hook's value is simply detached (a frozen factor to record)


_EXPERT_GATE = re.compile(r"experts\.\d+\.hook_gate$")


def _detach(t: Tensor, hook: Any) -> Tensor:
    return t.detach()


def _norm_rule(model: Any, scale_hook: str) -> list[Rule]:
    norm = parent_module(model, scale_hook)
    native = getattr(norm, "use_native_layernorm_autograd", False) or getattr(
        getattr(norm, "config", None), "layer_norm_folding", False
    )
    if not native:
        return [Rule(scale_hook, _detach, "cut", True)]
    # Bridge native path: an edited hook_scale makes the Bridge rebuild the norm in a different
    # order (x/scale instead of HF's x·rsqrt), changing forward values at rounding level. Leaving
    # hook_scale alone and relinearising hook_normalized keeps HF's value and its weight product.
    prefix = scale_hook.rsplit(".", 1)[0]
    rms = bool(getattr(norm, "uses_rms_norm", False))
    seen: dict[str, Tensor] = {}

    def grab_in(x: Tensor, hook: Any) -> None:
        seen["x"] = x

    def grab_scale(s: Tensor, hook: Any) -> None:
        seen["scale"] = s

    def relin(n: Tensor, hook: Any) -> Tensor:
        x = seen.pop("x")
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        xc = x if rms else x - x.mean(-1, keepdim=True)
        return n.detach() + (xc - xc.detach()) / seen.pop("scale").detach()

    return [
        Rule(f"{prefix}.hook_in", grab_in, "cut"),
        Rule(scale_hook, grab_scale, "cut"),
        Rule(f"{prefix}.hook_normalized", relin, "relinearize"),
    ]


def _attention_rule(model: Any, pattern_hook: str) -> list[Rule]:
    attn = parent_module(model, pattern_hook)
    if is_bridge(model):
        plain = plain_attention_bridge()
        if plain is not None and type(attn).forward is plain.forward:
            raise UnsupportedFeatureError(
                f"{pattern_hook}: {type(attn).__name__} runs Hugging Face's attention and fires "
                "hook_pattern after the fact, so the attention pattern cannot be frozen "
                "(edits are silently discarded). Use HookedTransformer for this architecture."
            )
    return [Rule(pattern_hook, _detach, "cut", True)]


def _mlp_rules(model: Any, pre_hook: str, hooks: dict[str, Any]) -> list[Rule]:
    prefix = pre_hook.rsplit(".", 1)[0]
    act = getattr(model.cfg, "act_fn", None)
    if f"{prefix}.hook_gate" in hooks:
        raise UnsupportedFeatureError(
            f"{prefix}: GPT-OSS-style expert MLP (clamped GLU with an offset, (up + 1)·glu) "
            "is not act(x)·x and cannot be frozen exactly"
        )
    if f"{prefix}.hook_pre_linear" in hooks:  # gated: freeze act(gate) entirely
        if act and act.endswith("_ln"):
            raise UnsupportedFeatureError(f"{prefix}: gated MLP with {act!r} activation")
        gate_fn(act)  # refuse activations we could not name
        return [Rule(pre_hook, _detach, "cut", True)]

    gate = gate_fn(act)
    at = f"{prefix}.hook_mid" if act and act.endswith("_ln") and f"{prefix}.hook_mid" in hooks \
        else f"{prefix}.hook_post"
    seen: dict[str, Tensor] = {}

    def grab_pre(pre: Tensor, hook: Any) -> None:
        seen["pre"] = pre

    def relin(value: Tensor, hook: Any) -> Tensor:
        pre = seen.pop("pre")
        g = gate(pre.detach())
        check_gate(hook.name, act, value.detach(), pre.detach(), g)
        return relinearize(value, pre, g)

    return [Rule(pre_hook, grab_pre, "cut"), Rule(at, relin, "relinearize")]


def _clip_qkv_rule(model: Any, v_hook: str) -> list[Rule]:
    clip = getattr(model.cfg, "clip_qkv", None)
    if not clip:
        return []

    def check(v: Tensor, hook: Any) -> None:
        if float(v.detach().abs().max()) > clip:
            raise UnsupportedFeatureError(
                f"{hook.name}: clip_qkv={clip} clamps V on this input; a clamp cannot be "
                "frozen exactly on the value path"
            )

    return [Rule(v_hook, check, "cut")]


def freezing_rules(model: Any) -> list[Rule]:
    """The hooks that put ``model`` in detached mode (raises on features we cannot freeze)."""
    hooks = unique_hooks(model)
    rules: list[Rule] = []
    for name in hooks:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "hook_scale":
            rules += _norm_rule(model, name)
        elif leaf == "hook_pattern":
            rules += _attention_rule(model, name)
        elif leaf == "hook_pre" and name.endswith("mlp.hook_pre"):
            rules += _mlp_rules(model, name, hooks)
        elif leaf == "hook_v" and name.endswith("attn.hook_v"):
            rules += _clip_qkv_rule(model, name)
        elif leaf == "hook_expert_weights" or _EXPERT_GATE.search(name):
            if _gpt_oss(model, name):
                raise UnsupportedFeatureError(
                    f"{name}: GPT-OSS-style expert MLP ((clamp(up) + 1)·glu(clamp(gate)): an "
                    "offset and clamps, not act(x)·x) cannot be frozen exactly")
            # MoE: the router's softmax weights (top-k choice is discrete) and each expert's
            # act(gate) are frozen; each expert's up projection carries the linear path.
            rules.append(Rule(name, _detach, "cut", True))
    return rules


def _gpt_oss(model: Any, hook: str) -> bool:
    arch = str(getattr(model.cfg, "original_architecture", "") or "")
    return "GptOss" in arch or "GptOss" in type(parent_module(model, hook)).__name__


def cut_hooks(model: Any) -> set[str]:
    """Hook names where detached mode only cuts the gradient (a value read before the cut is
    still the live activation, e.g. a gated MLP's gate pre-activation)."""
    return {r.hook for r in freezing_rules(model) if r.detaches}


def read_before_cut(model: Any, hook: str, cuts: set[str] | None = None) -> bool:
    """Whether a linear activation at ``hook`` must be read before detached mode's own hook
    there: a hook whose value detached mode detaches (a gated MLP's gate pre-activation is
    linear, but cut right at its hook); every other hook is read after lin_lens's hooks.
    ``cuts``: :func:`cut_hooks` of the model, when the caller has them already."""
    if hook == "logits" or hook not in hook_dict(model):
        return False
    name = hook_dict(model)[hook].name or hook
    cuts = cut_hooks(model) if cuts is None else cuts
    return any((hook_dict(model)[c].name or c) == name for c in cuts)
