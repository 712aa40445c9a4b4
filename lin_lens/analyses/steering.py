"""Steering with a concept's linear operator (paper eq. 16).

For a concept prompt ("The Golden Gate") we take the exact operator ``J_c`` of layer L's residual
stream (``blocks.L.hook_resid_post``) at the concept's last position, from the token embeddings:
``h_c = Σ_i J_c[i] x_c[i] + b_c`` (``b_c`` = biases/positions, zero for Llama-style models).
For a new prompt, during the forward pass (and every step of generation), the activation at each
steered position k is replaced by

    h'_k = λ · h_k + (1 − λ) · s_k,       s_k = "J_c applied to the new prompt's inputs at k".

Eq. 16 writes ``s = J_c(x_steer) · x_new``, which only type-checks when both prompts have the same
length. How ``s_k`` is formed for other lengths (``align``):

* ``"end"`` (default, ours): a causal sliding window. The concept operator's last source token is
  applied to the current token, the one before to the previous token, and so on::

      s_k = b_c + J_c[0]·x[0] + Σ_{j=0}^{min(k, n_c−1)−1} J_c[n_c−1−j] · x[k−j]    (k−j ≥ 1)

  With ``pin_first`` (default when both prompts start with the same token, i.e. BOS) the first
  operator ``J_c[0]`` always reads the new prompt's first token: the BOS operator is the attention
  sink's and stays on the BOS. Properties: it uses relative positions the way attention does, and
  when the new prompt *is* the concept prompt, ``s`` at the last position is exactly ``h_c``.
* ``"cyclic"``: the reference code's indexing ``J_c[k mod n_c] · x[k]`` summed cumulatively over
  positions ≤ k (without its rescaling to λ‖h‖/2 and without moving to layer L−1, so that the
  two alignments are compared under the same eq. 16 mixing).

By default every position after the first token is steered (``positions="all"``; ``"last"``
steers only the final position). Generation is greedy and recomputes the whole sequence at each
step (no KV cache) so that every position is steered consistently. ``rescale=True`` (not in eq. 16)
gives each ``s_k`` the norm of ``h_k`` before mixing.

Measured effects on SmolLM2 are in the README ("Steering"), with the command that prints them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lin_lens._hooks import HookSet
from lin_lens._html import table
from lin_lens._precision import exact_matmul
from lin_lens._types import Inputs
from lin_lens.decoding import token_strings
from lin_lens.errors import InvalidArgumentError
from lin_lens.maps import linear_map, to_tokens


@dataclass
class SteeringOperator:
    """A concept's operator at one hook: ``J [n_c, d, d_in]``, ``constant [d]``, ``act [d]``."""

    J: Float[Tensor, "n_c d d_in"]
    constant: Float[Tensor, " d"]
    act: Float[Tensor, " d"]
    hook: str
    concept_tokens: Int[Tensor, " n_c"]
    align: Literal["end", "cyclic"] = "end"
    pin_first: bool | None = None  # None: pin when both prompts start with the same token

    def apply(self, x: Float[Tensor, "n d_in"], tokens: Int[Tensor, " n"] | None = None
              ) -> Float[Tensor, "n d"]:
        """``s_k`` for every position of a new prompt with inputs ``x``."""
        J = self.J.to(x)  # x's dtype and device
        n, n_c = x.shape[0], J.shape[0]
        per = torch.einsum("cdi,ni->ncd", J, x)  # per[k, c] = J[c] x[k]
        s = torch.zeros(n, J.shape[1], dtype=x.dtype, device=x.device)
        if self.align == "cyclic":
            idx = torch.arange(n, device=x.device) % n_c
            s = per[torch.arange(n, device=x.device), idx].cumsum(0)
        elif self.align == "end":
            pin = self._pin(tokens)
            first = 1 if pin else 0
            ops = range(first, n_c)  # operators in the window, J[n_c-1] on the current token
            for k in range(n):
                for c in ops:
                    src = k - (n_c - 1 - c)
                    if src >= first:
                        s[k] += per[src, c]
                if pin:
                    s[k] += per[0, 0]
        else:
            raise InvalidArgumentError(f"align must be 'end' or 'cyclic', got {self.align!r}")
        return s + self.constant.to(x)

    def _pin(self, tokens: Tensor | None) -> bool:
        if self.pin_first is not None:
            return self.pin_first
        return tokens is not None and int(tokens.reshape(-1)[0]) == int(self.concept_tokens[0])


