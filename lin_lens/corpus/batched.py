"""Exact per-token contributions of one output direction, for a padded batch of prompts at once.

For circuit datasets (IOI-style templates, a logit difference per prompt) the map needed is the
one of a scalar ``u_b · act_b[t_b]`` per prompt b. In detached mode it is exactly linear in the
token embeddings, the positional embeddings and the biases, so

    u_b · act_b[t_b] = Σ_i g_b,i · x_b,i + c_b,      g_b,i = ∂(u_b · act_b[t_b]) / ∂x_b,i

and every g_b comes from ONE backward pass of Σ_b u_b · act_b[t_b] over the padded batch: prompt
b's scalar does not depend on prompt b′'s embeddings. The constant c_b cannot come from the
same pass (a bias is shared by the batch, its gradient sums over prompts), so it is computed
independently of ``value − Σ contributions``, by one forward-mode pass of the detached network
whose tangents are the biases' and positional embeddings' own values (zero on the token
embeddings): by linearity that tangent is exactly Σ_origins ∂value_b/∂origin · origin, per
prompt. The per-prompt relative error ``|value − Σ g·x − c| / |value|`` is therefore a real
check, as for :func:`lin_lens.linear_map`. Models without non-zero biases or positional
embeddings (Llama, SmolLM2) skip that pass: their constant is exactly 0.

Padding is TransformerLens's: each prompt is tokenized alone (exactly as the per-prompt call
does), padded on ``padding_side`` and run with an ``attention_mask``; HookedTransformer and the
Bridge then shift the positions of left-padded rows (absolute and rotary) and mask pad keys, so
a real token never reads a pad token. Pad tokens' contributions therefore come out exactly 0
from the backward pass itself; they are checked, not masked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import lin_lens
from lin_lens._hooks import HookSet, slots_of, swapped
from lin_lens._precision import exact_matmul
from lin_lens._tl import biases as nonzero_biases
from lin_lens._tl import hook_dict
from lin_lens.errors import InvalidArgumentError, InvalidPositionError, LinLensError

ORIGIN = "biases+positions"  # the one constant origin of a batched map


class PaddingLeakError(LinLensError, ArithmeticError):
    """A pad token reached the target: the batch would not reproduce the per-prompt maps."""


@dataclass
class BatchedContributions:
    """Per-prompt, per-token contributions of ``u_b · act_b[t_b]``.

    Shapes: B prompts padded to ``n`` tokens; ``d`` the source width.
    ``tokens [B, n]``, ``mask [B, n]`` (True on real tokens), ``target [B]`` (padded index),
    ``contributions [B, n]`` (exactly 0 on pads), ``constant [B]``, ``value [B]`` (the model's
    own ``u_b · act_b[t_b]``), ``grads [B, n, d]`` and ``x [B, n, d]`` (``g`` and the source).
    """

    tokens: Tensor
    mask: Tensor
    target: Tensor
    contributions: Tensor
    constant: Tensor
    value: Tensor
    grads: Tensor
    x: Tensor
    direction: Tensor
    hook: str
    source: str
    padding_side: str
    scale: Tensor | None = None  # |u|ᵀ|act| per prompt

    @property
    def relative_error(self) -> Tensor:
        """``|value − Σ contributions − constant|`` per prompt ``[B]``, relative to the scale the
        scalar was computed at: ``max(|value|, |u|ᵀ|act|, Σ|contributions| + |constant|)`` (as
        :attr:`lin_lens.LinearMap.relative_error` for direction maps: a logit difference near 0
        is not refused for its cancellation)."""
        rec = self.contributions.sum(-1) + self.constant
        den = torch.maximum(self.value.abs(), self.contributions.abs().sum(-1)
                            + self.constant.abs())
        if self.scale is not None:
            den = torch.maximum(den, self.scale.to(den.dtype))
        err = (self.value - rec).abs()
        return torch.where(den > 0, err / den.clamp_min(torch.finfo(den.dtype).tiny), err)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def per_prompt(self, b: int) -> Tensor:
        """Contributions of prompt ``b``'s own tokens ``[n_b]``, in order, pads dropped."""
        return self.contributions[b][self.mask[b]]

    def linear_map(self, b: int) -> Any:
        """Prompt ``b`` as a :class:`lin_lens.LinearMap` (``J [n_b, 1, d]``), what
        ``linear_map(model, prompt_b, hook, pos_b, direction=u_b)`` returns."""
        m = self.mask[b]
        const = {} if bool(self.constant[b] == 0) else {ORIGIN: self.constant[b].reshape(1, 1)}
        t = int(self.target[b]) - int((~m[: int(self.target[b])]).sum())  # unpadded index
        lm = lin_lens.LinearMap(
            self.grads[b][m][None, :, None, :], self.x[b][m], self.value[b].reshape(1, 1), const,
            self.hook, self.source, [t], (1,), direction=self.direction[b][None],
            tokens=self.tokens[b][m].cpu(), detached=True, int_pos=True)
        if self.scale is not None:
            lm.error_scale = self.scale[b].reshape(1, 1)
        return lm


