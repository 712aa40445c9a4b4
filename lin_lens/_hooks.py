"""What lin_lens changes on a model for the length of a computation, and how it is undone: hook
records with exact removal, config flags, ``requires_grad``; clean-up that a Ctrl-C cannot cut
short, and the undo registry behind :func:`lin_lens.reset`.

TransformerLens's ``HookPoint.add_hook`` returns nothing and ``remove_hooks`` removes by level or
permanence, which could take a user's hooks with ours. :class:`HookSet` records each hook before it
registers it and removes exactly those, so the user's hooks (and their order) survive; anything
lin_lens registered is tagged, so :func:`strip` finds it even after an interrupt.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lin_lens._tl import FLAG_HOOKS, resolve_hook


class _Tagged:
    """A hook function marked as lin_lens's: TransformerLens names its wrapper after
    ``repr(fn)`` and torch keeps the object, so :func:`strip` can find every hook we added even
    when an interrupt landed between registering one and recording its handle."""

    __lin_lens__ = True

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.fn(*args, **kw)

    def __repr__(self) -> str:  # unique per hook: HookSet finds its own by this name
        return f"<lin_lens hook {getattr(self.fn, '__qualname__', 'fn')} {id(self):#x}>"


def _ours(fn: Any) -> bool:
    return bool(getattr(fn, "__lin_lens__", False)) or str(
        getattr(fn, "__name__", "")).startswith("<lin_lens hook")


def strip(model: Any) -> int:
    """Remove every hook lin_lens added to ``model`` (HookPoints and plain torch hooks); the
    user's hooks stay. Returns how many were removed."""
    removed = 0
    for module in model.modules():
        for store in (module._forward_hooks, module._forward_pre_hooks):
            for hid in [k for k, fn in store.items() if _ours(fn)]:
                del store[hid]
                for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                              "_forward_pre_hooks_with_kwargs"):
                    getattr(module, extra, {}).pop(hid, None)
                removed += 1
        lens = getattr(module, "fwd_hooks", None)
        if isinstance(lens, list):  # a HookPoint's own records of its hooks
            lens[:] = [h for h in lens if getattr(getattr(h, "hook", None), "id", None)
                       in module._forward_hooks]
    return removed


# Undo steps of lin_lens contexts that are still open (config flags, requires_grad), newest last:
# registered *before* the change they undo, so `undo_pending` (lin_lens.reset) can restore a
# model whatever line an interrupt landed on.
_PENDING: list[Callable[[], Any]] = []


def pending(undo: Callable[[], Any]) -> Callable[[], None]:
    """Register ``undo`` and return the step that runs it and unregisters it."""
    _PENDING.append(undo)

    def done() -> None:  # a no-op once reset() has run it
        if undo in _PENDING:
            undo()
            _PENDING.remove(undo)

    return done


def undo_pending() -> int:
    """Run every registered undo step (newest first); returns how many ran."""
    n = 0
    while _PENDING:
        _PENDING.pop()()
        n += 1
    return n


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """A Ctrl-C during the block is held and raised after it (main thread only; elsewhere a
    no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    except ValueError:  # not in the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.default_int_handler)
        if held:
            raise KeyboardInterrupt


def finish(*steps: Callable[[], Any]) -> None:
    """Run clean-up steps to the end: a Ctrl-C arriving meanwhile is held until they are done,
    and a KeyboardInterrupt raised inside a step (e.g. from a trace function) makes it retry
    once; then the interrupt is re-raised. A model is never left half restored."""
    pending: BaseException | None = None
    with _sigint_deferred():
        for step in steps:
            for _ in range(2):
                try:
                    step()
                    break
                except KeyboardInterrupt as e:
                    pending = e
    if pending is not None:
        raise pending


class HookSet:
    """Forward hooks that lin_lens adds, removed exactly on :meth:`remove` (the user's hooks and
    their order survive). Each hook is recorded *before* it is registered, so an interrupt at any
    point leaves nothing that :meth:`remove` cannot find."""

    def __init__(self, model: Any):
        self.model = model
        self._tags: list[tuple[torch.nn.Module, _Tagged]] = []

    def add(self, name: str, fn: Callable, prepend: bool = False) -> None:
        hp = resolve_hook(self.model, name)
        tag = _Tagged(fn)
        self._tags.append((hp, tag))
        hp.add_hook(tag, dir="fwd", prepend=prepend)

    def add_module_hook(self, module: torch.nn.Module, fn: Callable, pre: bool = False) -> None:
        """A plain torch hook, for the few places without a HookPoint (unembed, final soft cap)."""
        tag = _Tagged(fn)
        self._tags.append((module, tag))
        if pre:
            module.register_forward_pre_hook(tag)
        else:
            module.register_forward_hook(tag)

    def _drop_all(self) -> None:
        while self._tags:
            module, tag = self._tags[-1]
            _drop(module, tag)
            self._tags.pop()

    # Both go straight to finish(): no statement of ours runs between the start of clean-up and
    # the point where a Ctrl-C is held (a nested ``def`` or a call to remove() would be one).
    def remove(self) -> None:
        finish(self._drop_all)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc) -> None:
        finish(self._drop_all)


def _drop(module: torch.nn.Module, tag: _Tagged) -> None:
    """Remove ``tag``'s registration from ``module`` (TransformerLens wraps it in a function
    named ``repr(tag)``), and the HookPoint's record of it."""
    name = repr(tag)
    for store in (module._forward_hooks, module._forward_pre_hooks):
        for hid in [k for k, fn in store.items()
                    if fn is tag or getattr(fn, "__name__", None) == name]:
            del store[hid]
            for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                          "_forward_pre_hooks_with_kwargs"):
                getattr(module, extra, {}).pop(hid, None)
    lens = getattr(module, "fwd_hooks", None)
    if isinstance(lens, list):
        lens[:] = [h for h in lens
                   if getattr(getattr(h, "hook", None), "id", None) in module._forward_hooks]


