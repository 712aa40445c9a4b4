"""What each node writes: its output direction at its position, decoded to tokens.

A head's output at query position p is ``z[p, h] W_O[h]``, an MLP neuron's ``post[p, n]
W_out[n]`` (its activation, sign included, times its output row), a whole attention layer's the
sum over its heads, a whole MLP's its output without ``b_out``; a post-attention / post-MLP norm
(Gemma) is applied with its frozen scale at p. The vector is read as the logit lens reads the
residual stream at p: through the final norm with its frozen scale at p and the unembedding,
``g ⊙ W_Uᵀ (w ⊙ C o) / scale[p]`` (:func:`lin_lens.decoding.output_logit_directions`, times the
final soft cap's frozen gate ``g`` at p where the model has one), so a score is exactly the
change of the logits at p that the node's write makes in the detached network. One detached
forward pass of the prompt (``run_with_cache``, no hooks left behind); the model is not
changed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lin_lens._precision import exact_matmul
from lin_lens._tl import nonzero_bias
from lin_lens.analyses.decompose import post_norm_parts
from lin_lens.decoding import norm_params, output_logit_directions, top_tokens
from lin_lens.errors import InvalidArgumentError
from lin_lens.freeze import detached
from lin_lens.maps.readout import Readout
from lin_lens.progress import progress_bar

WRITERS = ("head", "attn", "neuron", "mlp")


def _post_norm(model: Any, cache: Any, layer: int, which: str, pos: int):
    """The frozen norms after a sublayer at ``pos`` as a linear map (identity if none): the
    decomposition's own (:func:`lin_lens.analyses.decompose.post_norm_parts`)."""
    unscaled, scale = post_norm_parts(model.blocks[layer], cache, layer, which)
    if unscaled is None or scale is None:
        return lambda v: v
    s = scale[0, pos]
    return lambda v: unscaled(v) / s


def node_vectors(model: Any, graph: Any) -> dict[int, Tensor]:
    """``{node: its write into the residual stream [d_model]}`` for the head, attention,
    neuron and MLP nodes of ``graph`` (see the module docstring)."""
    return _writes(model, graph)[0]


@exact_matmul()
def _writes(model: Any, graph: Any) -> tuple[dict[int, Tensor], Any]:
    """(the writes, the frozen final readout: ``(scale [n], soft-cap gate [n, V] or None)``)."""
    tokens = graph.tokens.reshape(1, -1).to(model.W_U.device)
    kinds = graph.kinds
    nodes = [i for i, k in enumerate(kinds) if k in WRITERS]
    if not nodes:
        return {}, None
    layers = {int(graph.layer[i]) for i in nodes}
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    wanted = {"ln_final.hook_scale", "ln_final.hook_normalized", last} | {
        f"blocks.{la}.{h}" for la in layers for h in (
            "attn.hook_z", "mlp.hook_post", "hook_mlp_out", "ln1_post.hook_scale",
            "ln2_post.hook_scale", "ln1.hook_scale", "ln2.hook_scale")}
    with torch.no_grad(), detached(model):
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted)
    out: dict[int, Tensor] = {}
    for i in nodes:
        kind, layer, p, idx = kinds[i], int(graph.layer[i]), int(graph.pos[i]), int(graph.index[i])
        if kind in ("head", "attn"):
            z = cache[f"blocks.{layer}.attn.hook_z"][0, p]  # [n_heads, d_head]
            W_O = model.blocks[layer].attn.W_O.detach().to(z)  # [n_heads, d_head, d_model]
            v = z[idx] @ W_O[idx] if kind == "head" else torch.einsum("hd,hdm->m", z, W_O)
            v = _post_norm(model, cache, layer, "ln1", p)(v)
        elif kind == "neuron":
            post = cache[f"blocks.{layer}.mlp.hook_post"][0, p, idx]
            v = _post_norm(model, cache, layer, "ln2", p)(
                post * model.blocks[layer].mlp.W_out.detach()[idx].to(post))
        else:  # a whole MLP: its output without b_out (a bias node of its own)
            v = cache[f"blocks.{layer}.hook_mlp_out"][0, p]
            b = nonzero_bias(model.blocks[layer].mlp, "b_out")
            if b is not None:
                v = v - _post_norm(model, cache, layer, "ln2", p)(b.detach().to(v))
        out[i] = v.detach()
    if "ln_final.hook_scale" not in cache.cache_dict:  # no final norm: the stream is read as is
        h = cache[last][0]
        return out, (h.new_ones(h.shape[0]), Readout.at(model, h).gate)
    w, b = norm_params(model.ln_final)
    h = cache["ln_final.hook_normalized"][0]  # the unembedding's input: the soft cap's gate
    h = h * w.to(h) if w is not None else h
    h = h + b.to(h) if b is not None else h
    return out, (cache["ln_final.hook_scale"][0].reshape(-1), Readout.at(model, h).gate)


