"""The explorer in a real browser (headless Chromium under Selenium, pages from ``file://``, every
host name unresolvable): a click shows the node's true edges and decoded tokens, the thresholds
re-prune exactly as ``pruned`` does, circuit-tracer's files open, QK attribution shows, pins are
kept in the saved page, hover finds the strongest path, maps and corpus runs render; no console
message, no network request."""

from __future__ import annotations

import pytest

pytest.importorskip("selenium", reason="selenium not installed (the dev extra has it)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

import lin_lens  # noqa: E402
from lin_lens import explorer  # noqa: E402
from lin_lens.decoding import visible  # noqa: E402
from lin_lens.graph import load_json  # noqa: E402
from tests.conftest import cpu_only, tiny  # noqa: E402
from tests.explorer.browser import (  # noqa: E402
    click_node,
    console,
    needs_browser,
    open_page,
    requests,
    start,
    wait,
)
from tests.explorer.cases import CT_FILE, corpus_run  # noqa: E402
from tests.graph.graph_cases import PAIR, full_graph, pruned_graph  # noqa: E402

pytestmark = [pytest.mark.slow, needs_browser, cpu_only("Chromium on this machine")]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    d = start(tmp_path_factory.mktemp("chromium") / "profile")
    yield d
    d.quit()


@pytest.fixture
def clean(driver):
    """Checks, after the test, that the page wrote nothing to the console and asked the
    network for nothing."""
    console(driver), requests(driver)
    yield driver
    assert console(driver) == []
    assert requests(driver) == []


def text(driver, css: str) -> str:
    return driver.execute_script("var e = document.querySelector(arguments[0]);"
                                 "return e ? e.firstChild.textContent : null", css)


def shown_after(driver, version: int) -> dict:
    wait(driver, f"llExplorer.view.pruneVersion > {version}")
    return driver.execute_script("return llExplorer.shown()")


@pytest.mark.parametrize("backend,arch", PAIR)
def test_click_shows_the_true_edges_and_tokens(clean, backend, arch, tmp_path):
    g = pruned_graph(backend, arch)
    open_page(clean, g.save_html(tmp_path / "g.html").as_uri())
    ins = {i: g.incoming(i) for i, k in enumerate(g.kinds) if k in ("head", "neuron")}
    i = max((i for i in ins if len(ins[i]) >= 2 and i in g.top_tokens),
            key=lambda i: abs(float(g.total_effect[i])))
    click_node(clean, i)
    wait(clean, f"document.querySelector('#ll-panel .ll-panel[data-node=\"{i}\"]')")
    assert text(clean, "#ll-panel .ll-label") == g.labels[i]
    assert text(clean, "#ll-panel .ll-in li .lab") == ins[i][0][0]  # strongest incoming edge
    assert text(clean, "#ll-panel .ll-out li .lab") == g.outgoing(i)[0][0]
    assert text(clean, "#ll-panel .ll-writes .ll-tok") == visible(g.top_tokens[i]["tokens"][0])
    assert clean.execute_script("return llExplorer.timings.click_ms") < 1000
    # a click on an incoming edge selects its source
    clean.find_element(By.CSS_SELECTOR, "#ll-panel .ll-in li").click()
    assert text(clean, "#ll-panel .ll-label") == ins[i][0][0]


def test_thresholds_prune_as_python_does(clean, tmp_path):
    g = full_graph(*PAIR[-1].values)  # every node and edge: hundreds of nodes
    open_page(clean, g.save_html(tmp_path / "full.html").as_uri())
    assert clean.execute_script("return llExplorer.shown()") == {"nodes": g.n_nodes,
                                                                 "edges": g.n_edges}
    node_slider = clean.find_element(By.ID, "ll-node-threshold")
    v = clean.execute_script("return llExplorer.view.pruneVersion")
    node_slider.send_keys(*[Keys.ARROW_LEFT] * 25)  # 1.00 → 0.75, one step at a time
    wait(clean, "document.getElementById('ll-node-threshold').value === '0.75'")
    shown = shown_after(clean, v)
    want = g.pruned(0.75, 1.0)
    wait(clean, f"llExplorer.shown().nodes === {want.n_nodes}", timeout=5)
    assert clean.execute_script("return llExplorer.shown()") == {"nodes": want.n_nodes,
                                                                 "edges": want.n_edges}, shown
    v = clean.execute_script("return llExplorer.view.pruneVersion")
    clean.find_element(By.ID, "ll-edge-threshold").send_keys(*[Keys.ARROW_LEFT] * 10)
    wait(clean, "document.getElementById('ll-edge-threshold').value === '0.9'")
    shown_after(clean, v)
    want = g.pruned(0.75, 0.9)
    wait(clean, f"llExplorer.shown().nodes === {want.n_nodes}", timeout=5)
    assert clean.execute_script("return llExplorer.shown()") == {"nodes": want.n_nodes,
                                                                 "edges": want.n_edges}
    for nt, et in ((0.5, 0.5), (0.9, 0.98), (0.3, 0.95), (1.0, 0.7)):  # the same rule in JS
        assert clean.execute_script("return llExplorer.prune(arguments[0], arguments[1])",
                                    nt, et) == g.pruned(nt, et).n_nodes


def test_circuit_tracer_file(clean, tmp_path):
    g = load_json(CT_FILE)
    open_page(clean, g.save_html(tmp_path / "ct.html").as_uri())
    assert clean.execute_script("return llExplorer.shown().nodes") == g.n_nodes
    i = g.index_of("L23F9112@10")
    click_node(clean, i)
    wait(clean, f"document.querySelector('#ll-panel .ll-panel[data-node=\"{i}\"]')")
    assert text(clean, "#ll-panel .ll-in li .lab") == g.incoming(i)[0][0] == "L14F3357@10"
    assert text(clean, "#ll-panel .ll-f-note") == "say Austin"
    err = g.index_of("L18 error@10")
    click_node(clean, err)
    wait(clean, f"document.querySelector('#ll-panel .ll-panel[data-node=\"{err}\"]')")
    assert text(clean, "#ll-panel .ll-out li .lab") == g.outgoing(err)[0][0]
    pins = clean.execute_script("return llExplorer.state().pinned")
    assert pins == [g.ids[k] for k in g.pinned]  # qParams.pinnedIds


def test_qk_attribution_panel(clean, tmp_path):
    g = pruned_graph("bridge", "gpt2")
    ids = g.to_sparse().ids
    head = g.kinds.index("head")
    q, k = ids[0], ids[1]
    g.qk = {head: {"pair_wise_contributors": [[q, "X_9_9", 0.25], [q, k, -0.125]],
                   "top_q_marginal_contributors": [[q, 0.125]],
                   "top_k_marginal_contributors": [["X_9_9", 0.25], [k, -0.125]]}}
    g.qk_only_nodes = {"X_9_9": {"label": "pruned key node", "layer": "0", "ctx_idx": 2,
                                 "feature_type": "attention head"}}
    try:
        path = g.save_html(tmp_path / "qk.html")
    finally:
        g.qk = g.qk_only_nodes = None
    open_page(clean, path.as_uri())
    click_node(clean, head)
    wait(clean, "document.querySelector('#ll-panel .ll-qk')")
    cells = clean.execute_script("return Array.from(document.querySelectorAll("
                                 "'#ll-panel .ll-qk tr')).map(r => r.innerText)")
    assert cells[1].split("\t")[:2] == [g.labels[0], "pruned key node (L0@2)"]
    assert cells[2].split("\t")[:2] == [g.labels[0], g.labels[1]]
    clean.find_element(By.CSS_SELECTOR, "#ll-panel .ll-qk .ll-link").click()
    assert text(clean, "#ll-panel .ll-label") == g.labels[0]


def test_pins_are_kept_in_the_saved_page(clean, tmp_path):
    g = pruned_graph("bridge", "gpt2")
    open_page(clean, g.save_html(tmp_path / "g.html").as_uri())
    before = clean.execute_script("return llExplorer.state().pinned")
    i = next(j for j in range(g.n_nodes) if g.to_sparse().ids[j] not in before)
    click_node(clean, i)
    wait(clean, "document.querySelector('#ll-panel .ll-pin-btn')").click()
    state = clean.execute_script("return llExplorer.state()")
    assert state["pinned"][-1] == g.to_sparse().ids[i]
    saved = tmp_path / "saved.html"  # what "Save page" downloads
    saved.write_text(clean.execute_script("return LL.pageHTML(llExplorer.state())"),
                     encoding="utf-8")
    open_page(clean, saved.as_uri())
    assert clean.execute_script("return llExplorer.state().pinned") == state["pinned"]
    chips = clean.execute_script("return Array.from(document.querySelectorAll('.ll-pin'))"
                                 ".map(e => e.firstChild.textContent)")
    assert g.labels[i] in chips
    clean.find_element(By.ID, "ll-subgraph-only").click()  # only the pinned subgraph
    assert clean.execute_script("return llExplorer.shown().nodes") == len(state["pinned"])


def test_hover_lights_the_strongest_path_and_search_finds(clean, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    g = pruned_graph("bridge", "gpt2")
    score, path = g.top_paths(1)[0]
    open_page(clean, g.save_html(tmp_path / "g.html").as_uri())
    i = g.labels.index(path[0])
    clean.execute_script("llExplorer.center(arguments[0])", i)
    xy = clean.execute_script("return llExplorer.nodeScreen(arguments[0])", i)
    canvas = clean.find_element(By.ID, "ll-canvas")
    ActionChains(clean).move_to_element_with_offset(
        canvas, int(round(xy["x"] - canvas.size["width"] / 2)),
        int(round(xy["y"] - canvas.size["height"] / 2))).perform()
    got = wait(clean, "llExplorer.view.paths && llExplorer.view.paths[0]")
    assert [g.labels[j] for j in got["nodes"]] == path
    assert got["score"] == pytest.approx(score, rel=1e-9)
    box = clean.find_element(By.ID, "ll-search-input")
    box.send_keys(g.labels[-1])
    box.send_keys(Keys.ENTER)
    assert text(clean, "#ll-panel .ll-label") == g.labels[-1]


def test_notebook_frame(clean, tmp_path):
    g = load_json(CT_FILE)
    page = tmp_path / "nb.html"
    page.write_text(f"<!doctype html><html><body><h1>cell</h1>{g._repr_html_()}</body></html>",
                    encoding="utf-8")
    clean.get(page.as_uri())
    clean.switch_to.frame(clean.find_element(By.TAG_NAME, "iframe"))
    try:
        wait(clean, "document.getElementById('ll-app').getAttribute('data-ready')")
        assert clean.execute_script("return llExplorer.shown().nodes") == g.n_nodes
    finally:
        clean.switch_to.default_content()


def test_map_and_corpus_pages(clean, tmp_path):
    m = tiny("gpt2", "bridge", tokenizer=True)
    lm = lin_lens.linear_map(m, "w1 w2 w3 w4", "ln_final.hook_normalized", -1)
    open_page(clean, explorer.save_map_html(lm, tmp_path / "map.html", m).as_uri())
    assert len(clean.find_elements(By.CSS_SELECTOR, "#ll-map-table tbody tr")) == 5
    clean.find_elements(By.CSS_SELECTOR, "#ll-token-chips .ll-chip")[1].click()
    detail = clean.find_element(By.ID, "ll-map-detail").text
    assert "token 1" in detail and lin_lens.decode(m, lm).out[1][0].tokens[0] in detail
    index = explorer.save_corpus_html(corpus_run(), tmp_path / "site")
    open_page(clean, index.as_uri())
    rows = clean.find_elements(By.CSS_SELECTOR, "#ll-corpus-table tbody tr")
    assert len(rows) == 4
    ink = clean.execute_script(
        "var c = document.getElementById('ll-sr-figure'), d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data, n = 0;"
        "for (var i = 0; i < d.length; i += 4) if (d[i] < 200 && d[i+2] > d[i]) n++; return n")
    assert ink > 200  # the blue dots, band and median line were drawn
    clean.find_element(By.CSS_SELECTOR, "#ll-corpus-table th[data-key='n_tokens']").click()
    first = clean.find_element(By.CSS_SELECTOR, "#ll-corpus-table tbody tr td").text
    clean.find_element(By.CSS_SELECTOR, "#ll-corpus-table .ll-prompt-link").click()
    wait(clean, "window.llExplorer && document.getElementById('ll-map-table')")
    assert first.isdigit()


def test_served_run_links_to_its_maps(driver, tmp_path):
    """``lin-lens serve``: index → run → a prompt's map, by clicking links; the only requests
    go to the local server."""
    import shutil
    import threading

    from lin_lens.explorer import make_server

    shutil.copytree(corpus_run(), tmp_path / "runs" / "tiny")
    server = make_server(tmp_path, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    clean = driver
    console(driver), requests(driver)
    try:
        clean.get(f"http://127.0.0.1:{server.server_address[1]}/")
        clean.find_element(By.LINK_TEXT, "runs/tiny").click()
        wait(clean, "window.llExplorer && document.getElementById('ll-corpus-table')")
        links = clean.find_elements(By.CSS_SELECTOR, "#ll-corpus-table .ll-prompt-link")
        assert len(links) == 4
        links[0].click()
        wait(clean, "window.llExplorer && document.getElementById('ll-map-table')")
        assert "/run/runs/tiny/" in clean.current_url
        assert len(clean.find_elements(By.CSS_SELECTOR, "#ll-map-table tbody tr")) > 1
        assert console(driver) == []
        local = f"http://127.0.0.1:{server.server_address[1]}/"
        assert all(u.startswith(local) for u in requests(driver))
    finally:
        server.shutdown()
        server.server_close()
