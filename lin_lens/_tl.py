"""The TransformerLens protocol lin_lens speaks: backend classes, hook names and their
resolution, the config flags some hooks need, and parameter bookkeeping. Every TransformerLens
import of lin_lens goes through here, so one code path serves ``HookedTransformer`` and
``TransformerBridge``. What lin_lens changes on a model for a computation, and how it is undone
(hook records, flags, ``requires_grad``, the undo registry), is :mod:`lin_lens._hooks`.
"""

from __future__ import annotations

import difflib
import warnings
import weakref
from importlib import metadata
from typing import Any

import torch
from torch import Tensor

from lin_lens.errors import UnknownHookError

LOGITS = "logits"

# -- backends -----------------------------------------------------------------------------------
# TransformerLens 3.x ships HookedTransformer and TransformerBridge (under model_bridge); 4.x
# removed HookedTransformer. Only loaders and tests need the classes themselves.
try:  # transformer_lens 4.x has no __version__ attribute
    TL_VERSION: str = metadata.version("transformer_lens")
except metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    TL_VERSION = "unknown"

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        from transformer_lens import HookedTransformer  # TL ≤ 3.x
    except ImportError:  # TL 4.x
        HookedTransformer = None  # type: ignore[assignment,misc]

try:
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:  # pragma: no cover - TL < 3.0
    TransformerBridge = None  # type: ignore[assignment,misc]

HAS_HOOKED = HookedTransformer is not None
HAS_BRIDGE = TransformerBridge is not None


try:  # architectures whose ln1/ln2 normalise a sublayer's output (OLMo 2/3)
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
except ImportError:  # pragma: no cover - older TransformerLens
    POST_NORM_ARCHITECTURES = {"Olmo2ForCausalLM", "Olmo3ForCausalLM"}


def hooked_config_class() -> Any:
    """``HookedTransformerConfig`` (TransformerLens ≤ 3.x; None on 4.x)."""
    if not HAS_HOOKED:
        return None
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig


def tl_loading() -> Any:
    """TransformerLens's ``loading_from_pretrained`` module (≤ 3.x: configs and state dicts of
    HookedTransformer from a Hugging Face model)."""
    from transformer_lens import loading_from_pretrained

    return loading_from_pretrained


def official_model_name(name: str) -> str | None:
    """TransformerLens's official (Hugging Face) name for a model name or alias
    (``"gpt2-small"`` → ``"gpt2"``), or None for a name TransformerLens does not list."""
    try:
        from transformer_lens.supported_models import (  # 4.x
            get_official_model_name,  # pyright: ignore[reportAttributeAccessIssue] (TL 4.x only)
        )
    except ImportError:
        try:
            from transformer_lens.loading_from_pretrained import (  # pyright: ignore[reportMissingImports] (TL 3.x only)
                get_official_model_name,
            )
        except ImportError:  # pragma: no cover - neither layout
            return None
    try:
        return str(get_official_model_name(name))
    except ValueError:
        return None


def plain_attention_bridge() -> type | None:
    """The Bridge's plain ``AttentionBridge`` (runs Hugging Face's attention and fires
    ``hook_pattern`` after the fact), or None without a Bridge."""
    if not HAS_BRIDGE:
        return None
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    return AttentionBridge


def is_bridge(model: Any) -> bool:
    return any(c.__name__ == "TransformerBridge" for c in type(model).__mro__)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: Any) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


# -- hook names ---------------------------------------------------------------------------------

_HOOK_DICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hook_dict(model: Any) -> dict[str, Any]:
    """``model.hook_dict``, read once per state of a Bridge's hook registry. A Bridge rebuilds the
    dict with every alias on each access (≈ 4 ms on SmolLM2, and one map reads it hundreds of
    times); the registry only grows (capture hooks are wired on the first forward pass), so its
    size tells a stale copy. Read-only: do not modify the result."""
    reg = getattr(model, "_hook_registry", None)
    if not isinstance(reg, dict):
        return model.hook_dict
    key = (id(reg), len(reg))
    got = _HOOK_DICTS.get(model)
    if got is None or got[0] != key:
        got = (key, model.hook_dict)
        _HOOK_DICTS[model] = got
    return got[1]


def hook_names(model: Any) -> list[str]:
    return list(hook_dict(model).keys())


