"""The readout from the unembedding input to the logits, linear once the final soft cap's gate is
frozen: ``logits = g ⊙ (h W_U + b_U)`` with ``g = tanh(z/c)/(z/c)`` at this input (``g = 1``
without a soft cap). The one place lin_lens composes a map with the unembedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lin_lens._tl import nonzero_bias
from lin_lens.freeze.gates import softcap_gate


@dataclass
class Readout:
    """``W [d_model, V]``, ``b [V]`` or None, ``gate [n_t, V]`` or None (no soft cap), for the
    unembedding inputs ``h [n_t, d_model]`` it was built at."""

    W: Tensor
    b: Tensor | None
    gate: Tensor | None

    @classmethod
    def at(cls, model: Any, h: Tensor) -> Readout:
        """The frozen readout for unembedding inputs ``h`` ``[n_t, d_model]``."""
        W = model.W_U.detach()
        b = nonzero_bias(model, "b_U")
        cap = getattr(model.cfg, "output_logits_soft_cap", None)
        gate = None
        if cap and cap > 0:
            z = h.detach().to(W.dtype) @ W + (b if b is not None else 0)
            gate = softcap_gate(z, cap)
        return cls(W, b, gate)

    def select(self, idx: Tensor | None) -> Readout:
        """Only the vocabulary entries ``idx``."""
        if idx is None:
            return self
        return Readout(self.W[:, idx], None if self.b is None else self.b[idx],
                       None if self.gate is None else self.gate[:, idx])

    def logits(self, h: Tensor) -> Tensor:
        """``g ⊙ (h W)`` for ``h [n_t, d_model]``: the linear part (differentiable in h)."""
        y = h @ self.W
        return y * self.gate if self.gate is not None else y

    def pull_back(self, u: Tensor, repeat: int = 1) -> Tensor:
        """Covectors on the logits ``[n_t·repeat, V]`` → covectors on the unembedding input."""
        if self.gate is not None:
            g = self.gate.repeat_interleave(repeat, dim=0) if repeat > 1 else self.gate
            u = u * g
        return u @ self.W.T

    def bias_offset(self, sel: Tensor) -> Tensor | None:
        """The unembedding bias's exact constant along output covectors ``sel [n_t, R, V]``
        (``[n_t, R]``), or None without a bias."""
        if self.b is None:
            return None
        gb = self.b * self.gate if self.gate is not None else self.b.expand(sel.shape[0], -1)
        return (sel * gb[:, None, :]).sum(-1)

    def apply(self, J: Tensor, consts: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """J on the unembedding input ``[t, s, d_model, d_in]`` → J on the logits
        ``[t, s, V, d_in]``, constants likewise; the bias becomes the origin ``unembed.b_U``."""
        Jo = torch.einsum("tshi,hv->tsvi", J, self.W)
        out = {k: v @ self.W for k, v in consts.items()}
        if self.gate is not None:
            Jo = Jo * self.gate[:, None, :, None]
            out = {k: v * self.gate for k, v in out.items()}
        if self.b is not None:
            out["unembed.b_U"] = (self.b * self.gate if self.gate is not None
                                  else self.b.expand(J.shape[0], -1).clone())
        return Jo, out

    def matrix(self, P: Tensor, t: int = 0) -> Tensor:
        """The readout composed with a linear map ``P [d_model, d]`` at target row ``t``:
        ``[V, d]``."""
        M = self.W.T @ P
        return self.gate[t][:, None] * M if self.gate is not None else M
