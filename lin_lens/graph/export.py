"""circuit-tracer's graph file (schema version 1), so its local frontend shows lin_lens graphs.

The format (re-declared from circuit-tracer's ``frontend/graph_models.py``; lin_lens does not
depend on the package): ``{"metadata": {slug, scan, transcoder_list, prompt_tokens, prompt,
node_threshold, schema_version}, "qParams": {pinnedIds, supernodes, linkType, clickedId, sg_pos},
"nodes": [{node_id, feature, layer, ctx_idx, feature_type, token_prob, is_target_logit,
run_idx, reverse_ctx_idx, jsNodeId, clerp, influence, activation}], "links": [{source, target,
weight}]}``. Ids follow theirs: ``E_{token}_{pos}`` for embeddings, ``{n_layers+1}_{token}_{pos}``
for logits, ``{layer}_{feature}_{pos}`` for the rest, where lin_lens's in-layer feature index is
the neuron (0 … d_mlp-1), then ``d_mlp`` for a whole MLP, ``d_mlp+1`` for a whole attention layer,
``d_mlp+2+h`` for head h and ``d_mlp+2+n_heads+b`` for bias b. Heads and neurons get their own
``feature_type`` ("attention head", "mlp neuron"; "attention", "mlp", "bias", "positional
embedding"): not transcoder features, so the frontend shows their ``clerp`` label instead of
looking up feature dashboards. ``influence`` is circuit-tracer's cumulative influence share.
Extra per-node fields (their frontend ignores them; :func:`lin_lens.graph.load_json` reads
them back): ``label`` (lin_lens's name), ``total_effect``, ``top_tokens`` / ``bottom_tokens``
(what the node writes, :func:`lin_lens.graph.node_writes`) and ``qk_tracing_results``
(Neuronpedia's QK field, from ``graph.qk``; contributors that are not kept nodes in a
top-level ``qk_only_nodes``). ``qParams.pinnedIds``: ``graph.pinned``, else the nodes of the
strongest paths.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _slot(graph: Any, kind: str, index: int) -> int:
    d_mlp, n_heads = graph.meta["d_mlp"], graph.meta["n_heads"]
    return {"neuron": index, "mlp": d_mlp, "attn": d_mlp + 1, "head": d_mlp + 2 + index,
            "bias": d_mlp + 2 + n_heads + index}[kind]


def node_id(graph: Any, kind: str, layer: int, pos: int, index: int) -> str:
    """circuit-tracer's id of a node of this graph's kinds (``index``: the token id of an
    embedding or logit, the head, neuron or bias ordinal; a bias is drawn at the target)."""
    if kind == "embed":
        return f"E_{index}_{pos}"
    if kind == "pos_embed":
        return f"E_{-1 - pos}_{pos}"
    if kind == "target":
        return f"{graph.meta['n_layers'] + 1}_{index}_{pos}"
    ctx = pos if pos >= 0 else int(graph.target["pos"])
    return f"{layer}_{_slot(graph, kind, index)}_{ctx}"


def json_node_ids(graph: Any) -> list[str]:
    """circuit-tracer node ids of the kept nodes, in graph order."""
    return [node_id(graph, kind, int(graph.layer[i]), int(graph.pos[i]), int(graph.index[i]))
            for i, kind in enumerate(graph.kinds)]


def _ctx(graph: Any, i: int) -> int:
    """A bias acts at every position; it is drawn at the target's."""
    p = int(graph.pos[i])
    return p if p >= 0 else int(graph.target["pos"])


_CLERPS = {"head": "head L{layer}.H{index}", "neuron": "neuron L{layer}.N{index}",
           "attn": "attention L{layer}", "mlp": "MLP L{layer}",
           "bias": "bias {label} (every position)", "pos_embed": "Pos: position {pos}"}


def _clerp(graph: Any, i: int, kind: str) -> str:
    fmt = _CLERPS.get(kind)
    return "" if fmt is None else fmt.format(layer=int(graph.layer[i]), index=int(graph.index[i]),
                                             pos=int(graph.pos[i]), label=graph.labels[i])


