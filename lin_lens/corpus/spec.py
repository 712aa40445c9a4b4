"""A model that every worker can load itself: name, dtype, backend (plus tiny test models)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DTYPES = ("float32", "float64", "bfloat16", "float16")
BACKENDS = ("hooked", "bridge")


def has_hooked() -> bool:
    """Whether this TransformerLens ships ``HookedTransformer`` (≤ 3.x)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from transformer_lens import HookedTransformer  # noqa: F401
        except ImportError:
            return False
    return True


@dataclass(frozen=True)
class LoadSpec:
    """What :func:`lin_lens.load_model` needs, as plain data (picklable, JSON-able).

    ``name``: a :func:`lin_lens.load_model` name (``"smollm2-135m"``, ``"gemma3-270m"``) or
    ``"tiny-<arch>"``: a tiny random model of :mod:`lin_lens.testing` with its word-level
    tokenizer (``tiny-gpt2``, ``tiny-llama``, … ; for tests and quick checks).
    ``backend``: ``"hooked"`` / ``"bridge"``; None picks hooked where TransformerLens has it.
    """

    name: str = "smollm2-135m"
    dtype: str = "float32"
    backend: str | None = None
    fold_ln: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str):  # a torch.dtype
            object.__setattr__(self, "dtype", str(self.dtype).replace("torch.", ""))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose from {', '.join(DTYPES)}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r}: choose from {', '.join(BACKENDS)}")

    @property
    def resolved_backend(self) -> str:
        return self.backend or ("hooked" if has_hooked() else "bridge")

    def info(self) -> dict[str, str]:
        """What the rows record (the same as :func:`model_info` of the loaded model)."""
        return {"model": self.name, "dtype": self.dtype, "backend": self.resolved_backend}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load(self) -> Any:
        import torch

        dtype = getattr(torch, self.dtype)
        backend = self.resolved_backend
        if self.name.startswith("tiny-"):
            model = _tiny(self.name[len("tiny-"):], dtype, backend)
        else:
            import lin_lens

            model = lin_lens.load_model(self.name, dtype=dtype, backend=backend,
                                        fold_ln=self.fold_ln)
        model.lin_lens_info = {"name": self.name, "backend": backend, "dtype": dtype,
                               "fold_ln": self.fold_ln}
        return model


def _tiny(arch: str, dtype: Any, backend: str) -> Any:
    from lin_lens import testing

    if backend == "bridge":
        if arch not in testing.BRIDGE_ARCHS:
            raise ValueError(f"tiny bridge arch {arch!r}: choose from {testing.BRIDGE_ARCHS}")
        return testing.tiny_bridge(arch, dtype=dtype)
    if arch not in testing.HOOKED_ARCHS:
        raise ValueError(f"tiny arch {arch!r}: choose from {sorted(testing.HOOKED_ARCHS)}")
    model = testing.tiny_model(arch, dtype=dtype, d_vocab=50)
    model.set_tokenizer(testing.tiny_tokenizer(50), default_padding_side="right")
    return model


def as_spec(model: Any) -> LoadSpec | None:
    """A :class:`LoadSpec` from a spec-like value (a LoadSpec, a name, a dict, a
    ``(name, dtype, backend)`` tuple); None for an already loaded model."""
    if isinstance(model, LoadSpec):
        return model
    if isinstance(model, str):
        return LoadSpec(model)
    if isinstance(model, dict):
        return LoadSpec(**model)
    if isinstance(model, tuple) and model and isinstance(model[0], str):
        return LoadSpec(*model)
    return None
