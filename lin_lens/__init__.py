"""lin_lens: exact linear maps of transformer activations via detached nonlinearities."""

from lin_lens.freeze import detached, is_detached
from lin_lens.gates import UnsupportedFeatureError
from lin_lens.linear_map import linear_map, to_tokens
from lin_lens.result import LinearMap, NotExactError, default_tolerance

__all__ = [
    "LinearMap",
    "NotExactError",
    "UnsupportedFeatureError",
    "default_tolerance",
    "detached",
    "is_detached",
    "linear_map",
    "to_tokens",
]
__version__ = "0.1.0"