def to_json(graph: Any, slug: str | None = None, scan: str | None = None,
            pinned: int = 3) -> dict:
    """The graph as circuit-tracer's JSON dict (kept nodes, kept edges)."""
    ids = json_node_ids(graph)
    kinds = graph.kinds
    n_layers = graph.meta["n_layers"]
    t = graph.target
    targets = graph.targets
    nodes = []
    for i, kind in enumerate(kinds):
        layer, pos, index = int(graph.layer[i]), int(graph.pos[i]), int(graph.index[i])
        node: dict[str, Any] = {
            "node_id": ids[i], "layer": str(layer), "ctx_idx": _ctx(graph, i),
            "feature_type": {"embed": "embedding", "pos_embed": "positional embedding",
                             "head": "attention head", "neuron": "mlp neuron",
                             "attn": "attention", "mlp": "mlp", "bias": "bias",
                             "target": "logit"}[kind],
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
            "clerp": _clerp(graph, i, kind),
            "influence": float(graph.cumulative[i]),
            "activation": float(graph.value[i]),
            "label": graph.labels[i], "total_effect": float(graph.total_effect[i]),
        }
        node.update(_extras(graph, i))
        if kind in ("embed", "pos_embed"):
            node.update(feature=pos if kind == "embed" else -1 - pos, layer="E",
                        jsNodeId=f"E_{index if kind == 'embed' else -1 - pos}-{pos}",
                        activation=None)
        elif kind == "target":
            k = targets.index(i)
            p = 1.0 if t["probs"] is None else float(t["probs"][k])
            node.update(feature=index, layer=str(n_layers + 1), jsNodeId=f"L_{index}-{pos}",
                        token_prob=p, is_target_logit=k == 0,
                        clerp=f"Output {json.dumps(t['labels'][k], ensure_ascii=False)} "
                              f"(p={p:.3f})")
        else:
            slot = _slot(graph, kind, index)
            node.update(feature=_cantor(layer, slot), jsNodeId=f"{layer}_{slot}-{_ctx(graph, i)}")
        nodes.append(node)
    dst, src = graph.edge_mask.nonzero(as_tuple=True)
    w = graph.adjacency[dst, src].tolist()
    links = [{"source": ids[s], "target": ids[d], "weight": x}
             for s, d, x in zip(src.tolist(), dst.tolist(), w, strict=True)]
    label_to_id = dict(zip(graph.labels, ids, strict=True))
    pins: list[str] = []
    chosen = getattr(graph, "pinned", None)
    paths = [(0.0, chosen)] if chosen is not None else graph.top_paths(pinned) if pinned else []
    for _, path in paths:
        pins += [label_to_id[lab] for lab in path if label_to_id[lab] not in pins]
    model = str(graph.meta.get("model", "model"))
    return {
        "metadata": {
            "slug": slug or _slug(graph), "scan": scan or f"lin_lens-{model}",
            "transcoder_list": [], "prompt_tokens": list(graph.str_tokens),
            "prompt": graph.prompt, "node_threshold": graph.meta.get("node_threshold"),
            "schema_version": SCHEMA_VERSION,
            "lin_lens": {"exact": True, "relative_error": graph.relative_error,
                         "target": t["labels"], "target_hook": t["hook"],
                         "edge_threshold": graph.meta.get("edge_threshold"),
                         "nodes": "heads and neurons (no transcoder, no error nodes)"},
        },
        "qParams": {"pinnedIds": pins, "supernodes": [], "linkType": "both", "clickedId": "",
                    "sg_pos": ""},
        "nodes": nodes,
        "links": links,
        **({"qk_only_nodes": graph.qk_only_nodes} if getattr(graph, "qk_only_nodes", None)
           else {}),
    }


def _extras(graph: Any, i: int) -> dict:
    """lin_lens's own per-node fields beyond circuit-tracer's: what the node writes decoded to
    tokens (``top_tokens`` / ``bottom_tokens``: ``[[token, logit change], …]``) and a head's
    QK attribution (Neuronpedia's ``qk_tracing_results``)."""
    out: dict[str, Any] = {}
    tl = (getattr(graph, "top_tokens", None) or {}).get(i)
    if tl is not None:
        out["top_tokens"] = [[t, float(x)] for t, x in zip(tl["tokens"], tl["scores"],
                                                         strict=True)]
        out["bottom_tokens"] = [[t, float(x)] for t, x in zip(tl["neg_tokens"], tl["neg_scores"],
                                                            strict=True)]
    qk = (getattr(graph, "qk", None) or {}).get(i)
    if qk is not None:
        out["qk_tracing_results"] = qk
    return out


def _slug(graph: Any) -> str:
    words = "".join(c if c.isalnum() else "-" for c in graph.prompt.lower()).split("-")
    return "lin-lens-" + "-".join(w for w in words if w)[:60]


def save_json(graph: Any, path: str | Path, slug: str | None = None, *, scan: str | None = None,
              index: bool = True) -> Path:
    """Write the graph file. ``path``: a ``.json`` file, or a directory (then ``{slug}.json``
    in it and, with ``index``, an updated ``graph-metadata.json`` listing it, as circuit-tracer's
    ``create_graph_files`` writes for its local server)."""
    path = Path(path)
    data = to_json(graph, slug, scan)
    slug = data["metadata"]["slug"]
    if path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        out = path / f"{slug}.json"
        if index:
            meta_path = path / "graph-metadata.json"
            listing = json.loads(meta_path.read_text()) if meta_path.exists() else {"graphs": []}
            listing["graphs"] = [g for g in listing.get("graphs", []) if g.get("slug") != slug]
            listing["graphs"].append({k: v for k, v in data["metadata"].items()
                                      if k != "lin_lens"})
            meta_path.write_text(json.dumps(listing, indent=2))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = path
    out.write_text(json.dumps(data, ensure_ascii=False))
    return out
