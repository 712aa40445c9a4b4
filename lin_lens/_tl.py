"""The TransformerLens protocol lin_lens speaks: backend classes, hook names and records, the
config flags some hooks need, and parameter bookkeeping. Everything else in lin_lens goes through
here, so one code path serves ``HookedTransformer`` and ``TransformerBridge``.

Hooks: TransformerLens's ``HookPoint.add_hook`` returns nothing and ``remove_hooks`` removes by
level or permanence, which could take a user's hooks with ours. :class:`HookSet` keeps the
``LensHandle`` that ``add_hook`` appends and removes exactly that one, so the user's hooks (and
their order) survive.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections.abc import Callable, Iterator, Sequence
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


def is_bridge(model: Any) -> bool:
    return any(c.__name__ == "TransformerBridge" for c in type(model).__mro__)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: Any) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


# -- hook names ---------------------------------------------------------------------------------

def hook_names(model: Any) -> list[str]:
    return list(model.hook_dict.keys())


def resolve_hook(model: Any, name: str):
    """The HookPoint for ``name``; :class:`UnknownHookError` with the closest names otherwise."""
    if not isinstance(name, str):
        raise UnknownHookError(f"hook names are strings, got {name!r} ({type(name).__name__})")
    try:
        return model.hook_dict[name]
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
    for name, hp in model.hook_dict.items():
        groups.setdefault(id(hp), []).append(name)
        points[id(hp)] = hp
    return {min(names, key=_standardness): points[key] for key, names in groups.items()}


def parent_module(model: Any, hook_name: str) -> torch.nn.Module:
    parent = hook_name.rsplit(".", 1)[0] if "." in hook_name else ""
    return model.get_submodule(parent)


# -- hook records -------------------------------------------------------------------------------

class HookSet:
    """Forward hooks that lin_lens adds, removed one by one on :meth:`remove`."""

    def __init__(self, model: Any):
        self.model = model
        self._handles: list[tuple[Any, Any]] = []
        self._torch_handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(self, name: str, fn: Callable, prepend: bool = False) -> None:
        hp = resolve_hook(self.model, name)
        hp.add_hook(fn, dir="fwd", prepend=prepend)
        handle = hp.fwd_hooks[0] if prepend else hp.fwd_hooks[-1]
        self._handles.append((hp, handle))

    def add_module_hook(self, module: torch.nn.Module, fn: Callable, pre: bool = False) -> None:
        """A plain torch hook, for the few places without a HookPoint (unembed, final soft cap)."""
        h = module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)
        self._torch_handles.append(h)

    def remove(self) -> None:
        while self._handles:
            hp, handle = self._handles.pop()
            handle.hook.remove()
            if handle in hp.fwd_hooks:
                hp.fwd_hooks.remove(handle)
        while self._torch_handles:
            self._torch_handles.pop().remove()

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


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


@contextlib.contextmanager
def flags_for(model: Any, hooks: Sequence[str]) -> Iterator[None]:
    """Switch on the config flags the named hooks need; restore the user's values after."""
    restore = []
    try:
        for h in hooks:
            spec = FLAG_HOOKS.get(h.rsplit(".", 1)[-1])
            if spec is None or not hasattr(model, spec[1]):
                continue
            flag, setter = spec
            before = bool(getattr(model.cfg, flag, False))
            if not before:
                getattr(model, setter)(True)
                restore.append((setter, before))
        yield
    finally:
        for setter, before in reversed(restore):
            getattr(model, setter)(before)


# -- parameters ---------------------------------------------------------------------------------

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


@contextlib.contextmanager
def requires_grad(params: dict[str, Tensor] | Sequence[Tensor], value: bool) -> Iterator[None]:
    """Set ``requires_grad`` on ``params`` for the block; the user's flags restored after, also
    on KeyboardInterrupt."""
    ps = list(params.values()) if isinstance(params, dict) else list(params)
    before = [p.requires_grad for p in ps]
    try:
        for p in ps:
            p.requires_grad_(value)
        yield
    finally:
        for p, rg in zip(ps, before, strict=True):
            p.requires_grad_(rg)