def resolve_hook(model: Any, name: str):
    """The HookPoint for ``name``; :class:`UnknownHookError` with the closest names otherwise."""
    if not isinstance(name, str):
        raise UnknownHookError(f"hook names are strings, got {name!r} ({type(name).__name__})")
    try:
        return hook_dict(model)[name]
    except KeyError:
        pass
    candidates = hook_names(model) + [LOGITS]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownHookError(
        f"Unknown hook {name!r} for this {type(model).__name__} "
        f"({len(candidates)} hooks; see model.hook_dict).{hint}"
    ) from None


def canonical(model: Any, name: str) -> str:
    """The HookPoint's own name (a Bridge alias such as ``hook_embed`` → ``embed.hook_out``)."""
    return name if name == LOGITS else (resolve_hook(model, name).name or name)


_STANDARD_LEAVES = (
    "hook_scale", "hook_normalized", "hook_pattern", "hook_pre", "hook_pre_linear", "hook_post",
    "hook_mid", "hook_v", "hook_z", "hook_result", "hook_embed", "hook_pos_embed",
)


def _standardness(name: str) -> tuple[int, int, str]:
    leaf = name.rsplit(".", 1)[-1]
    return (0 if leaf in _STANDARD_LEAVES else 1, len(name), name)


def unique_hooks(model: Any) -> dict[str, Any]:
    """One name per HookPoint → HookPoint, preferring TransformerLens's standard alias names.

    On the Bridge, ``blocks.0.mlp.hook_pre`` is an alias of ``blocks.0.mlp.in.hook_out``; lin_lens
    speaks the standard names, so those win over the Bridge's canonical ones.
    """
    groups: dict[int, list[str]] = {}
    points: dict[int, Any] = {}
    for name, hp in hook_dict(model).items():
        groups.setdefault(id(hp), []).append(name)
        points[id(hp)] = hp
    return {min(names, key=_standardness): points[key] for key, names in groups.items()}


def parent_module(model: Any, hook_name: str) -> torch.nn.Module:
    parent = hook_name.rsplit(".", 1)[0] if "." in hook_name else ""
    return model.get_submodule(parent)


def block_of(hook: str) -> int | None:
    """The block index of a ``blocks.L.…`` name, else None."""
    parts = hook.split(".", 2)
    return int(parts[1]) if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() \
        else None


def wrapped_linear(component: Any) -> torch.nn.Linear | None:
    """The Hugging Face ``nn.Linear`` a Bridge component wraps (None for anything else)."""
    lin = getattr(component, "original_component", None)
    return lin if isinstance(lin, torch.nn.Linear) else None


# -- config flags -------------------------------------------------------------------------------

# Hooks that only fire while a config flag is on; lin_lens switches the flag on for the call.
FLAG_HOOKS = {
    "hook_result": ("use_attn_result", "set_use_attn_result"),
    "hook_attn_in": ("use_attn_in", "set_use_attn_in"),
    "hook_q_input": ("use_split_qkv_input", "set_use_split_qkv_input"),
    "hook_k_input": ("use_split_qkv_input", "set_use_split_qkv_input"),
    "hook_v_input": ("use_split_qkv_input", "set_use_split_qkv_input"),
    "hook_mlp_in": ("use_hook_mlp_in", "set_use_hook_mlp_in"),
}


# -- parameters ---------------------------------------------------------------------------------

def clean_name(name: str) -> str:
    """``transformer.h.0._original_component.ln_1._original_component.bias`` → ``transformer.h.0
    .ln_1.bias`` (the Bridge's wrapper segments carry no meaning for a reader)."""
    return name.replace("._original_component", "").replace("_original_component.", "")


def is_bias(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1].lstrip("_")  # GQA stores _b_K/_b_V
    return leaf == "bias" or leaf == "b" or leaf.startswith("b_")


def biases(model: Any, nonzero: bool = True) -> dict[str, Tensor]:
    """Bias parameters by name (``nonzero``: only those with a nonzero entry: an all-zero bias,
    which TransformerLens keeps for Llama-style models, contributes an exactly zero constant)."""
    return {n: p for n, p in model.named_parameters()
            if is_bias(n) and p.is_floating_point()
            and (not nonzero or bool(p.detach().ne(0).any()))}


def nonzero_bias(module: Any, name: str) -> Tensor | None:
    """``module.<name>`` detached if it is a tensor with a nonzero entry, else None."""
    b = getattr(module, name, None)
    if isinstance(b, Tensor) and bool(b.detach().ne(0).any()):
        return b.detach()
    return None
