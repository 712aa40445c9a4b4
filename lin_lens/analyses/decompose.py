"""The exact decomposition of an activation into what each component wrote.

In detached mode the residual stream at any point is a plain sum of what was written into it:
the token and position embeddings, each head's ``z_h W_O[h]``, each attention bias ``b_O``, each
MLP's output and bias ``b_out``. Past the residual stream, every norm has a frozen scale, so the
final norm (and a post-attention/post-MLP norm, Gemma) is a *linear* map ``P``; the direct
contribution of a component to a target after the final norm is ``P`` applied to what it wrote —
exactly TransformerLens' ``cache.apply_ln_to_stack`` with the cached scale. Biases that sit after
the residual stream (``ln_final.b``, ``unembed.b_U``) are their own components. The parts sum to
the target to rounding.

Each component's output is itself exactly linear in the input embeddings, so with
``operators=True`` every part also gets its own operator ``J_c`` (``[n_src, d_out, d_in]``) and
constant with ``part_c = Σ_i J_c[i] x_i + const_c``; the ``J_c`` sum to the whole map's ``J``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lin_lens._html import table
from lin_lens._numeric import relative_error
from lin_lens._precision import exact_matmul
from lin_lens._tl import POST_NORM_ARCHITECTURES, nonzero_bias
from lin_lens._types import Inputs, OutIndex
from lin_lens.analyses.heads import W_O, head_operators
from lin_lens.decoding import norm_params
from lin_lens.errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    NotExactError,
    UnsupportedFeatureError,
)
from lin_lens.freeze import detached
from lin_lens.maps import default_tolerance, linear_map, to_tokens
from lin_lens.maps.readout import Readout
from lin_lens.maps.request import is_int_position, positions

_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")
FINAL = ("ln_final.hook_normalized", "logits")
NOT_SUMMING = ("The component parts do not sum to the target: this block layout (e.g. post-norm "
               "blocks, positions that enter only Q/K) is not one decompose knows; use "
               "lin_lens.linear_map for the exact map of the whole activation.")


# -- decomposition -----------------------------------------------------------------------------


@dataclass
class Decomposition:
    """``parts[c]`` is what component ``labels[c]`` contributes to the target; Σ parts = act.

    ``kinds[c]`` ∈ {'embed', 'pos_embed', 'head', 'mlp', 'bias'}. ``operators`` / ``constants``
    (with ``operators=True``): per component ``J_c [n_src, d_out, d_in]`` and ``[d_out]``.
    """

    hook: str
    position: int
    labels: list[str]
    kinds: list[str]
    parts: Float[Tensor, "comp d_out"]
    act: Float[Tensor, " d_out"]
    tokens: Int[Tensor, " n_src"] | None = None
    x: Float[Tensor, "n_src d_in"] | None = None
    operators: dict[str, Float[Tensor, "n_src d_out d_in"]] | None = None
    constants: dict[str, Float[Tensor, " d_out"]] | None = None
    meta: dict = field(default_factory=dict)

    def total(self) -> Float[Tensor, " d_out"]:
        return self.parts.sum(0)

    @property
    def relative_error(self) -> float:
        """‖act − Σ parts‖ / ‖act‖."""
        return relative_error(self.act, self.total())

    def __getitem__(self, label: str) -> Float[Tensor, " d_out"]:
        return self.parts[self.labels.index(label)]

    def along(self) -> Float[Tensor, " comp"]:
        """Signed share of each part along the target: ⟨part, act⟩ / ‖act‖² (sums to 1)."""
        return self.parts @ self.act / self.act.dot(self.act)

    def grouped(self) -> tuple[list[str], Float[Tensor, "group d_out"]]:
        """Heads + ``b_O`` → ``{L}_attn_out``, MLP + ``b_out`` → ``{L}_mlp_out`` (TL's
        ``decompose_resid`` labels); other components unchanged."""
        return grouped(self.labels, self.parts)

    def top(self, n: int = 10) -> list[tuple[str, float, float]]:
        """The ``n`` components with the largest ``|along|``: (label, norm, along)."""
        a = self.along()
        idx = a.abs().argsort(descending=True)[:n]
        return [(self.labels[i], float(self.parts[i].norm()), float(a[i])) for i in idx]

    def to_dict(self) -> dict:
        d = {"hook": self.hook, "position": self.position, "labels": self.labels,
             "kinds": self.kinds, "norm": self.parts.norm(dim=-1).tolist(),
             "along": self.along().tolist(), "relative_error": self.relative_error}
        if self.tokens is not None:
            d["tokens"] = self.tokens.tolist()
        return d

    def _repr_html_(self, n: int = 12) -> str:
        rows = [(lab, f"{nm:.3g}", f"{al:+.3f}") for lab, nm, al in self.top(n)]
        return table(rows, ["component", "‖part‖", "share along target"],
                     caption=f"{self.hook} at position {self.position}: {len(self.labels)} "
                             f"components, relative error {self.relative_error:.1e}")


def grouped(labels: list[str], parts: Tensor) -> tuple[list[str], Tensor]:
    """:meth:`Decomposition.grouped` for ``parts`` with the components on the first axis."""
    out: dict[str, Tensor] = {}
    for lab, part in zip(labels, parts, strict=True):
        m = re.match(r"^(?:L(\d+)H\d+|blocks\.(\d+)\.attn\.b_O)$", lab)
        n = re.match(r"^(?:L(\d+)\.mlp|blocks\.(\d+)\.mlp\.b_out)$", lab)
        if m:
            key = f"{m.group(1) or m.group(2)}_attn_out"
        elif n:
            key = f"{n.group(1) or n.group(2)}_mlp_out"
        else:
            key = lab
        out[key] = out[key] + part if key in out else part.clone()
    return list(out), torch.stack(list(out.values()))


def supported_stage(model: Any, hook: str) -> tuple[int, bool, bool]:
    """:func:`_stage` of ``hook``, after decompose's refusals (attention-only models, a final
    target without a final norm)."""
    if getattr(model.cfg, "attn_only", False):
        raise UnsupportedFeatureError("decompose: attention-only models (cfg.attn_only) are not "
                                      "supported; use lin_lens.head_operators / linear_map")
    if hook in FINAL and getattr(model, "ln_final", None) is None:
        raise UnsupportedFeatureError(f"decompose at {hook!r}: this model has no final norm "
                                      "(normalization_type=None); decompose a resid hook instead")
    return _stage(model, hook)


def _stage(model: Any, hook: str) -> tuple[int, bool, bool]:
    """(layers fully included, attention of the next layer included?, final norm applied?)."""
    if hook in FINAL:
        return model.cfg.n_layers, False, True
    m = _RESID.match(hook)
    if not m:
        raise InvalidArgumentError(
            f"decompose needs a residual-stream target (blocks.L.hook_resid_pre/"
                         f"mid/post, {', '.join(FINAL)}), got {hook!r}")
    L, where = int(m.group(1)), m.group(2)
    return (L + 1 if where == "post" else L), where == "mid", False


def _post_norm(block: Any, cache: Any, layer: int, which: str, at: tuple):
    """Frozen post-attention/-MLP norm (Gemma) as a linear function, identity otherwise; its
    scale read at ``cache[...][at]`` (``at = (0, t)``, or ``(rows, targets)`` for a batch)."""
    unscaled, scale = post_norm_parts(block, cache, layer, which)
    if unscaled is None or scale is None:
        return lambda v: v
    s = scale[at]
    return lambda v: unscaled(v) / s


def post_norm_parts(block: Any, cache: Any, layer: int, which: str):
    """The norms a sublayer's output passes before the residual add, as ``(unscaled, scale)``:
    ``norms(v) = unscaled(v) / scale[…]`` with the frozen ``scale`` ``[batch, pos, 1]`` of the
    cache and ``unscaled`` linear (centring for LayerNorm, the weight). ``which`` is ``"ln1"``
    (attention) or ``"ln2"`` (MLP): Gemma's ``ln1_post``/``ln2_post``, and for post-norm blocks
    (OLMo 2/3) ``ln1``/``ln2`` themselves. ``(None, None)`` where there are none (or
    Identities)."""
    mods = [(f"{which}_post", getattr(block, f"{which}_post", None))]
    arch = str(getattr(getattr(block, "cfg", None), "original_architecture", "") or "")
    if arch in POST_NORM_ARCHITECTURES:
        mods.append((which, getattr(block, which, None)))
    mods = [(n, m) for n, m in mods if m is not None and hasattr(m, "hook_scale")]
    if not mods:
        return None, None
    scale = None
    fns = []
    for name, ln in mods:
        s = cache[f"blocks.{layer}.{name}.hook_scale"]
        scale = s if scale is None else scale * s  # each scale divides; weights are linear
        w, _ = norm_params(ln)
        fns.append((_centers(block.cfg if hasattr(block, "cfg") else None, ln), w))

    def unscaled(v: Tensor) -> Tensor:
        for center, w in fns:
            v = v - v.mean(-1, keepdim=True) if center else v
            v = v * w.detach() if w is not None else v
        return v

    return unscaled, scale


def _centers(cfg: Any, ln: Any) -> bool:
    """Does this norm subtract the mean (LayerNorm) or not (RMSNorm)?"""
    name = type(ln).__name__
    if "RMS" in name:
        return False
    if "LayerNorm" in name or name.startswith("LN"):
        return True
    return str(getattr(cfg, "normalization_type", "") or "").startswith("LN")


def _final_projection(model: Any, cache: Any, logits: Tensor, hook: str, t: int,
                      out_index: Tensor | None):
    """(P [d_out, d_model], extra bias parts {name: [d_out]}) of the frozen final readout."""
    ln = model.ln_final
    d_model = model.cfg.d_model
    dtype = cache["ln_final.hook_scale"].dtype
    eye = torch.eye(d_model, dtype=dtype, device=logits.device)
    center = _centers(model.cfg, ln)
    C = eye - 1.0 / d_model if center else eye
    P = C / cache["ln_final.hook_scale"][0, t]  # hook_normalized = C x / scale
    extra: dict[str, Tensor] = {}
    if hook == "logits":
        w, b = norm_params(ln)
        b = b if b is not None and bool(b.ne(0).any()) else None
        if w is not None:
            P = w.detach()[:, None] * P
        readout = Readout.at(model, _unembed_input(model, cache, (0, t))[None])
        P = readout.matrix(P)
        extra_b = {} if b is None else {"ln_final.b": b @ readout.W}
        if readout.b is not None:
            extra_b["unembed.b_U"] = readout.b
        if readout.gate is not None:  # logits = g ⊙ z with the frozen soft-cap gate
            extra_b = {k: readout.gate[0] * v for k, v in extra_b.items()}
        extra.update(extra_b)
        if out_index is not None:
            P = P[out_index]
            extra = {k: v[out_index] for k, v in extra.items()}
    return P, extra


def _unembed_input(model: Any, cache: Any, at: tuple) -> Tensor:
    ln = model.ln_final
    v = cache["ln_final.hook_normalized"][at]
    w, b = norm_params(ln)
    v = v * w.detach() if w is not None else v
    return v + b.detach() if b is not None else v


@exact_matmul()
def decompose(model: Any, inputs: Inputs, hook: str = "logits", pos: int = -1, *,
              out_index: OutIndex = None, operators: bool = False, prepend_bos: bool | None = None,
              **kw: Any) -> Decomposition:
    """Exact decomposition of the activation at ``hook`` (one position) into component parts.

    Args:
        hook: a residual-stream hook (``blocks.L.hook_resid_pre/mid/post``), the final norm's
            output before its weight (``ln_final.hook_normalized`` = TL's ``apply_ln=True``
            space), or ``"logits"``.
        pos: the target position (an int).
        out_index: for ``"logits"``, keep only these token ids.
        operators: also compute each component's own linear operator from the token
            embeddings (two maps per layer: ``attn.hook_z`` and ``hook_mlp_out``).
        kw: passed to :func:`lin_lens.linear_map` when ``operators=True``.

    Components: ``embed``, ``pos_embed``, ``L{l}H{h}`` (``z_h W_O[h]``), ``blocks.{l}.attn.b_O``,
    ``L{l}.mlp`` (MLP output minus ``b_out``), ``blocks.{l}.mlp.b_out``, and for the logits
    ``ln_final.b``, ``unembed.b_U``. A post-attention/-MLP norm (Gemma) is applied to its parts
    with its frozen scale. Zero biases are left out.
    """
    if not is_int_position(pos):
        raise ArgumentTypeError(f"decompose takes one int position, got pos={pos!r}")
    n_full, with_attn, final = supported_stage(model, hook)
    tokens = to_tokens(model, inputs, prepend_bos)
    t = positions(pos, tokens.shape[1])[0]
    idx = None if out_index is None else torch.as_tensor(out_index, device=tokens.device)
    if idx is not None and hook != "logits":
        raise InvalidArgumentError(f"out_index is for hook='logits', not {hook!r}")

    # the cached values of the detached forward: identical on a HookedTransformer, and on a
    # Bridge the norms re-linearised in the model's dtype (HF's RMSNorm rounds to float32)
    with torch.no_grad(), detached(model):
        logits, cache = model.run_with_cache(tokens)
    require_fired(cache, hook)
    layers = list(range(n_full)) + ([n_full] if with_attn else [])
    parts = writes(model, cache, (0, t), layers, n_full)
    labels = [p[0] for p in parts]
    kinds = [p[1] for p in parts]
    resid = torch.stack([p[2] for p in parts])
    if final:
        P, extra = _final_projection(model, cache, logits, hook, t, idx)
        stack = resid @ P.T
        if extra:
            labels += list(extra)
            kinds += ["bias"] * len(extra)
            stack = torch.cat([stack, torch.stack(list(extra.values()))])
        act = logits[0, t] if hook == "logits" else cache[hook][0, t]
        if idx is not None:
            act = act[idx]
    else:
        P, stack, act = None, resid, cache[hook][0, t]
    dec = Decomposition(hook, t, labels, kinds, stack, act.detach(), tokens[0].cpu(),
                        cache["hook_embed"][0].detach())
    # the parts are assembled from the architecture's known structure: check that they really
    # sum to the target, so an unanticipated block layout is refused rather than answered
    bound = default_tolerance(dec.act.dtype)
    if not dec.relative_error <= bound:
        raise NotExactError(dec, bound, NOT_SUMMING)
    if operators:
        _add_operators(model, tokens, dec, t, layers, n_full, P, **kw)
    return dec


def require_fired(cache: Any, *hooks: str) -> None:
    """Refuse a target hook that is a model's hook but did not fire (``hook_resid_mid`` of a
    parallel-attention block, GPT-J / Pythia)."""
    missing = [h for h in hooks if h != "logits" and h not in cache.cache_dict]
    if missing:
        raise InvalidArgumentError(f"decompose: {missing[0]!r} did not fire in the forward pass "
                                   "of this model (parallel attention has no resid_mid)")


def writes(model: Any, cache: Any, at: tuple, layers: list[int],
           n_full: int) -> list[tuple[str, str, Tensor]]:
    """(label, kind, what it wrote into the residual stream ``[..., d_model]``) per component,
    read from a detached cache at ``cache[...][at]``: ``at = (0, t)`` for one prompt, or
    ``(rows, targets)`` for one target per row of a batch (a bias's write may then broadcast)."""
    parts: list[tuple[str, str, Tensor]] = [("embed", "embed", cache["hook_embed"][at])]
    if "hook_pos_embed" in cache.cache_dict:
        parts.append(("pos_embed", "pos_embed", cache["hook_pos_embed"][at]))
    for layer in layers:
        block = model.blocks[layer]
        post_a = _post_norm(block, cache, layer, "ln1", at)
        z = cache[f"blocks.{layer}.attn.hook_z"][at]
        W_O_l = W_O(model, layer)
        for h in range(W_O_l.shape[0]):
            parts.append((f"L{layer}H{h}", "head", post_a(z[..., h, :] @ W_O_l[h])))
        b_O = nonzero_bias(block.attn, "b_O")
        if b_O is not None:
            parts.append((f"blocks.{layer}.attn.b_O", "bias", post_a(b_O)))
        if layer == n_full:  # resid_mid: attention only
            continue
        post_m = _post_norm(block, cache, layer, "ln2", at)
        b_out = nonzero_bias(block.mlp, "b_out")
        mlp = cache[f"blocks.{layer}.hook_mlp_out"][at]
        parts.append((f"L{layer}.mlp", "mlp", mlp - (post_m(b_out) if b_out is not None else 0)))
        if b_out is not None:
            parts.append((f"blocks.{layer}.mlp.b_out", "bias", post_m(b_out)))
    return parts


def _add_operators(model: Any, tokens: Tensor, dec: Decomposition, t: int, layers: list[int],
                   n_full: int, P: Tensor | None, **kw: Any) -> None:
    """Fill ``dec.operators`` / ``dec.constants``: each part's own map from ``hook_embed``."""
    assert dec.x is not None  # set by decompose() before it asks for operators
    n_src, d_model = dec.x.shape
    proj = (lambda J: J) if P is None else (lambda J: torch.einsum("om,...mi->...oi", P, J))
    proj_v = (lambda v: v) if P is None else (lambda v: P @ v)
    ops: dict[str, Tensor] = {}
    J_embed = torch.zeros(n_src, d_model, d_model, dtype=dec.x.dtype, device=dec.x.device)
    J_embed[t] = torch.eye(d_model, dtype=dec.x.dtype, device=dec.x.device)
    ops["embed"] = proj(J_embed)
    with torch.no_grad(), detached(model):
        _, cache = model.run_with_cache(tokens)
    consts: dict[str, Tensor] = {"embed": torch.zeros_like(dec.parts[0])}
    for layer in layers:
        block = model.blocks[layer]
        post_a = _post_norm(block, cache, layer, "ln1", (0, t))
        for h, hm in enumerate(head_operators(model, tokens, layer, t, **kw)):
            # a post norm acts on the output axis: move it last, apply, move back
            ops[f"L{layer}H{h}"] = proj(post_a(hm.J.transpose(-1, -2)).transpose(-1, -2))
            consts[f"L{layer}H{h}"] = proj_v(post_a(hm.constant))
        if layer == n_full:
            continue
        mlp = linear_map(model, tokens, f"blocks.{layer}.hook_mlp_out", t, **kw)
        ops[f"L{layer}.mlp"] = proj(mlp.J)
        # the map's own constants (computed independently of act − J x), minus b_out's own part
        own = _param_name(model, getattr(model.blocks[layer].mlp, "b_out", None))
        c = {k: v for k, v in mlp.constant_by_origin.items() if k != own}
        consts[f"L{layer}.mlp"] = proj_v(sum(c.values(), torch.zeros_like(mlp.act)))
    for lab, part in zip(dec.labels, dec.parts, strict=True):
        if lab not in ops:  # positions and biases: constant parts
            ops[lab] = torch.zeros(n_src, part.shape[-1], d_model, dtype=part.dtype,
                                   device=part.device)
            consts[lab] = part.clone()
    dec.operators, dec.constants = ops, consts


def _param_name(model: Any, param: Any) -> str | None:
    """The ``named_parameters`` name of ``param`` (the origin name a map uses for it: TL's
    ``blocks.L.mlp.b_out`` on a HookedTransformer, Hugging Face's on a Bridge)."""
    if not isinstance(param, Tensor):
        return None
    return next((n for n, p in model.named_parameters()
                 if p.data_ptr() == param.data_ptr() and p.shape == param.shape), None)
