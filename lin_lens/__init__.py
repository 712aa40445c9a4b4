"""lin_lens: exact linear maps of transformer activations via detached nonlinearities.

The pipeline, one subpackage per step: :mod:`~lin_lens.freeze` (detached mode) →
:mod:`~lin_lens.maps` (exact operators: request, engines, :class:`LinearMap`) →
:mod:`~lin_lens.spectrum` / :mod:`~lin_lens.decoding` (SVD, stable rank, vectors to tokens) →
:mod:`~lin_lens.analyses` (heads, decomposition, layer sweep, steering) and
:mod:`~lin_lens.graph` (attribution graphs) → :mod:`~lin_lens.display` / :mod:`~lin_lens.report`
/ :mod:`~lin_lens.cli`. Models come from :mod:`~lin_lens.models` (any name, offline) and
:mod:`~lin_lens.testing` (tiny, random); populations from :mod:`~lin_lens.corpus`.

Everything a user calls or receives is importable from here: the functions, the result types
and every error lin_lens raises.
"""

from lin_lens.analyses import (
    Decomposition,
    LayerSweep,
    SteeringOperator,
    SteeringResult,
    decompose,
    head_operators,
    layer_sweep,
    steer,
    steering_hooks,
    steering_operator,
)
from lin_lens.decoding import Contributions, Decoding, TokenList, decode, top_singular_tokens
from lin_lens.errors import (
    ArgumentTypeError,
    FileFormatError,
    InvalidArgumentError,
    InvalidPositionError,
    LinLensError,
    MemoryBudgetError,
    MissingFileError,
    ModelNotAvailableError,
    NotExactError,
    NotLinearError,
    OutputExistsError,
    UnknownHookError,
    UnknownNodeError,
    UnsupportedFeatureError,
)
from lin_lens.freeze import detached, is_detached, reset
from lin_lens.graph import Ablation, AttributionGraph, ablate, attribution_graph
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
from lin_lens.models import LoadSpec, load_hf, load_model
from lin_lens.qk import QKAttribution, qk_attribution, qk_attributions
from lin_lens.spectrum import SVD, stable_rank, svd

__all__ = [
    # results
    "SVD",
    "Ablation",
    "AttributionGraph",
    "Contributions",
    "Decoding",
    "Decomposition",
    "LayerSweep",
    "LinearMap",
    "LoadSpec",
    "QKAttribution",
    "SteeringOperator",
    "SteeringResult",
    "TokenList",
    "TopSingular",
    # errors
    "ArgumentTypeError",
    "FileFormatError",
    "InvalidArgumentError",
    "InvalidPositionError",
    "LinLensError",
    "MemoryBudgetError",
    "MissingFileError",
    "ModelNotAvailableError",
    "NotExactError",
    "NotLinearError",
    "OutputExistsError",
    "UnknownHookError",
    "UnknownNodeError",
    "UnsupportedFeatureError",
    # functions
    "ablate",
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
    "qk_attribution",
    "qk_attributions",
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
