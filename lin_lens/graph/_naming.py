"""Graph-specific views of the TransformerLens protocol (gated MLPs, readable parameter names);
hooks, biases and dtypes come from :mod:`lin_lens._tl`."""

from __future__ import annotations

import re
from typing import Any

from lin_lens._tl import hook_dict


def is_gated(model: Any, layer: int) -> bool:
    """Gated MLP: ``mlp.hook_pre`` is the gate pre-activation, ``hook_pre_linear`` the up branch."""
    return f"blocks.{layer}.mlp.hook_pre_linear" in hook_dict(model)


def clean_name(name: str) -> str:
    """``transformer.h.0._original_component.ln_1._original_component.bias`` → ``transformer.h.0
    .ln_1.bias`` (the Bridge's wrapper segments carry no meaning for a reader)."""
    return name.replace("._original_component", "").replace("_original_component.", "")


def param_layer(name: str, n_layers: int) -> int:
    """The block a parameter belongs to (its first path index), else ``n_layers`` (final)."""
    m = re.search(r"(?:^|\.)(\d+)\.", name)
    return int(m.group(1)) if m else n_layers
