"""QK attribution of a graph's heads: why each kept head attends where it does, by node.

For every kept head node (layer, head, query position) the scores at its most attended keys are
split exactly over the graph's node space (:class:`lin_lens.qk.nodes.NodeSides`, one per layer
for all query positions), and the result is stored in Neuronpedia's graph-server form
(``qk_tracing_results``: ``pair_wise_contributors`` ``[[q_id, k_id, attribution], …]``,
``top_q_marginal_contributors`` and ``top_k_marginal_contributors`` ``[[id, attribution], …]``)
with node ids as the graph's JSON writes them; contributors that are not kept nodes are
described in ``graph.qk_only_nodes``. lin_lens adds a ``lin_lens`` entry per head: the key, its
score and pattern weight, the relative error, and the same lists for further keys.
"""

from __future__ import annotations

from typing import Any

from lin_lens.graph.export import node_id
from lin_lens.progress import progress_bar
from lin_lens.qk.form import form_hooks, score_forms
from lin_lens.qk.node_parts import node_cache
from lin_lens.qk.nodes import NodeSides
from lin_lens.qk.result import QKAttribution

FEATURE_TYPE = {"embed": "embedding", "pos_embed": "positional embedding",
                "head": "attention head", "neuron": "mlp neuron", "attn": "attention",
                "mlp": "mlp", "bias": "bias"}


def attach_qk(model: Any, graph: Any, *, keys: int = 1, top: int = 10,
              progress: bool | None = None) -> None:
    """Fill ``graph.qk`` (node index → ``qk_tracing_results``) and ``graph.qk_only_nodes`` for
    every kept head node, at its ``keys`` most attended key positions, ``top`` contributors per
    list."""
    heads = [i for i, k in enumerate(graph.kinds) if k == "head"]
    graph.qk, graph.qk_only_nodes = {}, {}
    if not heads:
        return
    tokens = graph.tokens[None].to(next(model.parameters()).device)
    n = int(graph.target["pos"]) + 1
    tokens = tokens[:, :n]
    layers = sorted({int(graph.layer[i]) for i in heads})
    # one detached forward pass for every layer's score forms and node parts
    cache = node_cache(model, tokens, layers[-1], extra=form_hooks(model, layers))
    forms = score_forms(model, tokens, layers, cache=cache)
    ids = _IdMap(model, graph)
    bar = progress_bar(len(heads), "QK attribution of heads", progress, unit="head")
    try:
        for L in layers:
            mine = [i for i in heads if int(graph.layer[i]) == L]
            sides = NodeSides(model, tokens, forms[L], n, _node_kinds(graph), cache=cache,
                              heads=[int(graph.index[i]) for i in mine])
            reqs = []
            for i in mine:
                h, t = int(graph.index[i]), int(graph.pos[i])
                seen = forms[L].mask[h, t].nonzero().flatten()
                order = forms[L].pattern[h, t, seen].argsort(descending=True)[:keys]
                reqs.append((h, t, sorted(seen[order].tolist())))
            for i, att in zip(mine, sides.attributions(reqs, top, graph.str_tokens, tokens),
                              strict=True):
                graph.qk[i] = _neuronpedia(att, ids, top)
                bar.update()
    finally:
        bar.close()
    graph.qk_only_nodes = ids.extra


def _node_kinds(graph: Any) -> tuple[str, ...]:
    kinds = set(graph.kinds)
    out = []
    if "head" in kinds or "attn" not in kinds:
        out.append("heads")
    if "neuron" in kinds or "mlp" not in kinds:
        out.append("neurons")
    return tuple(out)


class _IdMap:
    """JSON ids of QK parts: the graph's own ids, and ids with descriptions for parts that are
    not kept nodes (``extra``)."""

    def __init__(self, model: Any, graph: Any):
        self.graph, self.model = graph, model
        self.kept = {}
        from lin_lens.graph.export import json_node_ids

        for i, nid in enumerate(json_node_ids(graph)):
            self.kept[nid] = i
        self.bias_ordinal = {self._param_key(n): b
                             for b, n in enumerate(graph.meta.get("bias_params", []))}
        self.extra: dict[str, dict] = {}

    def _param_key(self, name: str) -> int | str:
        from lin_lens.qk.intervene import _param

        try:
            return _param(self.model, name).data_ptr()
        except Exception:  # noqa: BLE001 - a name without a parameter: keep the name
            return name

    def __call__(self, att: QKAttribution, side: Any, i: int) -> str:
        kind, layer, pos, index, name = (side.kind[i], side.layer[i], side.pos[i],
                                         side.index[i], side.name[i])
        label = side.label(i, att.str_tokens)
        if kind == "bias":
            b = self.bias_ordinal.get(self._param_key(name))
            nid = node_id(self.graph, "bias", layer, -1, b) if b is not None else f"B_{name}"
        elif kind == "embed":
            nid = node_id(self.graph, "embed", -1, pos, int(att.tokens[pos]))
        else:
            nid = node_id(self.graph, kind, layer, pos, index)
        if nid not in self.kept and nid not in self.extra:
            self.extra[nid] = {"node_id": nid, "label": label, "layer": str(layer),
                               "ctx_idx": pos if pos >= 0 else int(self.graph.target["pos"]),
                               "feature_type": FEATURE_TYPE.get(kind, kind)}
        return nid


def _neuronpedia(att: QKAttribution, ids: _IdMap, top: int) -> dict:
    lists = [_lists(att, ids, top, j) for j in range(len(att.keys))]
    best = int(att.pattern.argmax())
    out = dict(lists[best])
    out["lin_lens"] = {
        "layer": att.layer, "head": att.head, "query": att.query,
        "relative_error": att.relative_error,
        "keys": [{"key": s, "score": float(att.scores[j]), "pattern": float(att.pattern[j]),
                  **({} if j == best else lists[j])} for j, s in enumerate(att.keys)]}
    out["lin_lens"]["key"] = att.keys[best]
    return out


def _lists(att: QKAttribution, ids: _IdMap, top: int, j: int) -> dict:
    pairs = att.pairs(att.keys[j])  # [q parts, k parts]
    kp = att.k_parts[j]
    mag = pairs.abs()
    qp = att.q_parts
    mag[[a for a in range(len(qp)) if qp.kind[a] == "rest"], :] = -1  # not nodes
    mag[:, [b for b in range(len(kp)) if kp.kind[b] == "rest"]] = -1
    flat = pairs.reshape(-1)
    pw = []
    for i in mag.reshape(-1).topk(min(top, mag.numel())).indices.tolist():
        a, b = divmod(i, pairs.shape[1])
        if qp.kind[a] != "rest" and kp.kind[b] != "rest":
            pw.append([ids(att, qp, a), ids(att, kp, b), float(flat[i])])
    qparts = att.q_marginal_all[j] if att.q_marginal_all is not None else qp
    qm = qparts.vectors if att.q_marginal_all is not None else att.q_marginal[j]
    qtop = qm.abs().topk(min(top, len(qm))).indices.tolist()
    kparts = att.k_marginal_all[j] if att.k_marginal_all is not None else kp
    km = kparts.vectors if att.k_marginal_all is not None else att.k_marginal[j]
    ktop = km.abs().topk(min(top, len(km))).indices.tolist()
    return {"pair_wise_contributors": pw,
            "top_q_marginal_contributors": [[ids(att, qparts, a), float(qm[a])]
                                            for a in qtop if qparts.kind[a] != "rest"],
            "top_k_marginal_contributors": [[ids(att, kparts, b), float(km[b])]
                                            for b in ktop if kparts.kind[b] != "rest"]}


