"""Checks of a QK attribution against real forward passes: remove one key-side part.

*Frozen*: the model runs on the clean prompt with the part's vector subtracted from the key at
that key position, right where the keys enter the score (``hook_rot_k`` / ``hook_k``); nothing
upstream changes, and the score's soft-cap gate is held at its clean value, so the score changes
by exactly minus the part's marginal. The softmax is then re-applied to the query's row with
only that score changed: the pattern change the part accounts for with everything else frozen.
*Ordinary*: the part itself is removed from the unmodified model (a token's embedding, a bias, a
node's output zeroed), and the score and pattern it changes are read beside it.
"""

from __future__ import annotations

import contextlib
import html
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lin_lens._hooks import HookSet, zeroed
from lin_lens._precision import exact_matmul
from lin_lens._tl import clean_name
from lin_lens.errors import InvalidArgumentError, UnsupportedFeatureError
from lin_lens.freeze import detached
from lin_lens.qk.result import QKAttribution


@dataclass
class KeyPartRemoval:
    """What removing key-side part ``part`` at key ``key`` changes in the score and pattern."""

    part: str
    key: int
    predicted: float  # −(the part's k-marginal)
    frozen_score: float  # measured, everything else frozen
    frozen_pattern: float  # the pattern change there, softmax re-applied to the frozen scores
    ordinary_score: float  # the part removed from the ordinary model
    ordinary_pattern: float

    @property
    def error(self) -> float:
        den = abs(self.predicted)
        return abs(self.frozen_score - self.predicted) / den if den > 0 else abs(
            self.frozen_score)

    def __repr__(self) -> str:
        return (f"KeyPartRemoval({self.part} at key {self.key}: Δscore predicted "
                f"{self.predicted:+.6g}, frozen {self.frozen_score:+.6g} (rel. err "
                f"{self.error:.1e}), ordinary {self.ordinary_score:+.6g}; Δpattern frozen "
                f"{self.frozen_pattern:+.4g}, ordinary {self.ordinary_pattern:+.4g})")

    def _repr_html_(self) -> str:
        head = ["part", "key", "Δscore predicted", "frozen", "ordinary", "Δpattern frozen",
                "ordinary"]
        cells = [self.part, self.key, f"{self.predicted:+.6g}", f"{self.frozen_score:+.6g}",
                 f"{self.ordinary_score:+.6g}", f"{self.frozen_pattern:+.4g}",
                 f"{self.ordinary_pattern:+.4g}"]
        return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr><tr>"
                + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr></table>")


@exact_matmul()
def remove_key_part(model: Any, att: QKAttribution, key: int, part: int | str
                    ) -> KeyPartRemoval:
    """Remove key-side part ``part`` (an index into ``att.k_parts`` at ``key``, or its label)
    and measure the change in ``att``'s score at ``key``, frozen and ordinary (see the module
    docstring). Parts of every kind but ``"rest"`` can be removed."""
    j = att._key(key)
    kp = att.k_parts[j]
    b = _part_index(att, kp, part)
    if kp.kind[b] == "rest":
        raise InvalidArgumentError("the rest part is many nodes at once; remove one node")
    form = att.meta.get("form")
    if form == "rotate":
        raise UnsupportedFeatureError(
            "the keys of this attention (a Bridge attention that rotates after hook_k without a "
            "hook) cannot be edited where they enter the score")
    predicted = -float(att.k_marginal[j][b])
    tokens = att.tokens[None].to(next(model.parameters()).device)
    L, h, t = att.layer, att.head, att.query
    clean_scores, clean_pattern = _run(model, tokens, L)
    vec = kp.vectors[b]

    def edit(k: Tensor, hook: Any) -> Tensor:
        k = k.clone()
        k[0, key, att.kv_head] -= vec.to(k)
        return k

    new_scores, _ = _run(model, tokens, L, [(att.meta["k_hook"], edit)])
    s_old, s_new = clean_scores[h, t, key], new_scores[h, t, key]
    frozen = float(_frozen_change(model, att, j, s_old, s_new))
    row = clean_scores[h, t].clone()
    row[key] = row[key] + frozen
    mask = torch.isfinite(clean_scores[h, t]) & (clean_scores[h, t] >
                                                  torch.finfo(row.dtype).min / 2)
    p_new = torch.softmax(torch.where(mask, row, torch.full_like(row, -torch.inf)), -1)
    frozen_pattern = float(p_new[key] - clean_pattern[h, t, key])
    with _removed(model, att, kp, b, key):
        ord_scores, ord_pattern = _run(model, tokens, L, detach=False)
    return KeyPartRemoval(
        kp.label(b, att.str_tokens), key, predicted, frozen, frozen_pattern,
        float(ord_scores[h, t, key] - s_old), float(ord_pattern[h, t, key]
                                                    - clean_pattern[h, t, key]))


