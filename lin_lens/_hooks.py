"""Adding and removing lin_lens's own hooks without touching anyone else's.

TransformerLens's ``HookPoint.add_hook`` returns nothing and ``remove_hooks`` removes by level or
permanence, which could take a user's hooks with ours. We keep the ``LensHandle`` that ``add_hook``
appends and remove exactly that one, so the user's hooks (and their order) survive.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch

LOGITS = "logits"


class UnknownHookError(KeyError):
    """A hook name that the model does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


def hook_names(model: Any) -> list[str]:
    return list(model.hook_dict.keys())


def resolve_hook(model: Any, name: str):
    """The HookPoint for ``name``; a clear error with the closest names otherwise."""
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
        if pre:
            h = module.register_forward_pre_hook(fn)
        else:
            h = module.register_forward_hook(fn)
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