def _direction(direction: Any, out_index: Any, B: int, d_out: int, like: Tensor) -> Tensor:
    if (direction is None) == (out_index is None):
        raise InvalidArgumentError("give exactly one of direction= or out_index=")
    if out_index is not None:
        idx = torch.as_tensor(out_index, dtype=torch.long).reshape(-1)
        if idx.numel() == 1:
            idx = idx.expand(B)
        if idx.numel() != B:
            raise InvalidArgumentError(
                f"out_index: one index or one per prompt ({B}), got {idx.numel()}")
        if int(idx.max()) >= d_out or int(idx.min()) < -d_out:
            raise InvalidPositionError(f"out_index out of range for an output of size {d_out}")
        u = torch.zeros(B, d_out, dtype=like.dtype, device=like.device)
        u[torch.arange(B), idx % d_out] = 1
        return u
    u = torch.as_tensor(direction, dtype=like.dtype, device=like.device)
    if u.ndim == 1:
        u = u.expand(B, -1)
    if u.shape != (B, d_out):
        raise InvalidArgumentError(
            f"direction must be [{d_out}] or [{B}, {d_out}], got {list(u.shape)}")
    return u


def pad_batch(model: Any, prompts: Sequence[Any], padding_side: str = "right",
              prepend_bos: bool | None = None) -> tuple[Tensor, Tensor]:
    """``(tokens [B, n], mask [B, n])``: every prompt tokenized alone with
    :func:`lin_lens.to_tokens` (so its tokens are the per-prompt call's), then padded with the
    tokenizer's pad id on ``padding_side`` as ``model.to_tokens(list, padding_side=...)``
    does. The mask is built from the lengths, so a pad id equal to BOS is harmless."""
    if padding_side not in ("left", "right"):
        raise InvalidArgumentError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if isinstance(prompts, (str, Tensor)) or not len(prompts):
        raise InvalidArgumentError("prompts: a non-empty list of texts or token-id sequences")
    seqs = [lin_lens.to_tokens(model, p, prepend_bos)[0] for p in prompts]
    n = max(len(s) for s in seqs)
    tok = getattr(model, "tokenizer", None)
    pad = getattr(tok, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    tokens = torch.full((len(seqs), n), pad, dtype=seqs[0].dtype, device=seqs[0].device)
    mask = torch.zeros(len(seqs), n, dtype=torch.bool, device=seqs[0].device)
    for b, s in enumerate(seqs):
        sl = slice(n - len(s), n) if padding_side == "left" else slice(0, len(s))
        tokens[b, sl] = s
        mask[b, sl] = True
    return tokens, mask


def _targets(pos: Any, mask: Tensor, padding_side: str) -> Tensor:
    B, n = mask.shape
    lengths = mask.sum(-1)
    req = torch.as_tensor(pos, dtype=torch.long).reshape(-1)
    if req.numel() == 1:
        req = req.expand(B)
    if req.numel() != B:
        raise InvalidArgumentError(f"pos: one position or one per prompt ({B}), got {req.numel()}")
    out = torch.empty(B, dtype=torch.long)
    for b in range(B):
        L, p = int(lengths[b]), int(req[b])
        if not -L <= p < L:
            raise InvalidPositionError(f"pos {p} out of range for prompt {b} ({L} tokens)")
        out[b] = p % L + (n - L if padding_side == "left" else 0)
    return out.to(mask.device)


def _scrub_nan(t: Tensor, hook: Any) -> Tensor:
    return torch.nan_to_num(t, nan=0.0)


def _scrub_hooks(model: Any, mask: Tensor) -> list:
    """With padding, a query row whose every key is masked (a left pad; a pad beyond a sliding
    window) has no softmax: HookedTransformer zeroes its NaN pattern, the Bridge (float64:
    its float32 softmax of a float64-min mask) does not, and ``0 · NaN`` then poisons the real
    rows through ``pattern @ v``. Zeroing those rows on ``hook_pattern`` (frozen in detached
    mode) changes only pad rows; real rows have a finite pattern."""
    if bool(mask.all()):
        return []
    return [(n, _scrub_nan) for n in hook_dict(model) if n.endswith("attn.hook_pattern")]


def _rotary_only(model: Any) -> bool:
    """No additive positional embedding (a Bridge keeps a ``hook_pos_embed`` that never
    fires on rotary models)."""
    return str(getattr(model.cfg, "positional_embedding_type", "")) in ("rotary", "alibi")


@exact_matmul()
def batched_contributions(
    model: Any,
    prompts: Sequence[Any],
    direction: Tensor | None = None,
    *,
    out_index: int | Sequence[int] | Tensor | None = None,
    hook: str = "logits",
    pos: int | Sequence[int] = -1,
    source: str = "hook_embed",
    padding_side: str = "right",
    prepend_bos: bool | None = None,
    check: bool = True,
    tol: float | None = None,
) -> BatchedContributions:
    """Exact per-token contributions of ``u_b · act_b[pos_b]`` for a batch of prompts: one
    detached forward and one backward pass (plus one forward-mode pass for the constant of
    models with biases or positional embeddings).

    Args:
        prompts: texts or token-id sequences (each is one prompt, as for ``linear_map``).
        direction: ``u`` on the output of ``hook`` (flattened): ``[d_out]`` or ``[B, d_out]``;
            for ``"logits"`` a vector over the vocabulary, e.g. a logit difference e_A − e_B.
        out_index: instead of ``direction``: one output index (a token id for ``"logits"``) or
            one per prompt.
        hook: ``"logits"`` (default) or any hook whose output is linear (as ``linear_map``).
        pos: each prompt's own target position (negative: from its end), one or one per prompt.
        padding_side: ``"right"`` (default) or ``"left"``; results are the same.
        check: raise :class:`lin_lens.NotExactError` for a prompt whose relative error exceeds
            ``tol`` (default by dtype, as ``linear_map``).

    Returns:
        :class:`BatchedContributions`; ``.linear_map(b)`` is prompt b's :class:`LinearMap`,
        whose ``contributions()`` equal ``linear_map(model, prompt_b, hook, pos_b,
        direction=u_b).contributions()`` to rounding.
    """
    for name, h in (("source", source), ("hook", hook)):
        if h != "logits" and h not in hook_dict(model):
            raise InvalidArgumentError(f"{name} {h!r} is not a hook of this model")
    tokens, mask = pad_batch(model, prompts, padding_side, prepend_bos)
    target = _targets(pos, mask, padding_side)
    B = tokens.shape[0]
    rows = torch.arange(B, device=tokens.device)  # prompt b's target is act[b, target[b]]
    kw: dict[str, Any] = {"return_type": "logits"}
    if not bool(mask.all()):
        kw["attention_mask"] = mask.long()

    seen: dict[str, Tensor] = {}

    def leaf(t: Tensor, hook: Any) -> Tensor:
        seen["x"] = t.detach().requires_grad_(True)
        return seen["x"]

    def grab(t: Tensor, hook: Any) -> None:
        seen["act"] = t

    hooks = [(source, leaf)] + ([] if hook == "logits" else [(hook, grab)])
    hooks += _scrub_hooks(model, mask)
    with lin_lens.detached(model), torch.enable_grad(), HookSet(model) as hs:
        for name, fn in hooks:
            hs.add(name, fn)
        logits = model(tokens, **kw)
        if "x" not in seen:
            raise InvalidArgumentError(f"source hook {source!r} did not fire in the forward pass")
        act = logits if hook == "logits" else seen.get("act")
        if act is None:
            raise InvalidArgumentError(f"target hook {hook!r} did not fire in the forward pass")
        act_t = act[rows, target].reshape(B, -1)  # [B, d_out]
        u = _direction(direction, out_index, B, act_t.shape[-1], act_t)
        value = (u * act_t).sum(-1)
        scale = (u.abs() * act_t.abs()).sum(-1).detach()  # the scale uᵀact is computed at
        if not bool(value.isfinite().all()):
            raise InvalidArgumentError("the batched forward is not finite at a target position; "
                             f"padding_side={padding_side!r} may not be supported by this model")
        (grads,) = torch.autograd.grad(value.sum(), seen["x"])
    x = seen["x"].detach()
    grads = grads.reshape(B, x.shape[1], -1)
    x = x.reshape(B, x.shape[1], -1)
    contributions = (grads * x).sum(-1)
    if bool(contributions[~mask].ne(0).any()):
        raise PaddingLeakError(
            "pad tokens contribute to the target: the model attended to padding (was the "
            "attention mask ignored?); the batched map would not equal the per-prompt one")
    constant = _constant(model, tokens, mask, kw, hook, source, target, u)
    res = BatchedContributions(tokens, mask, target, contributions.detach(), constant,
                               value.detach(), grads.detach(), x, u.detach(), hook, source,
                               padding_side, scale)
    if check:
        bound = tol if tol is not None else lin_lens.default_tolerance(value.dtype)
        bad = (res.relative_error > bound).nonzero()
        if len(bad):
            raise lin_lens.NotExactError(res.linear_map(int(bad[0, 0])), bound)
    return res


def _constant(model: Any, tokens: Tensor, mask: Tensor, kw: dict, hook: str, source: str,
              target: Tensor, u: Tensor) -> Tensor:
    """Σ_origins ∂value_b/∂origin · origin per prompt ``[B]``: a forward-mode pass of the
    detached network with tangent = value on every non-zero bias and the positional
    embeddings, none on the source (cut there, as the reverse pass's leaf cuts it)."""
    import torch.autograd.forward_ad as fwAD

    B = tokens.shape[0]
    zero = torch.zeros(B, dtype=u.dtype, device=u.device)
    biases = {n: p.detach() for n, p in nonzero_biases(model).items()}
    # the input origins other than the source (as linear_map's leaves): on a Bridge a
    # residual-stream source may not cut the path from the embeddings
    origins = [h for h in ("hook_embed", "hook_pos_embed") if h in hook_dict(model) and h != source]
    if not (biases or "hook_embed" in origins
            or ("hook_pos_embed" in origins and not _rotary_only(model))):
        return zero  # nothing but the source reaches the target: exactly 0
    out: dict[str, Tensor] = {}

    def dual(t: Tensor, hook: Any) -> Tensor:
        return fwAD.make_dual(t.detach(), t.detach())

    def cut(t: Tensor, hook: Any) -> Tensor:
        return t.detach()  # drops the tangent: the source is an input, not a constant

    def grab(t: Tensor, hook: Any) -> None:
        out["act"] = t

    hooks: list[tuple[str, Callable[..., Any]]] = [(h, dual) for h in origins] + [(source, cut)]
    hooks += _scrub_hooks(model, mask)
    if hook != "logits":
        hooks.append((hook, grab))
    with lin_lens.detached(model), fwAD.dual_level(), torch.no_grad(), HookSet(model) as hs:
        for name, fn in hooks:
            hs.add(name, fn)
        params = {n: fwAD.make_dual(p, p) for n, p in biases.items()}
        with swapped(slots_of(model, list(params)), params):  # not functional_call: Bridges
            res = model(tokens, **kw)
        tangent = fwAD.unpack_dual(res if hook == "logits" else out["act"]).tangent
    if tangent is None:  # no origin reached the target: the constant is exactly 0
        return zero
    t = tangent[torch.arange(B, device=target.device), target].reshape(B, -1)
    return (u * t).sum(-1)
