"""lin_lens: exact linear maps of transformer activations via detached nonlinearities.

The pipeline, one subpackage per step: :mod:`~lin_lens.freeze` (detached mode) →
:mod:`~lin_lens.maps` (exact operators: request, engines, :class:`LinearMap`) →
:mod:`~lin_lens.spectrum` / :mod:`~lin_lens.decoding` (SVD, stable rank, vectors to tokens) →
:mod:`~lin_lens.analyses` (heads, decomposition, layer sweep, steering) →
:mod:`~lin_lens.display` / :mod:`~lin_lens.report` / :mod:`~lin_lens.cli`. Models come from
:mod:`~lin_lens.models` (real, offline) and :mod:`~lin_lens.testing` (tiny, random).
"""

from lin_lens.analyses import (
    decompose,
    head_operators,
    layer_sweep,
    steer,
    steering_hooks,
    steering_operator,
)
from lin_lens.decoding import decode, top_singular_tokens
from lin_lens.errors import (
    InvalidArgumentError,
    LinLensError,
    MemoryBudgetError,
    NotExactError,
    NotLinearError,
    UnknownHookError,
    UnsupportedFeatureError,
)
from lin_lens.freeze import detached, is_detached, reset
from lin_lens.graph import AttributionGraph, attribution_graph
from lin_lens.maps import (
    LinearMap,
    TopSingular,
    default_tolerance,
    layer_transforms,
    linear_map,
    operators_at_hooks,
    to_tokens,
    top_singular,
)
from lin_lens.models import load_hf, load_model
from lin_lens.spectrum import stable_rank, svd

__all__ = [
    "AttributionGraph",
    "InvalidArgumentError",
    "LinLensError",
    "LinearMap",
    "MemoryBudgetError",
    "NotExactError",
    "NotLinearError",
    "TopSingular",
    "UnknownHookError",
    "UnsupportedFeatureError",
    "attribution_graph",
    "decode",
    "decompose",
    "default_tolerance",
    "detached",
    "head_operators",
    "is_detached",
    "layer_sweep",
    "layer_transforms",
    "linear_map",
    "load_hf",
    "load_model",
    "operators_at_hooks",
    "reset",
    "stable_rank",
    "steer",
    "steering_hooks",
    "steering_operator",
    "svd",
    "to_tokens",
    "top_singular",
    "top_singular_tokens",
]
__version__ = "0.2.0"


def __getattr__(name: str):
    # lin_lens.corpus (pyarrow, optionally Ray) loads on first use, not with every import
    if name == "corpus":
        import importlib

        return importlib.import_module("lin_lens.corpus")
    raise AttributeError(f"module 'lin_lens' has no attribute {name!r}")
