"""The ``detached`` context: installs the freezing rules' hooks for a ``with`` block and removes
exactly those afterwards — also when the block raises, when contexts close out of order, and when
a KeyboardInterrupt lands while hooks are being added or removed. :func:`reset` restores a model
by hand if anything was left behind."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from lin_lens._hooks import HookSet, finish, strip, undo_pending
from lin_lens.freeze.gates import relinearize, softcap_gate
from lin_lens.freeze.rules import freezing_rules


def _softcap_hooks(model: Any, hs: HookSet) -> None:
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if not cap or cap <= 0:
        return
    seen: dict[str, Tensor] = {}

    def grab(module, args, out):
        seen["z"] = out

    def relin(module, args, out):
        z = seen.pop("z", None)
        if not isinstance(out, Tensor) or z is None or z.shape != out.shape:
            return None
        return relinearize(out, z, softcap_gate(z.detach(), cap))

    hs.add_module_hook(model.unembed, grab)
    hs.add_module_hook(model, relin)


class _Installed:
    """The hooks of one detached model and the open contexts that share them."""

    def __init__(self, model: Any):
        self.hooks = HookSet(model)
        self.open: set[object] = set()


_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def detached(model: Any) -> Iterator[Any]:
    """Put ``model`` in detached mode for the ``with`` block.

    Forward values are unchanged; on the gradient path every normalisation scale, attention
    pattern and activation gate is frozen, so the network is exactly linear (affine with biases)
    in its input embeddings. Nests and is re-entrant: the first open context installs the hooks
    and the last one to close removes exactly those, in whatever order the contexts close.

    Raises :class:`~lin_lens.errors.UnsupportedFeatureError` naming any feature that cannot be
    frozen exactly (before anything is installed).
    """
    token = object()
    state: _Installed | None = None
    # Every step below is undone by the finally clause whatever line an interrupt lands on:
    # membership in state.open is a single step, and hooks are recorded before they exist.
    try:
        state = _ACTIVE.get(model)
        if state is None:
            rules = freezing_rules(model)  # raises before anything is installed
            state = _Installed(model)
            _ACTIVE[model] = state
            for r in rules:
                state.hooks.add(r.hook, r.fn)
            _softcap_hooks(model, state.hooks)
        state.open.add(token)
        with warnings.catch_warnings():
            # The Bridge warns that an edited native-path norm is recomputed; that is the point.
            warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
            yield model
    finally:
        finish(lambda: _close(model, state, token))


def _close(model: Any, state: _Installed | None, token: object) -> None:
    if state is None:
        return
    state.open.discard(token)
    if not state.open:
        state.hooks.remove()
        if _ACTIVE.get(model) is state:
            del _ACTIVE[model]


def is_detached(model: Any) -> bool:
    return model in _ACTIVE


def reset(model: Any) -> Any:
    """Restore ``model`` by hand: end detached mode, remove every hook lin_lens added (the user's
    own hooks stay) and undo every config flag and ``requires_grad`` change of a lin_lens call
    that did not finish. For a model left in doubt after an interrupt; normally never needed.
    Call it when no lin_lens computation is running. Returns the model."""
    state = _ACTIVE.pop(model, None)
    if state is not None:
        state.hooks.remove()
    strip(model)
    undo_pending()
    return model


def in_functorch_transform() -> bool:
    """True inside a vmap/grad transform — or when a KeyboardInterrupt inside torch's own vmap
    bookkeeping left one open, after which autograd silently works on batched tensors."""
    level = getattr(torch._C._functorch,  # pyright: ignore[reportAttributeAccessIssue]
                    "maybe_current_level", None)  # (a private C module without stubs)
    return level is not None and level() is not None
