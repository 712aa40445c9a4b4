"""Graph-specific views of the TransformerLens protocol (gated MLPs, parameters' layers);
hooks, biases, dtypes and readable parameter names come from :mod:`lin_lens._tl`."""

from __future__ import annotations

import re
from typing import Any

from lin_lens._tl import hook_dict


def is_gated(model: Any, layer: int) -> bool:
    """Gated MLP: ``mlp.hook_pre`` is the gate pre-activation, ``hook_pre_linear`` the up branch."""
    return f"blocks.{layer}.mlp.hook_pre_linear" in hook_dict(model)


def param_layer(name: str, n_layers: int) -> int:
    """The block a parameter belongs to (its first path index), else ``n_layers`` (final)."""
    m = re.search(r"(?:^|\.)(\d+)\.", name)
    return int(m.group(1)) if m else n_layers
