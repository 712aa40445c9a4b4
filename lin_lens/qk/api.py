"""``qk_attribution`` / ``qk_attributions``: why heads attend where they do, exactly."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lin_lens._precision import exact_matmul
from lin_lens._tl import model_dtype
from lin_lens._types import Inputs
from lin_lens.decoding import token_strings
from lin_lens.errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    InvalidPositionError,
    NotExactError,
)
from lin_lens.maps import default_tolerance, to_tokens
from lin_lens.maps.request import as_index, is_int_position, positions
from lin_lens.qk.form import ScoreForm, form_hooks, score_forms
from lin_lens.qk.node_parts import node_cache
from lin_lens.qk.nodes import NodeSides, node_sides
from lin_lens.qk.result import Parts, QKAttribution, QKResults
from lin_lens.qk.sides import Sides, token_sides

BY = ("tokens", "nodes")


@exact_matmul()
def qk_attribution(model: Any, prompt: Inputs, layer: int, head: int, *,
                   query: int = -1, keys: int | Sequence[int] | None = None,
                   by: str = "tokens", nodes: Sequence[str] = ("heads", "neurons"),
                   top: int = 10, source: str = "hook_embed", check: bool = True,
                   tol: float | None = None, progress: bool | None = None,
                   prepend_bos: bool | None = None) -> QKAttribution:
    """Why head ``head`` of layer ``layer`` attends from position ``query`` to each key: its
    pre-softmax scores split exactly into pairs of query-side and key-side parts.

    Under detached mode every norm scale is frozen and rotary is linear given the positions, so
    a head's query and keys are exactly affine in the input and a score is exactly bilinear:
    ``score[t, s] = Σ_{a,b} gate · q_a(t) · k_b(s) + bias`` (see :class:`QKAttribution`). The
    pattern itself is what detached mode takes as given; this explains it.

    Args:
        model: ``HookedTransformer`` or ``TransformerBridge``.
        prompt: text or token ids.
        layer, head: the head (a query head; its key-value head under GQA is found).
        query: the query position (one int, default the last).
        keys: key positions to explain (an int or a list; default every key the query sees).
        by: ``"tokens"``: parts are the input tokens through all paths and each constant origin
            (biases, positional embeddings); ``"nodes"``: the attribution graph's nodes (token
            embeddings, heads, neurons or whole MLPs, biases) through their direct path.
        nodes: with ``by="nodes"``, ``("heads", "neurons")`` or leave one out for whole
            attention layers / MLPs (as :func:`lin_lens.attribution_graph`).
        top: with ``by="nodes"``, key-side nodes kept per key for the pairs (the rest are one
            exact part; every key-side node's marginal is kept in ``k_marginal_all``).
        source: the hook whose activation is the input (``by="tokens"``).
        check, tol: refuse (:class:`lin_lens.NotExactError`) a decomposition that does not
            reproduce the model's scores, query and keys to ``tol`` (default by dtype).
        progress: progress bars; prepend_bos: passed to ``model.to_tokens`` for text.

    Soft-capped scores (Gemma 2) are decomposed with the cap's gate ``tanh(u/c)/(u/c)`` frozen at
    this input, as detached mode freezes every other gate; ALiBi's position bias is its own term.
    """
    res = qk_attributions(model, prompt, [layer], [head], query=query, keys=keys, by=by,
                          nodes=nodes, top=top, source=source, check=check, tol=tol,
                          progress=progress, prepend_bos=prepend_bos)
    return next(iter(res))


@exact_matmul()
def qk_attributions(model: Any, prompt: Inputs,
                    layers: Sequence[int] | None = None, heads: Sequence[int] | None = None, *,
                    query: int = -1, keys: int | Sequence[int] | None = None,
                    by: str = "tokens", nodes: Sequence[str] = ("heads", "neurons"),
                    top: int = 10, source: str = "hook_embed", check: bool = True,
                    tol: float | None = None, progress: bool | None = None,
                    prepend_bos: bool | None = None) -> QKResults:
    """:func:`qk_attribution` for every head in ``heads`` (default all) of every layer in
    ``layers`` (default all), from one computation: by tokens, one set of forward columns
    gives every layer's query and key parts at once."""
    t0 = time.perf_counter()
    if by not in BY:
        raise InvalidArgumentError(f"by must be one of {BY}, got {by!r}")
    tokens = to_tokens(model, prompt, prepend_bos)
    n = tokens.shape[1]
    if not is_int_position(query):
        raise ArgumentTypeError(f"query={query!r}: one int position")
    t = positions(query, n)[0]
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    layers = _indices(layers, n_layers, "layer")
    heads = _indices(heads, n_heads, "head")
    cache = None
    if by == "nodes" and t + 1 == n:  # one detached forward pass for the forms and the nodes
        cache = node_cache(model, tokens, max(layers), extra=form_hooks(model, layers))
    forms = score_forms(model, tokens, layers, cache=cache)
    strs = token_strings(model, tokens[0], raw=True)
    sides: dict[int, Sides] | dict[int, NodeSides]
    if by == "tokens":
        sides = token_sides(model, tokens, forms, t, strs, source=source, progress=progress)
    else:
        sides = {L: node_sides(model, tokens, forms[L], t + 1, nodes, heads, cache)
                 for L in layers}
    out = QKResults()
    bound = tol if tol is not None else default_tolerance(model_dtype(model))
    for L in layers:
        reqs = [(h, t, _keys(forms[L], h, t, keys, n)) for h in heads]
        side = sides[L]
        if isinstance(side, NodeSides):
            atts = side.attributions(reqs, top, strs, tokens)
        else:
            atts = [_attribution(forms[L], side, L, h, t, ks, by, strs, tokens)
                    for h, _, ks in reqs]
        for (h, _, _), att in zip(reqs, atts, strict=True):
            if check and not att.relative_error <= bound:
                raise NotExactError(att, bound)
            out.by_head[L, h] = att
    out.seconds = time.perf_counter() - t0
    return out


def _indices(values: Any, n: int, what: str) -> list[int]:
    if values is None:
        return list(range(n))
    values = [values] if is_int_position(values) else list(values)
    out = []
    for v in values:
        v = as_index(v, what)
        if not -n <= v < n:
            raise InvalidPositionError(f"{what} {v} out of range (the model has {n})")
        out.append(v % n)
    if not out:
        raise InvalidArgumentError(f"no {what} given")
    return list(dict.fromkeys(out))


def _keys(form: ScoreForm, head: int, t: int, keys: Any, n: int) -> list[int]:
    seen = form.mask[head, t].nonzero().flatten().tolist()
    if keys is None:
        return seen
    ks = positions(keys, n)
    bad = [s for s in ks if s not in seen]
    if bad:
        raise InvalidPositionError(
            f"key position(s) {bad} are masked for query {t} (causal or sliding-window "
            f"attention): layer {form.layer} head {head} sees keys {seen[0]}…{seen[-1]}")
    return ks


def _attribution(form: ScoreForm, sides: Sides, L: int, h: int, t: int, keys: list[int],
                 by: str, strs: list[str], tokens: Tensor) -> QKAttribution:
    kv = form.kv_head(h)
    q_parts = _parts(sides.q_labels, sides.q_origin, sides.q[:, h], sides.q_desc)
    k_parts = [_parts(sides.k_labels, sides.k_origin, sides.k[:, s, kv], sides.k_desc)
               for s in keys]
    return QKAttribution(
        layer=L, head=h, kv_head=kv, query=t, keys=keys, by=by, q_parts=q_parts,
        k_parts=k_parts, gate=form.gate(h, t, keys), bias=form.position_bias(h, t, keys),
        scores=form.scores[h, t, keys], pattern=form.pattern[h, t, keys], q=form.q[t, h],
        k=form.k[keys, kv], str_tokens=strs, tokens=tokens[0].detach().cpu(),
        meta={"form": form.how, "q_hook": form.q_hook, "k_hook": form.k_hook})


def _parts(labels: list[str], kinds: list[str], vectors: Tensor, desc: Any) -> Parts:
    layer, pos, index = desc
    return Parts(list(kinds), list(layer), list(pos), list(index), list(labels),
                 vectors.clone() if isinstance(vectors, torch.Tensor) else vectors)
