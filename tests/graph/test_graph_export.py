"""Export and display: circuit-tracer's graph file (schema re-declared here from their published
``frontend/graph_models.py``; lin_lens does not depend on circuit-tracer), save / load / to, and
the explorer page (driven in headless Chromium by tests/explorer)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lin_lens.errors import InvalidArgumentError
from lin_lens.graph import AttributionGraph
from tests.graph.graph_cases import PAIR, pruned_graph

# circuit-tracer graph file, schema version 1: field → (types, required)
METADATA = {"slug": (str, True), "scan": (str, True), "transcoder_list": (list, True),
            "prompt_tokens": (list, True), "prompt": (str, True),
            "node_threshold": ((float, int, type(None)), False),
            "schema_version": ((int, type(None)), False)}
QPARAMS = {"pinnedIds": (list, True), "supernodes": (list, True), "linkType": (str, True),
           "clickedId": (str, True), "sg_pos": (str, True)}
NODE = {"node_id": (str, True), "feature": (int, True), "layer": (str, True),
        "ctx_idx": (int, True), "feature_type": (str, True), "token_prob": (float, False),
        "is_target_logit": (bool, False), "run_idx": (int, False),
        "reverse_ctx_idx": (int, False), "jsNodeId": (str, True), "clerp": (str, False),
        "influence": ((float, type(None)), False), "activation": ((float, type(None)), False)}
LINK = {"source": (str, True), "target": (str, True), "weight": (float, True)}


def _check(obj: dict, schema: dict, where: str) -> None:
    for key, (types, required) in schema.items():
        if key not in obj:
            assert not required, f"{where}: missing {key!r}"
            continue
        types = types if isinstance(types, tuple) else (types,)
        ok = isinstance(obj[key], types) and not (bool not in types and isinstance(obj[key], bool))
        assert ok, f"{where}.{key}: {obj[key]!r} is not {types}"


def validate(data: dict) -> None:
    assert set(data) >= {"metadata", "qParams", "nodes", "links"}
    _check(data["metadata"], METADATA, "metadata")
    assert data["metadata"]["schema_version"] == 1
    assert all(isinstance(t, str) for t in data["metadata"]["prompt_tokens"])
    _check(data["qParams"], QPARAMS, "qParams")
    ids = set()
    for n in data["nodes"]:
        _check(n, NODE, n.get("node_id", "node"))
        assert n["node_id"] not in ids
        ids.add(n["node_id"])
        assert n["layer"] == "E" or n["layer"].isdigit()  # the frontend reads +layer
        assert 0 <= n["ctx_idx"] < len(data["metadata"]["prompt_tokens"])
        if n["feature_type"] == "logit":  # the frontend parses the probability from the clerp
            assert re.search(r"\(p=[0-9.]+\)", n["clerp"])
        assert "error" not in n["feature_type"]  # exact: no error nodes
    assert len({n["jsNodeId"] for n in data["nodes"]}) == len(data["nodes"])
    for link in data["links"]:
        _check(link, LINK, "link")
        assert link["source"] in ids and link["target"] in ids
    assert set(data["qParams"]["pinnedIds"]) <= ids


@pytest.mark.parametrize("backend,arch", PAIR)
def test_circuit_tracer_graph_file(backend, arch, tmp_path):
    g = pruned_graph(backend, arch)
    out = g.save_json(tmp_path)  # a directory: {slug}.json and graph-metadata.json
    data = json.loads(out.read_text())
    validate(data)
    n_layers = g.meta["n_layers"]
    by_type: dict[str, list[dict]] = {}
    for n in data["nodes"]:
        by_type.setdefault(n["feature_type"], []).append(n)
    for n in by_type["embedding"]:  # E_{token}_{pos}
        assert n["node_id"] == f"E_{int(g.tokens[n['ctx_idx']])}_{n['ctx_idx']}"
    (logit,) = by_type["logit"]
    tok, pos = g.target["ids"][0], g.target["pos"]
    assert logit["node_id"] == f"{n_layers + 1}_{tok}_{pos}" and logit["is_target_logit"]
    assert {"attention head", "mlp neuron"} <= set(by_type)
    head = by_type["attention head"][0]
    assert re.fullmatch(r"head L\d+\.H\d+", head["clerp"])
    assert len(data["links"]) == g.n_edges
    weights = {(lk["source"], lk["target"]): lk["weight"] for lk in data["links"]}
    src, dst, w = g.edges(1)[0]
    ids = dict(zip(g.labels, [n["node_id"] for n in data["nodes"]], strict=True))
    assert weights[(ids[src], ids[dst])] == pytest.approx(w)
    listing = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [x["slug"] for x in listing["graphs"]] == [data["metadata"]["slug"]]
    g.save_json(tmp_path)  # saving again replaces the listing's entry
    assert len(json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]) == 1


def test_validator_rejects_broken_files():
    g = pruned_graph("bridge", "llama")
    from lin_lens.graph.export import to_json

    data = to_json(g)
    data["links"].append({"source": "nowhere", "target": data["nodes"][0]["node_id"],
                          "weight": 1.0})
    with pytest.raises(AssertionError):
        validate(data)


def test_save_load_and_to(tmp_path):
    g = pruned_graph("bridge", "llama")
    h = AttributionGraph.load(g.save(tmp_path / "g.pt"))
    for k in ("node_ids", "adjacency", "edge_mask", "value", "total_effect", "influence"):
        assert torch.equal(getattr(h, k), getattr(g, k).cpu())  # load maps to the CPU
    assert h.labels == g.labels and h.target["ids"] == g.target["ids"]
    assert h.relative_error == g.relative_error and h.edges(3) == g.edges(3)
    assert h.to("meta") is h and h.adjacency.device.type == "meta"
    assert all(v.device.type == "meta" for v in h.readouts.values())
    with pytest.raises(ValueError, match="not a saved"):
        torch.save({"x": 1}, tmp_path / "other.pt")
        AttributionGraph.load(tmp_path / "other.pt")


class _RunsCode:
    """Unpickling this calls os.system: what a malicious graph file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_load_never_runs_code_from_the_file(tmp_path):
    g = pruned_graph("bridge", "llama")
    marker = tmp_path / "pwned"
    state = {"format": "lin_lens.AttributionGraph", "version": 1, **g.state(),
             "meta": {**g.meta, "x": _RunsCode(marker)}}
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(InvalidArgumentError, match="could run code"):
        AttributionGraph.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_load_refuses_a_later_format_version(tmp_path):
    g = pruned_graph("bridge", "llama")
    torch.save({"format": "lin_lens.AttributionGraph", "version": 99, **g.state()},
               tmp_path / "new.pt")
    with pytest.raises(InvalidArgumentError, match="format version 99"):
        AttributionGraph.load(tmp_path / "new.pt")


def test_html_view_is_self_contained(tmp_path):
    """The explorer page (tests/explorer drives it in Chromium): the graph's data, the
    vendored d3 modules and their licence inlined, nothing loaded from the network."""
    g = pruned_graph("bridge", "gpt2")
    page = g.to_html()
    assert not re.search(r"<script[^>]+src|<link|@import|url\(|fetch\(|XMLHttpRequest", page)
    assert page.count('<script type="application/json" id="ll-data">') == 1
    data = json.loads(re.search(r'id="ll-data">(.*?)</script>', page, re.S).group(1))
    assert data["kind"] == "graph" and data["nodes"]["label"] == g.labels
    assert data["nodes"]["n"] == g.n_nodes and data["edges"]["m"] == g.n_edges
    assert "d3-zoom" in page and "Permission to use, copy, modify" in page
    frag = g._repr_html_()
    assert frag.startswith("<iframe srcdoc=") and "&lt;script" in frag
    path = g.save_html(tmp_path / "graph.html")
    assert path.read_text(encoding="utf-8") == page
