"""The exact per-component decomposition of a direction, for a padded batch of prompts at once.

:func:`lin_lens.decompose` splits one prompt's target into what each component (embeddings,
each head, each MLP, biases) wrote into the residual stream. For circuit datasets the question
is one scalar per prompt, ``v_b = u_b · act_b[t_b]`` (a logit difference, say). Past the residual
stream everything is frozen-linear in detached mode, so

    v_b = Σ_c g_b · w_c,b[t_b] + Σ (biases after the residual stream, along u_b)

where ``w_c,b`` is component c's write and the covector ``g_b = ∂v_b / ∂resid_b[t_b]`` has a
closed form: ``u_b`` for a residual-stream target, ``C u_b / s_b`` for the final norm's output
(``C`` its centring, ``s_b`` its frozen scale), ``C (w ⊙ W_U (γ_b ⊙ u_b)) / s_b`` for the
logits (``w`` the final norm's weight, ``γ_b`` the frozen final soft-cap gate, Gemma 2). The
writes are read from ONE detached forward of the padded batch, through ``decompose``'s own
helpers (component enumeration, post-norms, refusals); no backward pass is needed.

Each prompt's parts are what ``decompose(model, prompt_b, hook, pos_b).parts @ u_b`` gives, to
rounding. Two checks per prompt, as ``decompose`` checks its own sum: the writes sum to the
residual stream at the target, and the parts to the model's own ``v_b``; otherwise
:class:`lin_lens.NotExactError`. Padding is :func:`lin_lens.corpus.batched_contributions`'s
(TransformerLens's attention mask, shifted positions for left padding): only the target rows of
real tokens are read, and a pad token never reaches them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lin_lens._hooks import HookSet
from lin_lens._html import table
from lin_lens._precision import exact_matmul
from lin_lens.analyses.decompose import (
    FINAL,
    NOT_SUMMING,
    Decomposition,
    _centers,
    _unembed_input,
    grouped,
    require_fired,
    supported_stage,
    writes,
)
from lin_lens.corpus.batched import _direction, _scrub_hooks, _targets, pad_batch
from lin_lens.decoding import norm_params
from lin_lens.errors import NotExactError
from lin_lens.freeze import detached
from lin_lens.maps import default_tolerance
from lin_lens.maps.readout import Readout


@dataclass
class BatchedDecomposition:
    """Per-prompt, per-component parts of ``u_b · act_b[t_b]``; ``Σ_c parts[b, c] = value[b]``.

    ``labels`` / ``kinds``: the components, in ``decompose``'s order. ``parts [B, comp]``,
    ``value [B]`` (the model's own ``u_b · act_b[t_b]``), ``scale [B]`` (``|u|ᵀ|act|``),
    ``resid_error [B]`` (‖resid − Σ writes‖ / ‖resid‖ at the target), ``tokens [B, n]``,
    ``mask [B, n]`` (True on real tokens), ``target [B]`` (padded index), ``direction [B, d_out]``.
    """

    hook: str
    labels: list[str]
    kinds: list[str]
    parts: Tensor
    value: Tensor
    scale: Tensor
    resid_error: Tensor
    tokens: Tensor
    mask: Tensor
    target: Tensor
    direction: Tensor
    padding_side: str

    @property
    def relative_error(self) -> Tensor:
        """``|value − Σ parts|`` per prompt ``[B]``, relative to the scale the scalar is computed
        at, ``max(|value|, |u|ᵀ|act|, Σ|parts|)`` (as ``BatchedContributions``)."""
        den = torch.maximum(self.value.abs(), self.parts.abs().sum(-1))
        den = torch.maximum(den, self.scale.to(den.dtype))
        err = (self.value - self.parts.sum(-1)).abs()
        return torch.where(den > 0, err / den.clamp_min(torch.finfo(den.dtype).tiny), err)

    def __len__(self) -> int:
        return self.parts.shape[0]

    def __getitem__(self, label: str) -> Tensor:
        """One component's part in every prompt ``[B]``."""
        return self.parts[:, self.labels.index(label)]

    def position(self, b: int) -> int:
        """Prompt ``b``'s target position in its own (unpadded) tokens."""
        t = int(self.target[b])
        return t - int((~self.mask[b, :t]).sum())

    def decomposition(self, b: int) -> Decomposition:
        """Prompt ``b`` as a :class:`lin_lens.Decomposition` of the scalar (``d_out = 1``): what
        ``decompose(model, prompt_b, hook, pos_b)`` gives, its parts contracted with ``u_b``."""
        return Decomposition(self.hook, self.position(b), list(self.labels), list(self.kinds),
                             self.parts[b][:, None], self.value[b].reshape(1),
                             self.tokens[b][self.mask[b]].cpu(),
                             meta={"direction": self.direction[b]})

    def grouped(self) -> tuple[list[str], Tensor]:
        """Heads + ``b_O`` → ``{L}_attn_out``, MLP + ``b_out`` → ``{L}_mlp_out``:
        ``[B, groups]``."""
        labels, parts = grouped(self.labels, self.parts.T)
        return labels, parts.T

    def to_pandas(self, grouped: bool = False) -> Any:
        """A ``pandas.DataFrame``: one row per prompt, one column per component (or group)."""
        import pandas as pd

        labels, parts = self.grouped() if grouped else (self.labels, self.parts)
        return pd.DataFrame(parts.detach().cpu().double().numpy(), columns=labels)

    def top(self, n: int = 10) -> list[tuple[str, float, float]]:
        """The ``n`` components with the largest mean |part|: (label, mean part, mean |part|)."""
        mean, mabs = self.parts.mean(0), self.parts.abs().mean(0)
        return [(self.labels[i], float(mean[i]), float(mabs[i]))
                for i in mabs.argsort(descending=True)[:n]]

    def _repr_html_(self, n: int = 12) -> str:
        rows = [(lab, f"{m:+.3g}", f"{a:.3g}") for lab, m, a in self.top(n)]
        return table(rows, ["component", "mean part", "mean |part|"],
                     caption=f"{self.hook}: {len(self)} prompts, {len(self.labels)} components, "
                             f"max relative error {float(self.relative_error.max()):.1e}")


def _covector(model: Any, cache: Any, at: tuple, hook: str,
              u: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """``(g [B, d_model], {bias after the residual stream: its part [B]})`` with
    ``u_b · act_b[t_b] = g_b · resid_b[t_b] + Σ extra``: the frozen final readout pulled back
    (``decompose``'s ``_final_projection`` applied to ``u_b`` instead of built as a matrix)."""
    if hook not in FINAL:
        return u, {}
    ln = model.ln_final
    extra: dict[str, Tensor] = {}
    if hook == "logits":
        w, b = norm_params(ln)
        b = b if b is not None and bool(b.ne(0).any()) else None
        readout = Readout.at(model, _unembed_input(model, cache, at))
        ug = u * readout.gate if readout.gate is not None else u
        if b is not None:
            extra["ln_final.b"] = ug @ (b @ readout.W)
        if readout.b is not None:
            extra["unembed.b_U"] = ug @ readout.b
        u = ug @ readout.W.T
        if w is not None:
            u = u * w
    if _centers(model.cfg, ln):
        u = u - u.mean(-1, keepdim=True)
    return u / cache["ln_final.hook_scale"][at], extra


@exact_matmul()
def batched_decompose(
    model: Any,
    prompts: Sequence[Any],
    direction: Tensor | None = None,
    *,
    out_index: int | Sequence[int] | Tensor | None = None,
    hook: str = "logits",
    pos: int | Sequence[int] = -1,
    padding_side: str = "right",
    prepend_bos: bool | None = None,
    check: bool = True,
    tol: float | None = None,
) -> BatchedDecomposition:
    """Exact per-component parts of ``u_b · act_b[pos_b]`` for a padded batch of prompts, from
    one detached forward (no backward pass).

    Args:
        prompts: texts or token-id sequences (each one prompt, as for ``decompose``).
        direction: ``u`` on the output of ``hook``: ``[d_out]`` or ``[B, d_out]``; for
            ``"logits"`` a vector over the vocabulary, e.g. a logit difference e_IO − e_S.
        out_index: instead of ``direction``: one output index, or one per prompt.
        hook: ``"logits"`` (default), ``"ln_final.hook_normalized"`` or a residual-stream hook
            ``blocks.L.hook_resid_pre/mid/post`` (as ``decompose``).
        pos: each prompt's own target position (negative: from its end).
        padding_side: ``"right"`` (default) or ``"left"``; results are the same.
        check: raise :class:`lin_lens.NotExactError` for a prompt whose writes do not sum to the
            residual stream, or whose parts do not sum to its value, beyond ``tol``.

    Returns:
        :class:`BatchedDecomposition`: ``parts[b]`` equals
        ``decompose(model, prompt_b, hook, pos_b).parts @ u_b`` to rounding, same labels.
    """
    n_full, with_attn, final = supported_stage(model, hook)
    tokens, mask = pad_batch(model, prompts, padding_side, prepend_bos)
    target = _targets(pos, mask, padding_side)
    B = tokens.shape[0]
    at = (torch.arange(B, device=tokens.device), target)
    layers = list(range(n_full)) + ([n_full] if with_attn else [])
    resid_hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post" if final else hook
    wanted = {"hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized",
              resid_hook, hook}
    for layer in layers:
        # the norms before the residual add: Gemma's ln*_post, post-norm blocks' ln1/ln2 (OLMo 2)
        wanted |= {f"blocks.{layer}.{n}" for n in ("attn.hook_z", "hook_mlp_out",
                                                    "ln1_post.hook_scale", "ln2_post.hook_scale",
                                                    "ln1.hook_scale", "ln2.hook_scale")}
    kw: dict[str, Any] = {} if bool(mask.all()) else {"attention_mask": mask.long()}
    with torch.no_grad(), detached(model), HookSet(model) as hs:
        for name, fn in _scrub_hooks(model, mask):
            hs.add(name, fn)
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted, **kw)
    require_fired(cache, hook, resid_hook)
    act = (logits if hook == "logits" else cache[hook])[at].reshape(B, -1)
    u = _direction(direction, out_index, B, act.shape[-1], act)
    parts = writes(model, cache, at, layers, n_full)
    resid = cache[resid_hook][at]
    total = sum((w for _, _, w in parts), torch.zeros_like(resid))
    resid_error = ((resid - total).norm(dim=-1)
                   / resid.norm(dim=-1).clamp_min(torch.finfo(resid.dtype).tiny))
    g, extra = _covector(model, cache, at, hook, u)
    cols = [(w * g).sum(-1).expand(B) for _, _, w in parts] + list(extra.values())
    res = BatchedDecomposition(
        hook, [p[0] for p in parts] + list(extra), [p[1] for p in parts] + ["bias"] * len(extra),
        torch.stack(cols, -1), (u * act).sum(-1), (u.abs() * act.abs()).sum(-1), resid_error,
        tokens, mask, target, u, padding_side)
    if check:
        bound = tol if tol is not None else default_tolerance(act.dtype)
        bad = (resid_error > bound).nonzero()
        if len(bad):  # the writes, in the residual stream, as decompose would refuse them
            b = int(bad[0, 0])
            stack = torch.stack([w.expand(B, -1)[b] for _, _, w in parts])
            dec = Decomposition(resid_hook, res.position(b), res.labels[:len(parts)],
                                res.kinds[:len(parts)], stack, resid[b],
                                tokens[b][mask[b]].cpu())
            raise NotExactError(dec, bound, NOT_SUMMING)
        bad = (res.relative_error > bound).nonzero()
        if len(bad):
            raise NotExactError(res.decomposition(int(bad[0, 0])), bound, NOT_SUMMING)
    return res
