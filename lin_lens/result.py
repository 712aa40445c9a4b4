"""The result of :func:`lin_lens.linear_map`: an exact per-token linear operator."""

from __future__ import annotations

import html
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative reconstruction error above which a detached map is refused as not exact.

    Far above rounding (float64 maps come out near 1e-15) and far below what an unfrozen
    nonlinearity leaves (typically 1e-3 and more).
    """
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-4
    return 2e-2


class NotExactError(ArithmeticError):
    """The detached map does not reconstruct its activation: some nonlinearity was not frozen.

    The map is kept in ``.linear_map`` for inspection.
    """

    def __init__(self, lm: "LinearMap", bound: float):
        self.linear_map = lm
        super().__init__(
            f"linear map at {lm.hook!r} is not exact: relative reconstruction error "
            f"{lm.relative_error:.3g} > {bound:.3g}. Some nonlinearity of this model was not "
            "frozen by detached mode; please report the architecture."
        )


class LinearMap:
    """``act[t] = Σ_i J[t, i] · x[i] + constant[t]``, exact for one input.

    Layout: ``J`` is ``[n_tgt, n_src, d_out, d_in]`` (``[n_src, d_out, d_in]`` when the map was
    asked for one int position), so ``J[..., i, :, :]`` is the operator applied to source token
    ``i``. ``x`` is the source activation ``[n_src, d_in]`` (the token embeddings by default);
    ``act`` is the true target activation ``[n_tgt, d_out]``; ``constants`` holds the exact
    contribution of each bias / positional embedding (origin name → ``[n_tgt, d_out]``).
    """

    def __init__(self, J, x, act, constants, hook, source, positions, out_shape,
                 out_index=None, direction=None, tokens=None, detached=True, int_pos=False):
        self.J4, self.x, self.act4, self.constants = J, x, act, constants
        self.hook, self.source, self.positions = hook, source, list(positions)
        self.out_shape, self.out_index, self.direction = tuple(out_shape), out_index, direction
        self.tokens, self.detached, self.int_pos = tokens, detached, int_pos
        self.meta = {}

    # -- the contract ------------------------------------------------------------------------
    def _sq(self, t: Tensor) -> Tensor:
        return t[0] if self.int_pos else t

    @property
    def J(self) -> Tensor:
        """``[n_src, d_out, d_in]`` for an int position, else ``[n_tgt, n_src, d_out, d_in]``."""
        return self._sq(self.J4)

    @property
    def act(self) -> Tensor:
        """The model's own activation at the target: ``[d_out]`` or ``[n_tgt, d_out]``."""
        return self._sq(self.act4)

    @property
    def constant(self) -> Tensor:
        """Sum of :attr:`constant_by_origin` (exactly zero for bias-free models)."""
        total = torch.zeros_like(self.act4)
        for v in self.constants.values():
            total = total + v
        return self._sq(total)

    @property
    def constant_by_origin(self) -> dict[str, Tensor]:
        return {k: self._sq(v) for k, v in self.constants.items()}

    def contributions(self) -> Float[Tensor, "... src d_out"]:
        """``J_i x_i`` per source token: ``[n_src, d_out]`` or ``[n_tgt, n_src, d_out]``."""
        return self._sq(torch.einsum("tsoi,si->tso", self.J4, self.x))

    def reconstruct(self) -> Tensor:
        """``Σ_i J_i x_i + constant``, same shape as :attr:`act`."""
        linear = torch.einsum("tsoi,si->to", self.J4, self.x)
        return self._sq(linear) + self.constant

    @property
    def relative_error(self) -> float:
        """‖act − reconstruct()‖ / ‖act‖, measured afresh on every access."""
        num = torch.linalg.vector_norm(self.act - self.reconstruct())
        den = torch.linalg.vector_norm(self.act)
        return float(num / den) if float(den) > 0 else float(num)

    # -- conveniences ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.J.shape)

    @property
    def n_src(self) -> int:
        return self.J4.shape[1]

    def at(self, t: int) -> "LinearMap":
        """The map for one target position (index into :attr:`positions`, negatives allowed)."""
        k = t % len(self.positions)
        sub = LinearMap(self.J4[k:k + 1], self.x, self.act4[k:k + 1],
                        {o: v[k:k + 1] for o, v in self.constants.items()}, self.hook, self.source,
                        [self.positions[k]], self.out_shape, self.out_index,
                        None if self.direction is None else self.direction[k:k + 1],
                        self.tokens, self.detached, True)
        sub.meta = dict(self.meta)
        return sub

    def summary(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "source": self.source,
            "mode": "detached" if self.detached else "ordinary",
            "positions": self.positions,
            "J shape": list(self.J.shape),
            "dtype": str(self.J4.dtype).replace("torch.", ""),
            "relative error": self.relative_error,
            "constant origins": len(self.constants),
        }

    def __repr__(self) -> str:
        s = self.summary()
        return (f"LinearMap({s['hook']!r} ← {s['source']!r}, {s['mode']}, J {s['J shape']}, "
                f"{s['dtype']}, relative error {s['relative error']:.2e})")

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
            f"<td style='text-align:left'>{html.escape(_fmt(v))}</td></tr>"
            for k, v in self.summary().items()
        )
        return f"<table><caption>LinearMap</caption>{rows}</table>"


def _fmt(v: Any) -> str:
    return f"{v:.3e}" if isinstance(v, float) else str(v)
