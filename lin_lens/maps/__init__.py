"""Maps: differentiate the detached network into exact linear operators.

``request`` (checked inputs) → ``graph`` (one detached forward with leaves) → an engine
(``reverse`` rows, ``forward`` columns via ``replay`` or graph columns, ``matrix_free`` top-k)
→ ``result`` (:class:`LinearMap`); ``budget`` is the memory preflight and ``api`` the only
dispatcher."""

from lin_lens.maps.api import (
    layer_transforms,
    linear_map,
    operators_at_hooks,
    top_singular,
    top_singular_per_token,
)
from lin_lens.maps.forward import layer_sweep_hooks
from lin_lens.maps.matrix_free import TopSingular
from lin_lens.maps.ordinary import ordinary_reconstruction
from lin_lens.maps.per_token import PerTokenTop
from lin_lens.maps.request import to_tokens
from lin_lens.maps.result import LinearMap, default_tolerance

__all__ = [
    "LinearMap",
    "PerTokenTop",
    "TopSingular",
    "default_tolerance",
    "layer_sweep_hooks",
    "layer_transforms",
    "linear_map",
    "operators_at_hooks",
    "ordinary_reconstruction",
    "to_tokens",
    "top_singular",
    "top_singular_per_token",
]
