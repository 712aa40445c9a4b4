"""The public API is a reviewed list: what ``lin_lens`` exports, and that it is what it says."""

from __future__ import annotations

import inspect
import types

import lin_lens
from lin_lens.errors import LinLensError

# Reviewed: adding or removing a public name is an API change; update this list with it.
REVIEWED = {
    # results
    "SVD", "Ablation", "AttributionGraph", "Contributions", "Decoding", "Decomposition",
    "LayerSweep", "LinearMap", "LoadSpec", "QKAttribution", "SteeringOperator",
    "SteeringResult", "TokenList", "TopSingular",
    # errors
    "ArgumentTypeError", "FileFormatError", "InvalidArgumentError", "InvalidPositionError",
    "LinLensError", "MemoryBudgetError", "MissingFileError", "ModelNotAvailableError",
    "NotExactError", "NotLinearError", "OutputExistsError", "UnknownHookError",
    "UnknownNodeError", "UnsupportedFeatureError",
    # functions
    "ablate", "attribution_graph", "decode", "decompose", "default_tolerance", "detached",
    "head_operators", "is_detached", "layer_sweep", "layer_transforms", "linear_map", "load_hf",
    "load_model", "operators_at_hooks", "qk_attribution", "qk_attributions", "reset",
    "stable_rank", "steer", "steering_hooks", "steering_operator", "svd", "to_tokens",
    "top_singular", "top_singular_tokens",
}


def test_all_is_the_reviewed_list():
    assert set(lin_lens.__all__) == REVIEWED
    assert len(lin_lens.__all__) == len(REVIEWED)  # no duplicates
    for name in lin_lens.__all__:
        assert hasattr(lin_lens, name), name


def test_exported_errors_are_lin_lens_errors_and_everything_else_is_not_private():
    for name in lin_lens.__all__:
        obj = getattr(lin_lens, name)
        assert not getattr(obj, "__module__", "lin_lens").split(".")[-1].startswith("_"), name
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert issubclass(obj, LinLensError), name


def test_decode_is_a_function_and_decoding_its_module():
    import importlib

    module = importlib.import_module("lin_lens.decoding")
    assert callable(lin_lens.decode) and not isinstance(lin_lens.decode, types.ModuleType)
    assert lin_lens.decode is module.decode


def test_corpus_loads_on_first_use():
    assert isinstance(lin_lens.corpus, types.ModuleType)
    assert lin_lens.corpus.run.__module__ == "lin_lens.corpus.run"
