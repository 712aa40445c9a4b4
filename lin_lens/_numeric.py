"""Small numeric helpers shared by every layer (one copy each)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def relative_error(reference: Tensor | np.ndarray, approx: Tensor | np.ndarray) -> float:
    """``‖reference − approx‖ / ‖reference‖`` in float64 (the absolute error when the reference
    is zero)."""
    ref = torch.as_tensor(reference).reshape(-1).to(torch.float64)
    app = torch.as_tensor(approx).reshape(-1).to(device=ref.device, dtype=torch.float64)
    num = torch.linalg.vector_norm(ref - app)
    den = torch.linalg.vector_norm(ref)
    return float(num / den) if float(den) > 0 else float(num)


def to_numpy(t: Any) -> np.ndarray:
    """A tensor, array or list as a float64 numpy array (on the CPU)."""
    if isinstance(t, torch.Tensor):
        t = t.detach().to("cpu", torch.float64)
    return np.asarray(t, dtype=np.float64)
