"""Freeze: detached mode. Forward values unchanged, every nonlinearity's ``A(x)`` factor cut from
the gradient path, through TransformerLens hook names (see :mod:`.rules` for the table)."""

from lin_lens.freeze.mode import detached, in_functorch_transform, is_detached, reset
from lin_lens.freeze.rules import Rule, cut_hooks, freezing_rules, read_before_cut

__all__ = [
    "Rule",
    "cut_hooks",
    "detached",
    "freezing_rules",
    "in_functorch_transform",
    "is_detached",
    "read_before_cut",
    "reset",
]
