"""The ``detached`` context: installs the freezing rules' hooks for a ``with`` block and removes
exactly those afterwards."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from lin_lens._tl import HookSet
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


_DEPTH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def detached(model: Any) -> Iterator[Any]:
    """Put ``model`` in detached mode for the ``with`` block.

    Forward values are unchanged; on the gradient path every normalisation scale, attention
    pattern and activation gate is frozen, so the network is exactly linear (affine with biases)
    in its input embeddings. Nests and is re-entrant: only the outermost block installs hooks.
    On exit, even through an exception, exactly the hooks added here are removed.

    Raises :class:`UnsupportedFeatureError` naming any feature that cannot be frozen exactly.
    """
    depth = _DEPTH.get(model, 0)
    if depth:
        _DEPTH[model] = depth + 1
        try:
            yield model
        finally:
            _DEPTH[model] -= 1
        return
    rules = freezing_rules(model)  # raises before anything is installed
    hs = HookSet(model)
    try:
        for r in rules:
            hs.add(r.hook, r.fn)
        _softcap_hooks(model, hs)
        _DEPTH[model] = 1
        with warnings.catch_warnings():
            # The Bridge warns that an edited native-path norm is recomputed; that is the point.
            warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
            yield model
    finally:
        hs.remove()
        _DEPTH.pop(model, None)


def is_detached(model: Any) -> bool:
    return _DEPTH.get(model, 0) > 0