@exact_matmul()
def steering_operator(model: Any, concept: Inputs, layer: int, *, hook: str | None = None,
                      align: Literal["end", "cyclic"] = "end", pin_first: bool | None = None,
                      **kw: Any) -> SteeringOperator:
    """The exact operator of ``blocks.{layer}.hook_resid_post`` (or ``hook``) at the concept's last
    position, from the token embeddings. ``kw`` goes to :func:`lin_lens.linear_map`."""
    hook = hook or f"blocks.{layer}.hook_resid_post"
    lm = linear_map(model, concept, hook, -1, **kw)
    assert lm.tokens is not None  # text or token ids in: the map keeps them
    return SteeringOperator(lm.J.detach(), lm.constant.detach(), lm.act.detach(), hook,
                            lm.tokens, align, pin_first)


def steering_hooks(op: SteeringOperator, lam: float, positions: Literal["all", "last"] = "all",
                   tokens: Int[Tensor, "1 pos"] | None = None, rescale: bool = False
                   ) -> list[tuple[str, Any]]:
    """``(hook name, fn)`` pairs for ``model.hooks(fwd_hooks=...)`` / ``run_with_hooks``: capture
    the token embeddings, then replace the activation at ``op.hook`` by eq. 16. ``tokens`` (the
    input ids) decide BOS pinning; the first token is never steered when pinned. ``rescale``:
    give each ``s_k`` the norm of ``h_k`` first (keeps the residual norm downstream layers
    expect; not in eq. 16)."""
    seen: dict[str, Tensor] = {}

    def grab(x: Tensor, hook: Any) -> None:
        seen["x"] = x

    def replace(h: Tensor, hook: Any) -> Tensor:
        x = seen.pop("x")
        out = h.clone()
        for b in range(h.shape[0]):
            tb = None if tokens is None else tokens[b]
            s = op.apply(x[b].reshape(x.shape[1], -1), tb).to(h.dtype)
            if rescale:
                s = s * (h[b].norm(dim=-1, keepdim=True) / s.norm(dim=-1, keepdim=True)
                         .clamp_min(torch.finfo(s.dtype).tiny))
            mix = lam * h[b] + (1 - lam) * s
            start = h.shape[1] - 1 if positions == "last" else (1 if op._pin(tb) else 0)
            out[b, start:] = mix[start:]
        return out

    return [("hook_embed", grab), (op.hook, replace)]


def _run(model: Any, tokens: Tensor, op: SteeringOperator | None, lam: float,
         positions: Literal["all", "last"], rescale: bool = False) -> Tensor:
    with torch.no_grad():
        if op is None:
            return model(tokens, return_type="logits")
        with HookSet(model) as hs:
            for name, fn in steering_hooks(op, lam, positions, tokens, rescale):
                hs.add(name, fn)
            return model(tokens, return_type="logits")