def _part_index(att: QKAttribution, kp: Any, part: int | str) -> int:
    if isinstance(part, str):
        labels = [kp.label(i, att.str_tokens) for i in range(len(kp))]
        if part not in labels:
            raise InvalidArgumentError(f"no key-side part {part!r} at this key; parts: "
                                       f"{', '.join(labels[:8])}…")
        return labels.index(part)
    if not -len(kp) <= part < len(kp):
        raise InvalidArgumentError(f"part {part} out of range ({len(kp)} key-side parts)")
    return part % len(kp)


def _run(model: Any, tokens: Tensor, L: int, hooks: list | None = None, detach: bool = True
         ) -> tuple[Tensor, Tensor]:
    """(scores, pattern) ``[heads, n, n]`` of layer ``L`` in one no-grad forward, in detached
    mode (its forward values are the ones the attribution decomposed; on a Bridge they differ
    from the plain forward's at float32 rounding) or, ``detach=False``, the ordinary model."""
    got: dict[str, Tensor] = {}

    def read(name: str):
        def fn(t: Tensor, hook: Any) -> None:
            got[name] = t.detach()[0]
        return fn

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if detach:
            stack.enter_context(detached(model))
        hs = stack.enter_context(HookSet(model))
        for name, fn in hooks or []:
            hs.add(name, fn)
        hs.add(f"blocks.{L}.attn.hook_attn_scores", read("scores"))
        hs.add(f"blocks.{L}.attn.hook_pattern", read("pattern"))
        kw = {"stop_at_layer": L + 1} if L + 1 < int(model.cfg.n_layers) else {}
        model(tokens, return_type=None if kw else "logits", **kw)
    return got["scores"], got["pattern"]


def _frozen_change(model: Any, att: QKAttribution, j: int, s_old: Tensor, s_new: Tensor
                   ) -> Tensor:
    """The score change with the soft cap's gate ``g = tanh(r/c)/(r/c)`` held at its clean
    value: ``g · (r_new − r_old)`` for the uncapped scores ``r`` (``score = c·tanh(r/c) +
    bias``)."""
    cap = getattr(model.cfg, "attn_scores_soft_cap", None)
    if not cap or cap <= 0:
        return s_new - s_old
    bias = att.bias[j]
    r_old = cap * torch.atanh((s_old - bias) / cap)
    r_new = cap * torch.atanh((s_new - bias) / cap)
    x = r_old / cap
    g = torch.tanh(x) / x if bool(x != 0) else torch.ones_like(x)
    return g * (r_new - r_old)


@contextlib.contextmanager
def _removed(model: Any, att: QKAttribution, kp: Any, b: int, key: int):
    """The ordinary model with key-side part ``b`` removed."""
    kind, layer, pos, index = kp.kind[b], kp.layer[b], kp.pos[b], kp.index[b]
    if kind in ("bias",):
        with zeroed(_param(model, kp.name[b])):
            yield
        return
    where = {"token": ("hook_embed", (0, pos)), "embed": ("hook_embed", (0, pos)),
             "pos_embed": ("hook_pos_embed", (0, slice(None)) if pos < 0 else (0, pos)),
             "head": (f"blocks.{layer}.attn.hook_z", (0, pos, index)),
             "attn": (f"blocks.{layer}.attn.hook_z", (0, pos)),
             "neuron": (f"blocks.{layer}.mlp.hook_post", (0, pos, index)),
             "mlp": (f"blocks.{layer}.mlp.hook_post", (0, pos))}
    if kind not in where:
        raise UnsupportedFeatureError(f"cannot remove a {kind!r} part from the ordinary model")
    name, at = where[kind]

    def zero(t: Tensor, hook: Any) -> Tensor:
        t = t.clone()
        t[at] = 0
        return t

    with HookSet(model) as hs:
        hs.add(name, zero)
        yield


def _param(model: Any, name: str) -> Tensor:
    params = dict(model.named_parameters())
    if name in params:
        return params[name]
    for full, p in params.items():  # a Bridge's wrapped names, shown without the wrapper
        if clean_name(full) == name:
            return p
    parts = name.split(".")  # decompose's TransformerLens-style label: blocks.L.attn.b_O
    if len(parts) == 4 and parts[0] == "blocks":
        module = getattr(model.blocks[int(parts[1])], parts[2], None)
        value = getattr(module, parts[3], None)
        if isinstance(value, Tensor):
            for p in params.values():
                if p.data_ptr() == value.data_ptr() and p.shape == value.shape:
                    return p
    raise InvalidArgumentError(f"no parameter {name!r} to remove")
