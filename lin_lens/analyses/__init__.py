"""Analyses built on linear maps: per-head operators, the exact component decomposition, the
layer sweep and operator steering."""

from lin_lens.analyses.decompose import Decomposition, decompose
from lin_lens.analyses.heads import head_operators
from lin_lens.analyses.steering import (
    SteeringOperator,
    SteeringResult,
    steer,
    steering_hooks,
    steering_operator,
)
from lin_lens.analyses.sweep import LayerSweep, layer_sweep

__all__ = [
    "Decomposition",
    "LayerSweep",
    "SteeringOperator",
    "SteeringResult",
    "decompose",
    "head_operators",
    "layer_sweep",
    "steer",
    "steering_hooks",
    "steering_operator",
]