@dataclass
class SteeringResult:
    """Measured effect of steering; plain data (see :func:`lin_lens.steer`)."""

    prompt: str
    concept: str
    layer: int
    lam: float
    align: str
    concept_ids: list[int]
    concept_strs: list[str]
    p_concept_base: float  # Σ p(concept tokens) for the next token after the prompt
    p_concept_steered: float
    mean_p_concept_base: float  # the same, averaged over the generated steps
    mean_p_concept_steered: float
    text_base: str
    text_steered: str
    meta: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.p_concept_steered / max(self.p_concept_base, 1e-30)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    def __str__(self) -> str:
        return (f"steer {self.concept!r} → {self.prompt!r} at layer {self.layer}, λ={self.lam}, "
                f"align={self.align}: p(concept) next token {self.p_concept_base:.3g} → "
                f"{self.p_concept_steered:.3g} (×{self.ratio:.3g}); over generation "
                f"{self.mean_p_concept_base:.3g} → {self.mean_p_concept_steered:.3g}\n"
                f"  base:    {self.text_base!r}\n  steered: {self.text_steered!r}")

    def _repr_html_(self) -> str:
        rows = [("concept tokens", " ".join(self.concept_strs)),
                ("p(concept) next token", f"{self.p_concept_base:.3g} → "
                 f"{self.p_concept_steered:.3g} (×{self.ratio:.3g})"),
                ("mean p(concept) over generation", f"{self.mean_p_concept_base:.3g} → "
                 f"{self.mean_p_concept_steered:.3g}"),
                ("base", self.text_base), ("steered", self.text_steered)]
        return table(rows, caption=f"steering {self.concept!r} at layer {self.layer}, "
                                   f"λ={self.lam}")


def _generate(model: Any, tokens: Tensor, op: SteeringOperator | None, lam: float,
              positions: Literal["all", "last"], n_new: int, ids: Tensor, rescale: bool = False
              ) -> tuple[Tensor, list[float]]:
    p_seq = []
    for _ in range(n_new):
        probs = _run(model, tokens, op, lam, positions, rescale)[0, -1].float().softmax(-1)
        p_seq.append(float(probs[ids].sum()))
        tokens = torch.cat([tokens, probs.argmax()[None, None]], dim=1)
    return tokens, p_seq


@exact_matmul()
def steer(model: Any, concept: str, prompt: str, layer: int, lam: float = 0.5, *,
          max_new_tokens: int = 20, align: Literal["end", "cyclic"] | None = None,
          positions: Literal["all", "last"] = "all", rescale: bool = False,
          op: SteeringOperator | None = None,
          concept_ids: list[int] | None = None, **kw: Any) -> SteeringResult:
    """Steer ``prompt`` towards ``concept`` with the concept's operator at ``layer`` (eq. 16) and
    measure the effect: the probability of the concept's tokens (default: its tokens after the
    first, i.e. without BOS) for the next token, and averaged over greedy generation, with and
    without steering. ``op`` reuses a precomputed :func:`steering_operator`."""
    if max_new_tokens < 1:
        raise InvalidArgumentError(
            f"max_new_tokens={max_new_tokens}: must be at least 1 (the first step is the "
            "measurement)")
    if op is None:
        op = steering_operator(model, concept, layer, align=align or "end", **kw)
    elif align is not None and align != op.align:  # same operator, other alignment
        op = dataclasses.replace(op, align=align)
    tokens = to_tokens(model, prompt)
    if concept_ids is None:
        ct = op.concept_tokens.tolist()
        skip = 1 if ct and ct[0] == int(tokens[0, 0]) else 0
        concept_ids = list(dict.fromkeys(ct[skip:]))
    ids = torch.tensor(concept_ids, device=tokens.device)
    n = tokens.shape[1]
    base, p_base = _generate(model, tokens, None, lam, positions, max_new_tokens, ids)
    steered, p_st = _generate(model, tokens, op, lam, positions, max_new_tokens, ids, rescale)

    def text(t: Tensor) -> str:
        tok = getattr(model, "tokenizer", None)
        ids_ = t[0, n:].tolist()
        return tok.decode(ids_) if tok is not None else " ".join(f"#{i}" for i in ids_)

    def label(v: Any) -> str:
        return v if isinstance(v, str) else str(torch.as_tensor(v).reshape(-1).tolist())

    return SteeringResult(
        prompt=label(prompt), concept=label(concept), layer=layer, lam=lam, align=op.align,
        concept_ids=concept_ids, concept_strs=token_strings(model, concept_ids),
        p_concept_base=p_base[0], p_concept_steered=p_st[0],
        mean_p_concept_base=sum(p_base) / len(p_base),
        mean_p_concept_steered=sum(p_st) / len(p_st),
        text_base=text(base), text_steered=text(steered),
        meta={"positions": positions, "rescale": rescale, "hook": op.hook,
              "max_new_tokens": max_new_tokens})
