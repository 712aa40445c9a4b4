"""The explorer's pages as files: one self-contained document per graph, map or corpus run, the
data packed compactly and escaped safely, the three ways to open it (file, notebook, browser)."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
import torch

import lin_lens
from lin_lens import _explorer as page_
from lin_lens import explorer
from lin_lens.errors import InvalidArgumentError
from lin_lens.graph import load_json
from tests.conftest import cpu_only, tiny
from tests.explorer.cases import CT_FILE, corpus_run, page_data, page_state
from tests.graph.graph_cases import pruned_graph


def test_page_shell():
    with pytest.raises(InvalidArgumentError, match="kind"):
        page_.page({"kind": "nope"}, "t")
    tricky = "</script><script>alert(1)</script> <!-- & \u2028"
    page = page_.page({"kind": "map", "tokens": [tricky], "meta": {"x": float("nan")}}, tricky)
    data = page_data(page)
    assert data["tokens"] == [tricky] and data["meta"]["x"] is None
    assert data["format"] == "lin_lens.explorer" and data["version"] == 1
    assert page.count("</script>") == 2 + len(page_.SCRIPTS) + 1  # data, state, d3, ours
    assert "<title>&lt;/script&gt;" in page
    for m in page_.VENDOR:
        assert f"https://d3js.org/{m}/" in page  # each module's header, once
    assert page.count("Permission to use, copy, modify") == 1  # ISC, once for eight modules
    assert page.count("Redistribution and use in source and binary forms") == 1  # d3-ease
    a = np.array([1.5, -2.0, math.inf])
    assert np.array_equal(np.frombuffer(base64.b64decode(page_.b64(a, "<f8")), "<f8"), a)
    assert np.array_equal(np.frombuffer(base64.b64decode(page_.b64(torch.tensor([3, -4]), "<i4")),
                                        "<i4"), [3, -4])


def test_graph_page_packs_the_kept_graph(tmp_path):
    g = pruned_graph("bridge", "gpt2")
    g.pin(g.labels[-1])
    try:
        page = g.to_html()
    finally:
        g.pinned = None
    d = page_data(page)
    n, m = g.n_nodes, g.n_edges
    assert d["nodes"]["label"] == g.labels and d["nodes"]["n"] == n and d["edges"]["m"] == m
    src = np.frombuffer(base64.b64decode(d["edges"]["src"]), "<i4")
    dst = np.frombuffer(base64.b64decode(d["edges"]["dst"]), "<i4")
    w = np.frombuffer(base64.b64decode(d["edges"]["w"]), "<f8")
    assert len(src) == m and bool(np.all(src < dst))  # edges go up the topological order
    k = int(np.argmax(np.abs(w)))
    assert (g.labels[src[k]], g.labels[dst[k]], w[k]) == g.edges(1)[0]
    writes = d["nodes"]["writes"]
    i = next(iter(g.top_tokens))
    assert writes[str(i)][0] == g.top_tokens[i]["tokens"]
    assert page_state(page)["pinned"] == [g.to_sparse().ids[-1]]
    # the page is smaller than the graph's JSON plus the fixed part (scripts, styles, d3)
    fixed = len(page_.page({"kind": "graph", "nodes": {}, "edges": {}}, ""))
    js = len(json.dumps(lin_lens.graph.export.to_json(g), ensure_ascii=False))
    assert len(page) - fixed < js


def test_circuit_tracer_page():
    g = load_json(CT_FILE)
    d = page_data(g.to_html())
    assert d["meta"]["source"] == "circuit-tracer"
    assert set(d["nodes"]["types"]) == {"embedding", "cross layer transcoder",
                                        "mlp reconstruction error", "logit"}
    assert d["nodes"]["note"][g.ids.index("1_4512_9")] == "Dallas"


def test_show_outside_a_notebook_opens_a_file(monkeypatch):
    opened = []
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url))
    path = load_json(CT_FILE).show()
    assert path.exists() and opened == [path.as_uri()]
    assert page_data(path.read_text(encoding="utf-8"))["kind"] == "graph"
    path.unlink()


def test_map_pages(backend, tmp_path):
    m = tiny("gpt2", backend, tokenizer=True)
    lm = lin_lens.linear_map(m, "w1 w2 w3 w4", "ln_final.hook_normalized", [-1, 2])
    d = explorer.map_data(lm, m, target=-1)
    dec = lin_lens.decode(m, lm, 3, 5, target=-1)
    assert d["tokens"] == dec.tokens and d["U"][0][0] == dec.out[0][0].tokens
    assert d["stable_rank"] == pytest.approx(dec.stable_rank.tolist())
    assert d["stacked"]["U"][0] == dec.stacked_out[0].tokens
    assert d["meta"]["position"] == lm.positions[-1]
    bare = explorer.map_data(lm.at(0))  # no model: numbers only
    assert bare["tokens"][0].startswith("#") and "U" not in bare and "note" in bare["meta"]
    assert bare["stable_rank"] == pytest.approx(lm.at(0).stable_rank().tolist())
    path = explorer.save_map_html(lm, tmp_path / "map.html", m)
    assert page_data(path.read_text(encoding="utf-8"))["kind"] == "map"
    with pytest.raises(InvalidArgumentError, match="LinearMap"):
        explorer.map_data("not a map")


@cpu_only("a corpus run of a CPU LoadSpec model")
def test_corpus_pages(tmp_path):
    run = corpus_run()
    rows = lin_lens.corpus.read(run).to_pylist()
    d = explorer.corpus_data(run, link=lambda r: f"#{r['prompt_id']}")
    assert len(d["rows"]) == len(rows) and d["meta"]["summary"]["failed"] == 1
    assert d["rows"][0]["href"] == f"#{rows[0]['prompt_id']}"
    assert set(d["by_position"]) == {str(i) for r in rows if r["status"] == "ok"
                                     for i in range(r["n_tokens"])}
    index = explorer.save_corpus_html(run, tmp_path / "site")
    maps = sorted((tmp_path / "site" / "maps").glob("*.html"))
    assert len(maps) == len(rows)
    listed = page_data(index.read_text(encoding="utf-8"))["rows"]
    assert {r["href"] for r in listed} == {f"maps/{p.name}" for p in maps}
    ok = next(r for r in rows if r["status"] == "ok")
    one = page_data((tmp_path / "site" / "maps" / f"{ok['prompt_id']}-{ok['target_pos']}.html")
                    .read_text(encoding="utf-8"))
    assert one["tokens"] == ok["tokens"] and one["U"] == ok["u_tokens"]
    assert one["back"]["href"] == "../index.html"
