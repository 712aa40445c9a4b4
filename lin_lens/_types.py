"""Type aliases of the public signatures, with shapes in jaxtyping's notation (one place)."""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Int
from torch import Tensor

# What a map is of: text, or token ids ``[pos]`` / ``[1, pos]``.
Inputs = str | Sequence[int] | Int[Tensor, "pos"] | Int[Tensor, "1 pos"]
# Target positions: one (negatives count from the end), several, a slice, or None for all.
Positions = int | Sequence[int] | slice | None
# Output rows to keep: indices, e.g. token ids of the logits.
OutIndex = Sequence[int] | Int[Tensor, "k"] | None
# A byte budget: bytes, or a string such as "4GB"; None for the default.
MemoryBudget = int | float | str | None
