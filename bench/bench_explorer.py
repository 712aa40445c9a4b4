"""The circuit explorer on a big graph (issue 21, criterion 3): 10,000 nodes and 200,000 edges
open in headless Chromium with first render ≤ 2 s and click-to-panel ≤ 200 ms on 2 CPU cores,
and the saved page is at most twice the size of the graph's JSON.

The graph is synthetic and layered like a real one: a 40-token prompt, 26 layers, an error node
per (layer, position), transcoder features receiving about 21 edges each from lower layers at
earlier or equal positions, 10 logits; written as circuit-tracer's JSON (schema 1) and, a second
variant, as lin_lens's export with 10 + 10 decoded tokens on every feature node (the JSON's
``top_tokens`` / ``bottom_tokens``). Each file is read with ``lin_lens.graph.load_json`` and
saved with ``save_html``; the page is opened from ``file://`` by Selenium (the system
chromedriver, the flags of tests/explorer/browser.py).

Measured, per variant: the JSON and page sizes; ``first_render_ms``, the page's own clock from
navigation start to the frame after its first drawing (HTML parsed, data decoded, layout, the
strongest 60,000 edges in view drawn; ``drawn_ms`` when the drawing ended); because a canvas
is rasterised after the script, also ``wall_to_pixels_ms``, from ``driver.get`` until a pixel
read back from the canvas returns (it waits for the rasterisation, plus Selenium's round
trips: an upper bound), and ``wall_to_screenshot_ms`` (a PNG of the first view taken); for
clicks with the mouse on the most-connected nodes, ``click_ms``, from the click event to the
frame after the panel was built; a redraw at rest (60,000 edges) and one while panning or
zooming (20,000), each until its pixels exist; the JavaScript re-pruning at 0.8 / 0.98 and
the first hover's path search.

    python bench/bench_explorer.py                       # full size, both variants
    python bench/bench_explorer.py --nodes 2000 --edges 20000 --repeats 1   # a quick check
    python bench/bench_explorer.py --save /tmp/explorer.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("LIN_LENS_PROGRESS", "0")

from lin_lens.graph import load_json  # noqa: E402


def synthetic(n_nodes: int, n_edges: int, lin_lens_style: bool, seed: int = 0) -> dict:
    """A layered graph file: embeddings, errors, features, logits; edges go up the layers."""
    rng = np.random.default_rng(seed)
    P, L, n_logits = 40, 26, 10
    tokens = [f" tok{i}" for i in range(P)]
    nodes, layer_of, pos_of = [], [], []

    def add(node: dict, layer: int, pos: int) -> None:
        nodes.append(node)
        layer_of.append(layer)
        pos_of.append(pos)

    for p in range(P):
        add({"node_id": f"E_{1000 + p}_{p}", "feature": p, "layer": "E", "ctx_idx": p,
             "feature_type": "embedding", "jsNodeId": f"E_{1000 + p}-{p}", "clerp": "",
             "influence": 0.5, "activation": None}, -1, p)
    for layer in range(L):
        for p in range(P):
            add({"node_id": f"{layer}_-1_{p}", "feature": -1, "layer": str(layer), "ctx_idx": p,
                 "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_-1-{p}",
                 "clerp": "", "influence": 0.6, "activation": None}, layer, p)
    n_feat = n_nodes - len(nodes) - n_logits
    f_layer = np.sort(rng.integers(1, L, n_feat))
    f_pos = rng.integers(0, P, n_feat)
    for k in range(n_feat):
        layer, p, f = int(f_layer[k]), int(f_pos[k]), int(rng.integers(0, 2 ** 15))
        node = {"node_id": f"{layer}_{f * 97 + k}_{p}",
                "feature": f, "layer": str(layer), "ctx_idx": p,
                "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{f}-{p}",
                "clerp": f"feature {k}" if k % 7 == 0 else "",
                "influence": float(rng.uniform(0, 1)), "activation": float(rng.gamma(2, 3))}
        if lin_lens_style:
            node["top_tokens"] = [[f" w{int(t)}", float(s)] for t, s in
                                  zip(rng.integers(0, 49152, 10), -np.sort(-rng.gamma(2, 1, 10)),
                                      strict=True)]
            node["bottom_tokens"] = [[f" w{int(t)}", -float(s)] for t, s in
                                     zip(rng.integers(0, 49152, 10), -np.sort(-rng.gamma(2, 1, 10)),
                                         strict=True)]
        add(node, layer, p)
    probs = np.sort(rng.dirichlet(np.ones(n_logits)))[::-1]
    for j in range(n_logits):
        add({"node_id": f"{L + 1}_{2000 + j}_{P - 1}", "feature": 2000 + j, "layer": str(L + 1),
             "ctx_idx": P - 1, "feature_type": "logit", "jsNodeId": f"L_{2000 + j}-{P - 1}",
             "token_prob": float(probs[j]), "is_target_logit": j == 0,
             "clerp": f'Output " w{j}" (p={probs[j]:.3f})', "influence": None,
             "activation": None}, L + 1, P - 1)
    layer_arr, pos_arr = np.array(layer_of), np.array(pos_of)
    receivers = [i for i, n in enumerate(nodes) if n["feature_type"] in
                 ("cross layer transcoder", "logit")]
    cands = [np.nonzero((layer_arr < layer_arr[i]) & (pos_arr <= pos_arr[i]))[0]
             for i in receivers]
    cap = np.array([len(c) for c in cands])
    want = np.minimum(cap, n_edges // len(receivers))
    while want.sum() < min(n_edges, cap.sum()):  # the low layers have few sources: spread
        room = np.nonzero(want < cap)[0]
        want[room[:int(min(n_edges, cap.sum()) - want.sum())]] += 1
    links = []
    for i, ok, k in zip(receivers, cands, want, strict=True):
        for j in rng.choice(ok, int(k), replace=False):
            links.append({"source": nodes[j]["node_id"], "target": nodes[i]["node_id"],
                          "weight": float(rng.standard_normal() * rng.gamma(1.0, 1.0))})
    meta = {"slug": "bench", "scan": "synthetic", "transcoder_list": [],
            "prompt_tokens": tokens, "prompt": "".join(tokens), "node_threshold": 0.8,
            "schema_version": 1}
    if lin_lens_style:
        meta["lin_lens"] = {"exact": True, "relative_error": 1e-7, "target": [" w0"]}
    return {"metadata": meta, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both",
                                          "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}


def browser(path: Path, clicks: int, profile: Path) -> dict:
    from tests.explorer.browser import click_node, console, start, wait

    d = start(profile)
    try:
        t0 = time.perf_counter()
        d.get(path.as_uri())
        wait(d, "window.llExplorer && llExplorer.ready && llExplorer.timings.first_frame_ms",
             timeout=120)
        wall = (time.perf_counter() - t0) * 1e3
        d.execute_script("document.querySelector('canvas.ll-base').getContext('2d')"
                         ".getImageData(0, 0, 1, 1)")
        pixels = (time.perf_counter() - t0) * 1e3
        d.get_screenshot_as_png()
        shot = (time.perf_counter() - t0) * 1e3
        tm = d.execute_script("return llExplorer.timings")
        # canvas drawing is recorded and rasterised later: reading a pixel back forces it
        flush = ("var t = performance.now(); llExplorer.draw(%s); document.querySelector("
                 "'canvas.ll-base').getContext('2d').getImageData(0, 0, 1, 1);"
                 "return performance.now() - t")
        redraw = [d.execute_script("return " + f"(function(){{{flush % 'false'}}})()")
                  for _ in range(3)]
        moving = [d.execute_script("return " + f"(function(){{{flush % 'true'}}})()")
                  for _ in range(3)]
        degree = d.execute_script(
            "var G = llExplorer.view.G, out = [];"
            "for (var i = 0; i < G.n; i++) out.push(G.inStart[i+1] - G.inStart[i]"
            " + G.outStart[i+1] - G.outStart[i]); return out")
        targets = list(np.argsort(degree)[::-1][:clicks])
        click = []
        for i in targets:
            d.execute_script("llExplorer.center(arguments[0])", int(i))
            time.sleep(0.4)  # let the view settle, as a reader's eye would
            before = len(d.execute_script("return llExplorer.timings.clicks || []"))
            click_node(d, int(i))
            wait(d, f"(llExplorer.timings.clicks || []).length > {before}")
            assert d.execute_script(
                "return document.querySelector('#ll-panel .ll-panel').getAttribute('data-node')"
            ) == str(int(i))
            click.append(d.execute_script("return llExplorer.timings.click_ms"))
        prune = d.execute_script("var t = performance.now(); llExplorer.prune(0.8, 0.98);"
                                 "return performance.now() - t")
        hover = d.execute_script("var v = llExplorer.view, t = performance.now();"
                                 "new LL.prune.Paths(v.G, v.shown, 3).from(0);"  # a token: all
                                 "return performance.now() - t")
        # the readbacks above make Chromium suggest willReadFrequently: ours, not the page's
        msgs = [m for m in console(d) if "willReadFrequently" not in m]
        return {"first_render_ms": tm["first_frame_ms"], "drawn_ms": tm["first_render_ms"],
                "parse_ms": tm.get("parse_ms"), "full_redraw_ms": statistics.median(redraw),
                "redraw_while_moving_ms": statistics.median(moving),
                "build_layout_draw_ms": tm["first_draw_ms"], "wall_to_ready_ms": wall,
                "wall_to_pixels_ms": pixels, "wall_to_screenshot_ms": shot,
                "click_ms": click, "prune_0.8_0.98_ms": prune, "hover_paths_ms": hover,
                "console": msgs}
    finally:
        d.quit()


def run(args: argparse.Namespace, lin_lens_style: bool, tmp: Path) -> dict:
    name = "lin_lens" if lin_lens_style else "circuit-tracer"
    data = synthetic(args.nodes, args.edges, lin_lens_style)
    src = tmp / f"{name}.json"
    src.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    t0 = time.perf_counter()
    g = load_json(src)
    t1 = time.perf_counter()
    page = g.save_html(tmp / f"{name}.html")
    t2 = time.perf_counter()
    out = {"variant": name, "nodes": g.n_nodes, "edges": g.n_edges,
           "json_bytes": src.stat().st_size, "page_bytes": page.stat().st_size,
           "json_indent2_bytes": len(json.dumps(data, ensure_ascii=False, indent=2)),
           "load_json_s": round(t1 - t0, 3), "save_html_s": round(t2 - t1, 3)}
    out["page_over_json"] = round(out["page_bytes"] / out["json_bytes"], 3)
    runs = [browser(page, args.clicks, tmp / f"profile-{name}-{r}")
            for r in range(args.repeats)]
    out["runs"] = runs
    firsts = [r["first_render_ms"] for r in runs]
    clicks = [c for r in runs for c in r["click_ms"]]
    out["first_render_ms_median"] = statistics.median(firsts)
    out["first_render_ms_max"] = max(firsts)
    out["wall_to_pixels_ms_max"] = max(r["wall_to_pixels_ms"] for r in runs)
    out["click_ms_median"] = statistics.median(clicks)
    out["click_ms_max"] = max(clicks)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=10_000)
    p.add_argument("--edges", type=int, default=200_000)
    p.add_argument("--repeats", type=int, default=3, help="page loads per variant")
    p.add_argument("--clicks", type=int, default=5, help="clicks per page load")
    p.add_argument("--variant", choices=("both", "circuit-tracer", "lin_lens"), default="both")
    p.add_argument("--save", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args()
    results = {"cpu_count": os.cpu_count(), "nodes": args.nodes, "edges": args.edges}
    with tempfile.TemporaryDirectory(prefix="bench_explorer_") as d:
        for style in ((False, True) if args.variant == "both"
                      else ((args.variant == "lin_lens"),)):
            r = run(args, style, Path(d))
            results[r["variant"]] = r
            print(f"{r['variant']}: {r['nodes']} nodes, {r['edges']} edges; JSON "
                  f"{r['json_bytes'] / 1e6:.2f} MB, page {r['page_bytes'] / 1e6:.2f} MB "
                  f"(x{r['page_over_json']}); first render {r['first_render_ms_median']:.0f} ms "
                  f"median, {r['first_render_ms_max']:.0f} ms max of {args.repeats} "
                  f"(pixels read back by {r['wall_to_pixels_ms_max']:.0f} ms); click to "
                  f"panel {r['click_ms_median']:.0f} ms median, {r['click_ms_max']:.0f} ms max of "
                  f"{len(r['runs']) * args.clicks}; re-prune "
                  f"{statistics.median(x['prune_0.8_0.98_ms'] for x in r['runs']):.0f} ms; "
                  f"load_json {r['load_json_s']} s, save_html {r['save_html_s']} s", flush=True)
    print(json.dumps(results, indent=1))
    if args.save:
        args.save.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
