"""``load_json``: circuit-tracer's graph files (a hand-made Gemma-2-2B-style file with transcoder
features, error nodes and logits, ``data/circuit_tracer_dallas.json``, written to their schema
version 1 as their ``create_graph_files`` writes it) and lin_lens's own export, read back
exactly; malformed files refused with the file and the cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lin_lens.errors import InvalidArgumentError, LinLensError
from lin_lens.graph import SparseGraph, load_json
from tests.graph.graph_cases import PAIR, pruned_graph

CT_FILE = Path(__file__).parent / "data" / "circuit_tracer_dallas.json"


def test_circuit_tracer_file():
    g = load_json(CT_FILE)
    raw = json.loads(CT_FILE.read_text())
    assert isinstance(g, SparseGraph) and g.meta["source"] == "circuit-tracer"
    assert g.n_nodes == len(raw["nodes"]) and g.n_edges == len(raw["links"])
    assert g.ids == [n["node_id"] for n in raw["nodes"]]
    groups = dict(zip(g.ids, g.groups, strict=True))
    assert groups["E_26865_9"] == "embed" and groups["1_4512_9"] == "feature"
    assert groups["18_-1_10"] == "error" and groups["27_22605_10"] == "target"
    assert g.labels[g.ids.index("1_4512_9")] == "L1F4512@9"
    assert g.labels[g.ids.index("27_22605_10")] == 'logit " Austin"'
    assert g.notes[g.ids.index("1_4512_9")] == "Dallas"
    # errors are sources, features receivers; embeddings and logits always kept
    i_err, i_feat = g.ids.index("18_-1_10"), g.ids.index("23_9112_10")
    assert not g.receiver[i_err] and g.receiver[i_feat] and g.always[g.ids.index("E_2_0")]
    # target weights: the logits' probabilities
    t = g.targets
    assert torch.allclose(g.target_weight[t], torch.tensor([0.452, 0.081, 0.052],
                                                           dtype=torch.float64))
    # rows: input, then by layer, logits on top; every edge goes upwards
    assert int(g.row[g.ids.index("E_2_0")]) == 0
    assert bool((g.row[g.src] < g.row[g.dst]).all())
    assert g.incoming('logit " Austin"')[0] == ("L23F9112@10", 11.4)
    assert g.outgoing("L1F4512@9")[0] == ("L4F10021@9", 9.8)
    assert [g.ids[i] for i in g.pinned] == raw["qParams"]["pinnedIds"]
    assert torch.isnan(g.value[g.ids.index("E_2_0")]) and g.value[i_feat] == 27.5
    h = g.pruned(0.6, 0.9)
    assert 0 < h.n_nodes < g.n_nodes and {"embed", "target"} <= set(h.groups)
    page = g.to_html()
    assert '"source":"circuit-tracer"' in page and "L23F9112@10" in page


@pytest.mark.parametrize("backend,arch", PAIR)
def test_lin_lens_export_reads_back(backend, arch, tmp_path):
    g = pruned_graph(backend, arch)
    g.qk = {g.kinds.index("head"): {"pair_wise_contributors": [["E_3_0", "E_8_3", 0.5]],
                                    "top_q_marginal_contributors": [["E_3_0", 0.5]],
                                    "top_k_marginal_contributors": [["E_8_3", 0.5]]}}
    g.qk_only_nodes = {"E_8_3": {"label": "emb@3", "layer": "E", "ctx_idx": 3,
                                 "feature_type": "embedding"}}
    try:
        g.pin(g.labels[-1], g.labels[0])
        out = g.save_json(tmp_path / "g.json")
        s = load_json(out)
    finally:
        g.qk = g.qk_only_nodes = g.pinned = None
    want = g.to_sparse()
    assert s.meta["source"] == "lin_lens" and s.meta["exact"]
    assert s.labels == want.labels and s.ids == want.ids and s.groups == want.groups
    assert torch.equal(s.src, want.src) and torch.equal(s.dst, want.dst)
    assert torch.allclose(s.weight, want.weight, rtol=1e-15, atol=0)
    assert torch.equal(s.row, want.row) and torch.equal(s.pos, want.pos)
    assert torch.allclose(s.total_effect, want.total_effect)
    assert s.top_tokens.keys() == want.top_tokens.keys()
    k = next(iter(s.top_tokens))
    assert s.top_tokens[k]["tokens"] == want.top_tokens[k]["tokens"]
    assert s.qk[g.kinds.index("head")]["pair_wise_contributors"] == [["E_3_0", "E_8_3", 0.5]]
    assert s.qk_only_nodes["E_8_3"]["label"] == "emb@3"
    assert [s.labels[i] for i in s.pinned] == [g.labels[-1], g.labels[0]]
    assert s.pruned(0.7, 0.9).labels == g.pruned(0.7, 0.9).labels


def _bad(tmp_path: Path, text: str) -> str:
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(InvalidArgumentError) as e:
        load_json(p)
    assert isinstance(e.value, LinLensError) and str(p) in str(e.value)
    return str(e.value)


def test_malformed_files_name_the_file_and_the_cause(tmp_path):
    raw = json.loads(CT_FILE.read_text())
    assert "not valid JSON" in _bad(tmp_path, '{"metadata": {')
    assert "line 1" in _bad(tmp_path, '{"metadata": {')
    assert "not an object" in _bad(tmp_path, "[1, 2]")
    assert "no 'nodes'" in _bad(tmp_path, json.dumps({k: v for k, v in raw.items()
                                                       if k != "nodes"}))
    assert "graph-metadata.json listing" in _bad(tmp_path, json.dumps(
        {"graphs": [{"slug": "dallas-austin"}]}))
    broken = json.loads(CT_FILE.read_text())
    broken["links"].append({"source": "nowhere", "target": "E_2_0", "weight": 1.0})
    assert "unknown node 'nowhere'" in _bad(tmp_path, json.dumps(broken))
    broken = json.loads(CT_FILE.read_text())
    del broken["nodes"][3]["ctx_idx"]
    assert "'ctx_idx'" in _bad(tmp_path, json.dumps(broken))
    broken = json.loads(CT_FILE.read_text())
    broken["metadata"]["schema_version"] = 2
    assert "schema_version 2" in _bad(tmp_path, json.dumps(broken))
    broken = json.loads(CT_FILE.read_text())
    broken["nodes"].append(dict(broken["nodes"][0]))
    assert "appears twice" in _bad(tmp_path, json.dumps(broken))
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        load_json(tmp_path / "missing.json")
