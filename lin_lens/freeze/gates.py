"""Gates g(x) with act(x) = g(x)·x, computed analytically.

Computing the gate as act(x)/x would divide by zero wherever an input is exactly 0 (dequantised
real weights produce exact zeros), so every supported activation has its closed form here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lin_lens.errors import UnsupportedFeatureError

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _tanh_gelu(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


GATES: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": lambda x: (x > 0).to(x.dtype),
    "relu2": torch.relu,  # relu(x)² = x · relu(x)
    "gelu": _gelu,  # x · Φ(x)
    "gelu_new": _tanh_gelu,
    "gelu_pytorch_tanh": _tanh_gelu,
    "gelu_fast": _gelu_fast,
    "silu": torch.sigmoid,  # x · σ(x)
    "swish": torch.sigmoid,
    "solu": lambda x: torch.softmax(x, dim=-1),  # x · softmax(x)
    "solu_ln": lambda x: torch.softmax(x, dim=-1),
}

NOT_HOMOGENEOUS = {
    "xielu": "xIELU(0) ≠ 0, so it is not act(x) = g(x)·x and has no exact frozen-gate form",
}


def gate_fn(act_fn: str | None) -> Callable[[Tensor], Tensor]:
    """The gate of a TransformerLens ``cfg.act_fn``; an error naming the activation otherwise."""
    if act_fn in GATES:
        return GATES[act_fn]
    if act_fn in NOT_HOMOGENEOUS:
        raise UnsupportedFeatureError(f"activation {act_fn!r}: {NOT_HOMOGENEOUS[act_fn]}")
    raise UnsupportedFeatureError(
        f"activation {act_fn!r} has no known gate; supported: {', '.join(sorted(GATES))}"
    )


def softcap_gate(z: Tensor, cap: float) -> Tensor:
    """g with cap·tanh(z/cap) = g·z; g → 1 as z → 0."""
    u = z / cap
    safe = torch.where(u == 0, torch.ones_like(u), u)
    return torch.where(u == 0, torch.ones_like(u), torch.tanh(safe) / safe)


def relinearize(value: Tensor, pre: Tensor, gate: Tensor) -> Tensor:
    """``value`` in the forward pass, ``gate·pre`` (gate frozen) on the gradient path.

    ``pre - pre.detach()`` is exactly zero, so the forward value is bit-identical — except where
    ``pre`` overflowed to ±inf, where it would be ``inf − inf = nan``: there the linear path is
    cut (its gradient is zero anyway once the value saturates), so the forward stays the model's.
    """
    live = pre - pre.detach()
    live = torch.where(torch.isfinite(pre.detach()), live, torch.zeros_like(live))
    return value.detach() + live * gate.detach()


def check_gate(name: str, act: str | None, value: Tensor, pre: Tensor, gate: Tensor) -> None:
    """Refuse a gate that does not reproduce the model's own activation (wrong act_fn)."""
    with torch.no_grad():
        err = (gate * pre - value).abs().max()
        scale = value.abs().max() + pre.abs().max()
        tol = 1e3 * torch.finfo(value.dtype).eps * float(scale) + torch.finfo(value.dtype).tiny
        if float(err) > tol:
            raise UnsupportedFeatureError(
                f"{name}: the MLP activation is not {act!r}·x as cfg.act_fn says "
                f"(max deviation {float(err):.3g}); cannot freeze its gate exactly"
            )