def _check(model: Any, graph: Any) -> None:
    if graph.meta.get("d_vocab") not in (None, model.cfg.d_vocab) or \
            graph.meta.get("n_layers") not in (None, model.cfg.n_layers):
        raise InvalidArgumentError("node_writes: this graph was not built with this model "
                                   f"({graph.meta.get('model')!r})")


def _score_chunks(model: Any, graph: Any, size: int = 256):
    """``(nodes, scores [d_vocab, len(nodes)])`` for the writing nodes, ``size`` at a time."""
    vecs, (scale, gate) = _writes(model, graph)
    nodes = list(vecs)
    for start in range(0, len(nodes), size):
        chunk = nodes[start:start + size]
        cols = torch.stack([vecs[i] / scale[int(graph.pos[i])] for i in chunk], 1)
        scores = output_logit_directions(model, cols)
        if gate is not None:
            scores = scores * gate[[int(graph.pos[i]) for i in chunk]].T.to(scores)
        yield chunk, scores


@exact_matmul()
def write_scores(model: Any, graph: Any) -> tuple[list[int], Tensor]:
    """Every writing node's full vocabulary scores: ``(nodes, [d_vocab, len(nodes)])`` (memory
    ``d_vocab`` × nodes: for a few nodes or a small vocabulary; :func:`node_writes` keeps the
    top ones)."""
    _check(model, graph)
    parts = list(_score_chunks(model, graph))
    if not parts:
        return [], torch.zeros(model.cfg.d_vocab, 0)
    return [i for c, _ in parts for i in c], torch.cat([s for _, s in parts], 1)


@exact_matmul()
def node_writes(model: Any, graph: Any, k: int = 10, *,
                progress: bool | None = None) -> dict[int, dict]:
    """For every head / attention / neuron / MLP node of ``graph``: the ``k`` tokens whose logits
    its write raises most and the ``k`` it lowers most (the module docstring's reading),
    ``{node: {"tokens", "ids", "scores", "neg_tokens", "neg_ids", "neg_scores"}}`` (empty lists
    for a node whose write is exactly zero, e.g. a neuron whose activation is 0).

    Stored by :func:`lin_lens.attribution_graph` as ``graph.top_tokens``; shown in the
    explorer's node panel ("what it writes") and exported as the JSON's ``top_tokens``."""
    if k < 1:
        raise InvalidArgumentError(f"k={k!r}: give at least 1 token per node")
    _check(model, graph)
    n = sum(1 for kind in graph.kinds if kind in WRITERS)
    out: dict[int, dict] = {}
    bar = progress_bar(n, "node writes", progress, unit="node")
    try:
        for chunk, scores in _score_chunks(model, graph):  # [d_vocab, 256] at a time
            for j, i in enumerate(chunk):
                if bool(scores[:, j].any()):
                    out[i] = top_tokens(model, scores[:, j], k).to_dict()
                else:  # an exactly zero write (a neuron at 0): no token to name
                    out[i] = {f: [] for f in ("tokens", "ids", "scores", "neg_tokens",
                                              "neg_ids", "neg_scores")}
            bar.update(len(chunk))
    finally:
        bar.close()
    return out
