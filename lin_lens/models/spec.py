"""A model every worker can load itself: the name (or path), dtype, backend and processing, as
plain data (picklable, JSON-able)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from lin_lens.errors import ArgumentTypeError, InvalidArgumentError
from lin_lens.models.loading import BACKENDS, default_backend, load_model

DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass(frozen=True)
class LoadSpec:
    """What :func:`lin_lens.load_model` needs, as plain data.

    ``name``: anything :func:`lin_lens.load_model` takes: an embedded model
    (``"smollm2-135m"``), a local Hugging Face folder, a TransformerLens name or Hugging Face id,
    or ``"tiny-<family>"`` (a tiny random model with a word-level tokenizer, for tests and quick
    checks). ``backend``: ``"hooked"`` / ``"bridge"``; None picks hooked where TransformerLens has
    it.
    """

    name: str = "smollm2-135m"
    dtype: str = "float32"
    backend: str | None = None
    fold_ln: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):
            object.__setattr__(self, "dtype", str(self.dtype).replace("torch.", ""))
        if not isinstance(self.name, str):
            object.__setattr__(self, "name", str(self.name))  # a pathlib.Path
        if self.dtype not in DTYPES:
            raise InvalidArgumentError(f"dtype {self.dtype!r}: choose from {', '.join(DTYPES)}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise InvalidArgumentError(
                f"backend {self.backend!r}: choose from {', '.join(BACKENDS)}")

    @property
    def resolved_backend(self) -> str:
        return self.backend or default_backend()

    def info(self) -> dict[str, str]:
        """What the rows record (the same as ``model_info`` of the loaded model)."""
        return {"model": self.name, "dtype": self.dtype, "backend": self.resolved_backend}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load(self) -> Any:
        return load_model(self.name, dtype=getattr(torch, self.dtype),
                          backend=self.resolved_backend, fold_ln=self.fold_ln)


def as_spec(model: Any) -> LoadSpec | None:
    """A :class:`LoadSpec` from a spec-like value (a LoadSpec, a name or path, a dict, a
    ``(name, dtype, backend)`` tuple); None for an already loaded model."""
    import os

    if isinstance(model, LoadSpec):
        return model
    if isinstance(model, (str, os.PathLike)):
        return LoadSpec(str(model))
    if isinstance(model, dict):
        try:
            return LoadSpec(**model)
        except TypeError as e:
            raise ArgumentTypeError(f"model={model!r}: not a LoadSpec's fields ({e})") from None
    if isinstance(model, tuple) and model and isinstance(model[0], str):
        return LoadSpec(*model)
    return None
