"""lin_lens: exact linear maps of transformer activations via detached nonlinearities."""

from lin_lens.analysis import decode, stable_rank, svd, top_singular_tokens
from lin_lens.components import decompose, head_operators
from lin_lens.freeze import detached, is_detached
from lin_lens.gates import UnsupportedFeatureError
from lin_lens.linear_map import linear_map, to_tokens
from lin_lens.models import load_hf, load_model
from lin_lens.result import LinearMap, NotExactError, default_tolerance
from lin_lens.steering import steer, steering_hooks, steering_operator
from lin_lens.sweep import layer_sweep

__all__ = [
    "decode",
    "decompose",
    "head_operators",
    "layer_sweep",
    "stable_rank",
    "steer",
    "steering_hooks",
    "steering_operator",
    "svd",
    "top_singular_tokens",
    "LinearMap",
    "NotExactError",
    "UnsupportedFeatureError",
    "default_tolerance",
    "detached",
    "is_detached",
    "linear_map",
    "load_hf",
    "load_model",
    "to_tokens",
]
__version__ = "0.1.0"
