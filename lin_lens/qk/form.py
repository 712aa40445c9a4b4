"""How a layer's attention scores are formed from its queries and keys, read off the model.

Under detached mode a pre-softmax score is exactly bilinear in the input:

    score[h, t, s] = g[h, t, s] · (q[t, h] · k[s, kv(h)]) / attn_scale + bias[h, t, s]

with ``q``/``k`` the queries and keys as they enter the product (after q/k norms, whose scales
detached mode freezes, and after rotary, which is linear given the positions), ``kv(h)`` the
key-value head of query head ``h`` (GQA), ``g`` the score soft-cap's gate frozen at this input
(``c·tanh(u/c) = g·u``; 1 without a cap, as detached mode freezes every other gate) and ``bias``
an additive position bias (ALiBi). :func:`score_forms` finds, per layer, which hooks hold ``q``
and ``k``: ``hook_rot_q``/``hook_rot_k`` where they fire, else ``hook_q``/``hook_k`` rotated by
the attention module's own rotary method with the cos/sin it recorded (a Bridge attention whose
rotation fires no hook), else ``hook_q``/``hook_k`` as they are; and it refuses, naming the
attention class, a layer where none of these reproduces the model's own ``hook_attn_scores``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lin_lens._numeric import relative_error
from lin_lens._tl import canonical, hook_dict
from lin_lens.errors import UnsupportedFeatureError
from lin_lens.freeze import detached
from lin_lens.maps.result import default_tolerance


@dataclass
class ScoreForm:
    """One layer's score formation (see the module docstring)."""

    layer: int
    q_hook: str  # canonical name of the hook holding the (unrotated if ``rotate``) queries
    k_hook: str
    rotate: Callable[[Tensor, str], Tensor] | None  # [..., pos, heads, d], "q"/"k" → rotated
    inv_scale: float
    softcap: float | None
    n_heads: int
    n_kv: int
    d_head: int
    bias: Tensor | None  # [heads, n, n] additive position bias (ALiBi), else None
    mask: Tensor  # [heads, n, n] True where a score is not masked out
    scores: Tensor  # [heads, n, n] the model's own hook_attn_scores
    pattern: Tensor  # [heads, n, n]
    q: Tensor  # [n, heads, d_head] the queries as they enter the product
    k: Tensor  # [n, kv heads, d_head]
    how: str  # which of the three forms, for the result's meta

    def kv_head(self, head: int) -> int:
        return head // (self.n_heads // self.n_kv)

    def gate(self, head: int, t: int, keys: Sequence[int]) -> Tensor:
        """``g · inv_scale`` at ``(head, t, keys)``: the factor of ``q·k`` in the score."""
        raw = (self.q[t, head] @ self.k[list(keys), self.kv_head(head)].T) * self.inv_scale
        if not self.softcap:
            return torch.full_like(raw, self.inv_scale)
        u = raw / self.softcap
        safe = torch.where(u == 0, torch.ones_like(u), u)
        g = torch.where(u == 0, torch.ones_like(u), torch.tanh(safe) / safe)
        return g * self.inv_scale

    def position_bias(self, head: int, t: int, keys: Sequence[int]) -> Tensor:
        if self.bias is None:
            return self.scores.new_zeros(len(keys))
        return self.bias[head, t, list(keys)]


_CANDIDATES = ("rot", "rotate", "plain")


def form_hooks(model: Any, layers: Sequence[int]) -> set[str]:
    """The hooks :func:`score_forms` reads for ``layers`` (under both of their names)."""
    names = set()
    for L in layers:
        for leaf in ("hook_rot_q", "hook_rot_k", "hook_q", "hook_k", "hook_cos", "hook_sin",
                     "hook_attn_scores", "hook_pattern"):
            h = f"blocks.{L}.attn.{leaf}"
            if h in hook_dict(model):
                names.update((h, canonical(model, h)))
    return names


def score_forms(model: Any, tokens: Tensor, layers: Sequence[int], cache: Any = None
                ) -> dict[int, ScoreForm]:
    """The :class:`ScoreForm` of each layer in ``layers`` for this input (one forward pass, or
    none when ``cache``, a detached cache of the same tokens, holds :func:`form_hooks`)."""
    _refuse_unsupported(model)
    if cache is None:
        names = form_hooks(model, layers)
        stop = max(layers) + 1
        kw = {"stop_at_layer": stop} if stop < int(model.cfg.n_layers) else {}
        with torch.no_grad(), detached(model):
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names, **kw)
    return {L: _form(model, cache, L) for L in layers}


def _refuse_unsupported(model: Any) -> None:
    cfg = model.cfg
    if getattr(cfg, "use_logn_attn", False):
        raise UnsupportedFeatureError(
            "use_logn_attn: queries are rescaled by a position-dependent factor after "
            "hook_rot_q, outside every hook; lin_lens cannot read the scored queries")
    if str(getattr(cfg, "positional_embedding_type", "")) == "relative_positional_bias":
        raise UnsupportedFeatureError(
            "relative positional bias (T5-style) scores: not supported by qk_attribution")


def _get(model: Any, cache: Any, L: int, leaf: str) -> Tensor | None:
    h = f"blocks.{L}.attn.{leaf}"
    if h not in hook_dict(model):
        return None
    return cache.cache_dict.get(canonical(model, h))