# -- reversible changes -------------------------------------------------------------------------

@contextlib.contextmanager
def flags_for(model: Any, hooks: Sequence[str]) -> Iterator[None]:
    """Switch on the config flags the named hooks need; restore the user's values after."""
    restore: list[tuple[str, bool]] = []

    def undo() -> None:
        while restore:
            setter, before = restore[-1]
            getattr(model, setter)(before)
            restore.pop()

    done = pending(undo)
    try:
        for h in hooks:
            spec = FLAG_HOOKS.get(h.rsplit(".", 1)[-1])
            if spec is None or not hasattr(model, spec[1]):
                continue
            flag, setter = spec
            before = bool(getattr(model.cfg, flag, False))
            if not before:
                restore.append((setter, before))
                getattr(model, setter)(True)
        yield
    finally:
        finish(done)


@contextlib.contextmanager
def requires_grad(params: dict[str, Tensor] | Sequence[Tensor], value: bool) -> Iterator[None]:
    """Set ``requires_grad`` on ``params`` for the block; the user's flags restored after, also
    on KeyboardInterrupt."""
    ps = list(params.values()) if isinstance(params, dict) else list(params)
    before = [p.requires_grad for p in ps]

    def undo() -> None:
        for p, rg in zip(ps, before, strict=True):
            p.requires_grad_(rg)

    done = pending(undo)
    try:
        for p in ps:
            p.requires_grad_(value)
        yield
    finally:
        finish(done)


@contextlib.contextmanager
def zeroed(param: Tensor) -> Iterator[None]:
    """Zero a parameter for the block (an ablation); its values restored after, also on
    KeyboardInterrupt (and by :func:`lin_lens.reset` after a call that never finished)."""
    saved = param.detach().clone()

    def undo() -> None:
        with torch.no_grad():
            param.copy_(saved)

    done = pending(undo)
    try:
        with torch.no_grad():
            param.zero_()
        yield
    finally:
        finish(done)


Slots = dict[str, list[tuple[dict, str]]]


def slots_of(model: torch.nn.Module, names: Sequence[str]) -> Slots:
    """Every place that holds each named parameter, buffer or submodule: ``{name: [(the
    ``_parameters``, ``_buffers`` or ``_modules`` dict of a module, key), …]}``. A Bridge reaches
    one module by two paths (its own component and the Hugging Face model it wraps), where
    ``torch.func.functional_call`` restores such a parameter to its stand-in; :func:`swapped`
    replaces and restores each holder once."""
    held: dict[int, list[tuple[dict, str]]] = {}
    for mod in model.modules():  # each module object once
        for store in (mod._parameters, mod._buffers, mod._modules):
            for key, t in store.items():
                if t is not None:
                    held.setdefault(id(t), []).append((store, key))
    out: Slots = {}
    for name in names:
        # the holder's own dicts: a Bridge component may define a property of the same name
        path, _, key = name.rpartition(".")
        mod = model.get_submodule(path)
        t = next((store[key] for store in (mod._parameters, mod._buffers, mod._modules)
                  if store.get(key) is not None), None)
        if t is None:
            raise AttributeError(f"{name!r} is not a parameter, buffer or submodule")
        out[name] = held[id(t)]
    return out


@contextlib.contextmanager
def swapped(slots: Slots, tensors: dict[str, Any]) -> Iterator[None]:
    """Stand-ins for parameters, buffers and submodules (by name, places from :func:`slots_of`)
    for the block; the originals are back after, also on KeyboardInterrupt (and by
    :func:`lin_lens.reset` after a call that never finished)."""
    saved = [(store, key, store[key]) for name in tensors for store, key in slots[name]]

    def undo() -> None:
        for store, key, t in saved:
            store[key] = t

    done = pending(undo)
    try:
        for name, t in tensors.items():
            for store, key in slots[name]:
                store[key] = t
        yield
    finally:
        finish(done)
