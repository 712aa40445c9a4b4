"""Full float32 precision for lin_lens's computations: no TensorFloat-32 (or bf16) matmuls.

TF32 keeps a 10-bit mantissa (a relative rounding error of about 1e-3 per product), so a float32
map computed with it on an Ampere-or-later GPU has an error near 1e-3 (7.5e-4 measured on an
H200), above the float32 exactness bound (``default_tolerance``: 1e-4; the tests assert 1e-5);
``torch.set_float32_matmul_precision("medium")`` does the same to CPU matmuls on oneDNN (bf16).
:func:`exact_matmul` turns all of it off for the duration of a lin_lens call and puts the
user's settings back afterwards, also after an exception or a Ctrl-C (and
:func:`lin_lens.reset` puts them back after a call that never finished). Nested and concurrent
calls share one saved copy of the user's settings: the first call in saves and switches, the
last one out restores. On a CPU-only machine with default settings it changes nothing.

``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1`` forces TF32 in cuBLAS whatever the flags say; lin_lens
cannot undo that and warns once when it is set.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from lin_lens._hooks import finish, pending

# torch ≥ 2.9 also has per-backend ``fp32_precision`` settings ("ieee", "tf32", "bf16", "none" =
# inherit from the parent); the legacy flags are views of them. These are saved and restored
# as they are, so a restore is exact whichever API the user set them with.
_NEW_API = ("", "cuda", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn",
            "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")
_LOCK = threading.RLock()
_HOLDERS: list[object] = []  # one token per lin_lens call now running under exact_matmul
_SAVED: list[dict[str, Any]] = []  # the user's settings while any call runs (0 or 1 entries)
_WARNED: list[bool] = []


def _backend(path: str) -> Any:
    obj: Any = torch.backends
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
    return obj


def _read(get: Any) -> Any:
    try:
        return get()
    except (AttributeError, RuntimeError):  # absent here, or an inconsistent mix torch refuses
        return None


def settings() -> dict[str, Any]:
    """The precision settings in force (the legacy flags, and each backend's ``fp32_precision``
    where this torch has them); an entry torch cannot read is None."""
    out: dict[str, Any] = {
        "float32_matmul_precision": _read(torch.get_float32_matmul_precision),
        "cuda.matmul.allow_tf32": _read(lambda: torch.backends.cuda.matmul.allow_tf32),
        "cudnn.allow_tf32": _read(lambda: torch.backends.cudnn.allow_tf32),
    }
    for path in _NEW_API:
        value = _read(lambda p=path: _backend(p).fp32_precision)
        if isinstance(value, str):
            out[f"{path or 'torch'}.fp32_precision"] = value
    return out


def _set_exact() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    for path in ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul"):
        if isinstance(_read(lambda p=path: _backend(p).fp32_precision), str):
            _backend(path).fp32_precision = "ieee"  # explicit: "none" could inherit TF32


def _restore(saved: dict[str, Any]) -> None:
    """Put ``saved`` back: the legacy flags first (so that torch's legacy getters stay
    readable), then any per-backend setting that still differs."""
    if saved["cuda.matmul.allow_tf32"] is not None:
        torch.backends.cuda.matmul.allow_tf32 = saved["cuda.matmul.allow_tf32"]
    if saved["cudnn.allow_tf32"] is not None:
        torch.backends.cudnn.allow_tf32 = saved["cudnn.allow_tf32"]
    if saved["float32_matmul_precision"] is not None:  # last: it sets cuBLAS's flag too
        torch.set_float32_matmul_precision(saved["float32_matmul_precision"])
    for path in _NEW_API:  # parents before children; only what the legacy setters missed
        value = saved.get(f"{path or 'torch'}.fp32_precision")
        if value is not None and _read(lambda p=path: _backend(p).fp32_precision) != value:
            _backend(path).fp32_precision = value


def _warn_override() -> None:
    if _WARNED or os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0") in ("", "0"):
        return
    _WARNED.append(True)
    warnings.warn(
        "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE is set: cuBLAS uses TF32 whatever lin_lens asks, so "
        "float32 maps on a GPU will miss the exactness bound (unset it, or use float64)",
        RuntimeWarning, stacklevel=4)


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """Full-precision float32 matmuls for the block (no TF32 on CUDA, no bf16 on oneDNN); the
    user's settings restored after. Also a decorator: ``@exact_matmul()``."""
    token = object()

    def undo() -> None:  # may run twice (finish retries after an interrupt): idempotent
        with _LOCK:
            if token in _HOLDERS:
                _HOLDERS.remove(token)
            if not _HOLDERS and _SAVED:
                _restore(_SAVED[-1])
                _SAVED.clear()

    done = pending(undo)
    try:
        with _LOCK:
            if not _HOLDERS and not _SAVED:
                _SAVED.append(settings())
            _HOLDERS.append(token)
            _set_exact()
        _warn_override()
        yield
    finally:
        finish(done)