def _form(model: Any, cache: Any, L: int) -> ScoreForm:
    attn = model.blocks[L].attn
    scores = _get(model, cache, L, "hook_attn_scores")
    pattern = _get(model, cache, L, "hook_pattern")
    if scores is None or pattern is None:
        raise UnsupportedFeatureError(f"blocks.{L}.attn: hook_attn_scores / hook_pattern did "
                                      "not fire, so its scores cannot be explained")
    scores, pattern = scores[0].detach(), pattern[0].detach()
    H, n = scores.shape[0], scores.shape[-1]
    floor = torch.finfo(scores.dtype).min / 2
    mask = torch.isfinite(scores) & (scores > floor)
    cap = getattr(model.cfg, "attn_scores_soft_cap", None)
    cap = float(cap) if cap is not None and cap > 0 else None
    bias = _alibi(model, attn, n)
    inv = _inv_scale(model, attn)
    tol = 1e3 * default_tolerance(scores.dtype)
    tried = []
    for how in _CANDIDATES:
        got = _candidate(model, cache, L, attn, how)
        if got is None:
            continue
        q_hook, k_hook, rotate, q, k = got
        n_kv = k.shape[1]
        if H % n_kv or q.shape[1] != H:
            tried.append(f"{how}: {q.shape[1]} query / {n_kv} key heads for {H} score heads")
            continue
        form = ScoreForm(L, q_hook, k_hook, rotate, inv, cap, H, n_kv, q.shape[-1], bias, mask,
                         scores, pattern, q, k, how)
        pred = _predict(form)
        err = relative_error(scores[mask], pred[mask])
        if err <= tol:
            return form
        tried.append(f"{how}: relative error {err:.2g}")
    raise UnsupportedFeatureError(
        f"blocks.{L}.attn ({type(attn).__name__}): no hook holds the queries and keys that "
        f"enter its scores in a form lin_lens knows ({'; '.join(tried) or 'no q/k hooks'})")


def _candidate(model: Any, cache: Any, L: int, attn: Any, how: str):
    if how == "rot":
        q, k = _get(model, cache, L, "hook_rot_q"), _get(model, cache, L, "hook_rot_k")
        if q is None or k is None:
            return None
        return (canonical(model, f"blocks.{L}.attn.hook_rot_q"),
                canonical(model, f"blocks.{L}.attn.hook_rot_k"), None, q[0].detach(),
                k[0].detach())
    q, k = _get(model, cache, L, "hook_q"), _get(model, cache, L, "hook_k")
    if q is None or k is None:
        return None
    rotate = None
    if how == "rotate":
        cos, sin = _get(model, cache, L, "hook_cos"), _get(model, cache, L, "hook_sin")
        if cos is None or sin is None or not hasattr(attn, "_apply_rotary_pos_emb"):
            return None
        rotate = _module_rotation(attn, cos.detach(), sin.detach())
    q, k = q[0].detach(), k[0].detach()
    if rotate is not None:
        q, k = rotate(q, "q"), rotate(k, "k")
    return (canonical(model, f"blocks.{L}.attn.hook_q"),
            canonical(model, f"blocks.{L}.attn.hook_k"), rotate, q, k)


def _module_rotation(attn: Any, cos: Tensor, sin: Tensor) -> Callable[[Tensor, str], Tensor]:
    """The attention module's own rotary method with the cos/sin it recorded, on tensors laid
    out ``[..., pos, heads, d]`` (any leading dims: parts of a sum rotate one by one)."""

    def rotate(x: Tensor, which: str) -> Tensor:
        lead, (n, h, d) = x.shape[:-3], x.shape[-3:]
        y = x.reshape(-1, n, h, d).transpose(1, 2)  # [B, heads, pos, d]
        qr, kr = attn._apply_rotary_pos_emb(y, y, cos.to(y), sin.to(y))
        out = qr if which == "q" else kr
        return out.transpose(1, 2).reshape(*lead, n, h, d)

    return rotate


def _inv_scale(model: Any, attn: Any) -> float:
    scale = getattr(attn, "attn_scale", None)  # HookedTransformer (layer-dependent where so)
    if isinstance(scale, (int, float)) or (isinstance(scale, Tensor) and scale.numel() == 1):
        return 1.0 / float(scale)
    scaling = getattr(attn, "scaling", None)  # Bridge attention: the multiplier
    if isinstance(scaling, (int, float)):
        return float(scaling)
    if not getattr(model.cfg, "use_attn_scale", True):
        return 1.0
    cfg_scale = getattr(model.cfg, "attn_scale", -1.0)
    return 1.0 / (cfg_scale if cfg_scale and cfg_scale > 0 else math.sqrt(model.cfg.d_head))


def _alibi(model: Any, attn: Any, n: int) -> Tensor | None:
    if str(getattr(model.cfg, "positional_embedding_type", "")) != "alibi":
        return None
    alibi = getattr(attn, "alibi", None)
    if not isinstance(alibi, Tensor):
        raise UnsupportedFeatureError("ALiBi: the attention module kept no alibi table")
    return alibi[:, -n:, :n].detach()


def _predict(form: ScoreForm) -> Tensor:
    """The scores ``[heads, n, n]`` from the form's q, k, gate and bias (unmasked entries)."""
    rep = form.n_heads // form.n_kv
    k = form.k.repeat_interleave(rep, dim=1)  # [n, heads, d]
    raw = torch.einsum("thd,shd->hts", form.q, k) * form.inv_scale
    if form.softcap:
        raw = form.softcap * torch.tanh(raw / form.softcap)
    if form.bias is not None:
        raw = raw + form.bias
    return raw
