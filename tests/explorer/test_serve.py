"""``lin-lens serve DIR``: the index lists a folder's runs, graphs, saved maps and pages; each
opens in the explorer; a run's prompts open their maps; nothing outside DIR is served; bad files
give an error page naming the file and the cause."""

from __future__ import annotations

import shutil
import threading
import urllib.error
import urllib.request
from urllib.parse import quote

import pytest

import lin_lens
from lin_lens import cli
from lin_lens.explorer import make_server
from tests.conftest import cpu_only, tiny
from tests.explorer.cases import CT_FILE, corpus_run, page_data
from tests.graph.graph_cases import pruned_graph

pytestmark = cpu_only("a local server over CPU-made files")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    g = pruned_graph("bridge", "gpt2")
    g.save_json(root / "graphs")  # {slug}.json + graph-metadata.json
    g.save(root / "graphs" / "graph.pt")
    shutil.copy(CT_FILE, root / "graphs" / "ct.json")
    (root / "graphs" / "bad.json").write_text('{"metadata": {"prompt_tokens": [], "nodes": [')
    m = tiny("gpt2", "bridge", tokenizer=True)
    lin_lens.linear_map(m, "w1 w2 w3", "ln_final.hook_normalized", -1).save(root / "map.pt")
    shutil.copytree(corpus_run(), root / "runs" / "tiny")
    (root / "page.html").write_text("<!doctype html><p>saved page</p>")
    server = make_server(root, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", g
    server.shutdown()
    server.server_close()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8")


def test_index_and_views(site):
    root, url, g = site
    code, index = get(url + "/")
    assert code == 200
    slug = lin_lens.graph.export.to_json(g)["metadata"]["slug"]
    for rel in (f"graphs/{slug}.json", "graphs/ct.json", "graphs/graph.pt", "map.pt",
                "runs/tiny", "page.html"):
        assert rel in index, rel
    assert g.prompt in index  # the graph listing's prompt
    assert "graph-metadata.json" not in index and "shards" not in index
    code, page = get(f"{url}/view/graphs/{slug}.json")
    assert code == 200 and page_data(page)["nodes"]["label"] == g.labels
    assert page_data(get(f"{url}/view/graphs/ct.json")[1])["meta"]["source"] == "circuit-tracer"
    assert page_data(get(f"{url}/view/graphs/graph.pt")[1])["nodes"]["n"] == g.n_nodes
    d = page_data(get(f"{url}/view/map.pt")[1])
    assert d["kind"] == "map" and len(d["tokens"]) == 4
    code, page = get(f"{url}/file/page.html")
    assert code == 200 and "saved page" in page


@cpu_only("a corpus run")
def test_run_and_its_prompts(site):
    root, url, _ = site
    code, page = get(f"{url}/view/runs/tiny")
    assert code == 200
    d = page_data(page)
    assert d["kind"] == "corpus" and len(d["rows"]) == 4
    for r in d["rows"]:
        assert r["href"].startswith("/run/runs/tiny/")
        code, sub = get(url + quote(r["href"]))
        assert code == 200, sub
        m = page_data(sub)
        assert m["kind"] == "map" and m["meta"]["status"] == r["status"]
        assert m["back"]["href"] == "/view/runs/tiny"
    assert get(f"{url}/run/runs/tiny/nope-0")[0] == 404


def test_refusals(site):
    _, url, _ = site
    code, page = get(f"{url}/view/graphs/bad.json")
    assert code == 400 and "bad.json" in page and "not valid JSON" in page
    assert get(f"{url}/view/..%2F..%2Fetc%2Fpasswd")[0] in (400, 404)
    assert get(f"{url}/file/../../etc/passwd")[0] in (400, 404)
    assert get(f"{url}/view/graphs")[0] == 400  # a folder, not a run
    assert get(f"{url}/nowhere")[0] == 404
    assert get(f"{url}/view/missing.json")[0] == 404


def test_cli(tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["serve", str(tmp_path), "--port", "0", "--open"])
    assert args.port == 0 and args.open and args.explorer_command
