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
import signal
import threading
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


def _pending(undo: Callable[[], Any]) -> Callable[[], None]:
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
    restore: list[tuple[str, bool]] = []

    def undo() -> None:
        while restore:
            setter, before = restore[-1]
            getattr(model, setter)(before)
            restore.pop()

    done = _pending(undo)
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

    def undo() -> None:
        for p, rg in zip(ps, before, strict=True):
            p.requires_grad_(rg)

    done = _pending(undo)
    try:
        for p in ps:
            p.requires_grad_(value)
        yield
    finally:
        finish(done)
