"""Reading graph files: circuit-tracer's JSON (schema version 1) and lin_lens's own export.

circuit-tracer writes, per node, ``node_id`` (``E_{token}_{pos}`` embeddings,
``{layer}_{feature}_{pos}`` transcoder features, ``{layer}_-1_{pos}`` reconstruction errors,
``{n_layers+1}_{token}_{pos}`` logits), ``layer`` (``"E"`` or a number), ``ctx_idx``,
``feature_type`` (``"embedding"``, ``"cross layer transcoder"``, ``"mlp reconstruction error"``,
``"logit"``, …), ``clerp``, ``influence`` (cumulative share), ``activation``, ``token_prob``;
links are ``{source, target, weight}``; ``qParams.pinnedIds`` the pinned nodes.
lin_lens's export (:mod:`lin_lens.graph.export`) adds per node ``label``, ``total_effect``,
``top_tokens`` / ``bottom_tokens`` (``[[token, logit change], …]``) and, once QK attribution
exists, Neuronpedia's ``qk_tracing_results``, with a top-level ``qk_only_nodes``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from lin_lens.errors import InvalidArgumentError
from lin_lens.graph.sparse import RECEIVERS, SparseGraph, level, row_names

_GROUP = {"embedding": "embed", "positional embedding": "pos_embed", "bias": "bias",
          "attention head": "head", "attention": "attn", "mlp neuron": "neuron", "mlp": "mlp",
          "logit": "target"}
_REQUIRED = {"node_id": str, "layer": (str, int), "ctx_idx": int, "feature_type": str}


def load_json(path: str | Path) -> SparseGraph:
    """A graph file (circuit-tracer's schema version 1, or ``AttributionGraph.save_json``'s) as
    a :class:`SparseGraph` that ``show()``s, ``save_html``s and ``pruned()``s like a graph.

    Raises :class:`lin_lens.InvalidArgumentError` naming the file and the cause for a file
    that is not JSON or not a graph file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{path}: cannot read the graph file ({e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgumentError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, "
                                   f"column {e.colno})") from e
    return from_json(data, where=str(path))


def _fail(where: str, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{where}: {why}")


def from_json(data: Any, where: str = "graph JSON") -> SparseGraph:
    """A parsed graph file as a :class:`SparseGraph` (see :func:`load_json`)."""
    if not isinstance(data, dict):
        raise _fail(where, f"the top level is a {type(data).__name__}, not an object")
    if "graphs" in data and "nodes" not in data:
        slugs = [g.get("slug") for g in data["graphs"] if isinstance(g, dict)][:5]
        raise _fail(where, f"a graph-metadata.json listing, not a graph: open one of its "
                           f"graphs ({', '.join(f'{s}.json' for s in slugs)})")
    for key, kind in (("metadata", dict), ("nodes", list), ("links", list)):
        if not isinstance(data.get(key), kind):
            raise _fail(where, f"no {key!r} {kind.__name__}: not a circuit-tracer graph file "
                               "(schema version 1)")
    meta = data["metadata"]
    version = meta.get("schema_version", 1)
    if version not in (1, None):
        raise _fail(where, f"schema_version {version!r}; this lin_lens reads version 1")
    tokens = meta.get("prompt_tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise _fail(where, "metadata.prompt_tokens must be a list of strings")
    nodes = data["nodes"]
    ids: dict[str, int] = {}
    for k, nd in enumerate(nodes):
        if not isinstance(nd, dict):
            raise _fail(where, f"node {k} is not an object")
        for f, t in _REQUIRED.items():
            if not isinstance(nd.get(f), t) or isinstance(nd.get(f), bool):
                raise _fail(where, f"node {k} ({nd.get('node_id', '?')}): field {f!r} missing "
                                   f"or not {getattr(t, '__name__', 'a string or number')}")
        if nd["node_id"] in ids:
            raise _fail(where, f"node id {nd['node_id']!r} appears twice")
        if not 0 <= nd["ctx_idx"] < max(len(tokens), 1):
            raise _fail(where, f"node {nd['node_id']!r}: ctx_idx {nd['ctx_idx']} outside the "
                               f"{len(tokens)} prompt tokens")
        ids[nd["node_id"]] = k
    src, dst, weight = _links(data["links"], ids, where)
    ours = isinstance(meta.get("lin_lens"), dict)
    groups = [_group(nd["feature_type"]) for nd in nodes]
    layers = [_layer(nd["layer"], where, nd["node_id"]) for nd in nodes]
    logit_layers = [la for la, g in zip(layers, groups, strict=True) if g == "target"]
    n_layers = (max(logit_layers) - 1 if logit_layers
                else max([la for la in layers if la >= 0], default=-1) + 1)
    rows = [_row(g, la, n_layers, ours) for g, la in zip(groups, layers, strict=True)]
    tw = torch.tensor([float(nd.get("token_prob") or 0.0) if g == "target" else 0.0
                       for nd, g in zip(nodes, groups, strict=True)], dtype=torch.float64)
    targets = [i for i, g in enumerate(groups) if g == "target"]
    if targets and not bool(tw.sum() > 0):
        tw[targets] = 1.0 / len(targets)
    pinned = (data.get("qParams") or {}).get("pinnedIds") or []
    lm = meta.get("lin_lens") or {}
    return SparseGraph(
        ids=list(ids), labels=[_label(nd, g, tokens, ours) for nd, g in
                               zip(nodes, groups, strict=True)],
        groups=groups, types=[nd["feature_type"] for nd in nodes], row=torch.tensor(rows),
        pos=torch.tensor([nd["ctx_idx"] for nd in nodes]),
        value=_floats(nodes, "activation"), total_effect=_floats(nodes, "total_effect"),
        cumulative=_floats(nodes, "influence"), target_weight=tw,
        always=torch.tensor([g in ("embed", "target") for g in groups]),
        receiver=torch.tensor([g in RECEIVERS for g in groups]),
        src=src, dst=dst, weight=weight, tokens=list(tokens), prompt=str(meta.get("prompt", "")),
        row_names=row_names(set(rows), n_layers, lin_lens=ours),
        notes=[str(nd.get("clerp") or "") for nd in nodes],
        meta={"source": "lin_lens" if ours else "circuit-tracer", "exact": bool(lm.get("exact")),
              "file": where, "slug": meta.get("slug"), "scan": meta.get("scan"),
              "transcoders": meta.get("transcoder_list") or [],
              "target": lm.get("target") or [nodes[i].get("clerp") or nodes[i]["node_id"]
                                              for i in targets],
              "target_pos": nodes[targets[0]]["ctx_idx"] if targets else None,
              "relative_error": lm.get("relative_error"),
              "node_threshold": meta.get("node_threshold"),
              "edge_threshold": lm.get("edge_threshold")},
        top_tokens={i: tl for i, nd in enumerate(nodes) if (tl := _tokens(nd)) is not None},
        qk={i: nd["qk_tracing_results"] for i, nd in enumerate(nodes)
            if isinstance(nd.get("qk_tracing_results"), dict)},
        qk_only_nodes=qk_only if isinstance(qk_only := data.get("qk_only_nodes"), dict) else {},
        pinned=[ids[p] for p in pinned if p in ids])


def _links(links: list, ids: dict[str, int], where: str):
    src, dst, weight = [], [], []
    for k, lk in enumerate(links):
        if not isinstance(lk, dict):
            raise _fail(where, f"link {k} is not an object")
        try:
            s, d, w = ids[lk["source"]], ids[lk["target"]], float(lk["weight"])
        except KeyError as e:
            what = e.args[0]
            raise _fail(where, f"link {k}: " + (f"no field {what!r}" if what in
                        ("source", "target", "weight") else f"unknown node {what!r}")) from None
        except (TypeError, ValueError):
            raise _fail(where, f"link {k}: weight {lk.get('weight')!r} is not a number") from None
        src.append(s)
        dst.append(d)
        weight.append(w)
    return (torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long),
            torch.tensor(weight, dtype=torch.float64))


def _group(feature_type: str) -> str:
    if feature_type in _GROUP:
        return _GROUP[feature_type]
    return "error" if "error" in feature_type else "feature"


def _layer(layer: str | int, where: str, node_id: str) -> int:
    if layer == "E":
        return -1
    try:
        return int(layer)
    except ValueError:
        raise _fail(where, f"node {node_id!r}: layer {layer!r} is neither 'E' nor a number") \
            from None


def _row(group: str, layer: int, n_layers: int, ours: bool) -> int:
    if group in ("embed", "pos_embed") or layer < 0:
        return 0
    if group == "target":
        return 2 * n_layers + 3
    if ours:
        return level(group, layer, n_layers)
    return 2 * layer + (1 if group in ("head", "attn") else 2)


def _label(nd: dict, group: str, tokens: list[str], ours: bool) -> str:
    if ours and isinstance(nd.get("label"), str):
        return nd["label"]
    pos, layer, nid = nd["ctx_idx"], nd["layer"], nd["node_id"]
    if group == "embed":
        return f"emb@{pos} {tokens[pos]!r}" if pos < len(tokens) else f"emb@{pos}"
    if group == "target":
        m = re.match(r'Output (".*") \(p=', nd.get("clerp") or "")
        return f"logit {m.group(1)}" if m else f"logit {nid}"
    if group == "error":
        return f"L{layer} error@{pos}"
    parts = nid.split("_")
    feat = parts[1] if len(parts) == 3 else nd.get("feature")
    return f"L{layer}F{feat}@{pos}"


def _floats(nodes: list[dict], key: str) -> torch.Tensor:
    def f(v: Any) -> float:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) \
            and math.isfinite(v) else math.nan

    return torch.tensor([f(nd.get(key)) for nd in nodes], dtype=torch.float64)


def _tokens(nd: dict) -> dict | None:
    """lin_lens's ``top_tokens`` / ``bottom_tokens`` pairs as a TokenList-like dict."""
    top, bottom = nd.get("top_tokens"), nd.get("bottom_tokens")
    if not isinstance(top, list):
        return None
    bottom = bottom if isinstance(bottom, list) else []
    try:
        return {"tokens": [str(t[0]) for t in top], "scores": [float(t[1]) for t in top],
                "neg_tokens": [str(t[0]) for t in bottom],
                "neg_scores": [float(t[1]) for t in bottom]}
    except (TypeError, IndexError, ValueError, KeyError):
        return None  # not lin_lens's [[token, score], …]: leave it out
