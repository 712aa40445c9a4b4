"""The README's screenshot of the circuit explorer: SmolLM2-135M's attribution graph of "The
bridge out of Marin is the" (float32, default pruning): the head on the strongest path clicked
(its panel: edges, what it writes) and the mouse on that path's input token (its strongest
paths to the target lit).

    python bench/explorer_screenshot.py                          # builds the graph (~1-2 min)
    python bench/explorer_screenshot.py --graph marin.pt         # a graph saved with .save()
    python bench/explorer_screenshot.py --out docs/explorer.png
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIN_LENS_PROGRESS", "0")

PROMPT = "The bridge out of Marin is the"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--graph", type=Path, default=None, help="a saved AttributionGraph (.pt)")
    p.add_argument("--out", type=Path, default=Path("bench/results/explorer_smollm2.png"))
    p.add_argument("--size", default="1600,950", help="window width,height")
    args = p.parse_args()
    import lin_lens
    from lin_lens.graph import AttributionGraph
    from tests.explorer.browser import click_node, start, wait

    if args.graph is None:
        model = lin_lens.load_model("smollm2-135m")
        t0 = time.perf_counter()
        g = lin_lens.attribution_graph(model, PROMPT)
        print(f"graph in {time.perf_counter() - t0:.0f} s: {g}")
    else:
        g = AttributionGraph.load(args.graph)
    _, path = g.top_paths(1)[0]  # the strongest path: hover its source, click its head
    token = g.labels.index(path[0])
    head = next(g.labels.index(lab) for lab in path if g.kinds[g.labels.index(lab)] == "head")
    with tempfile.TemporaryDirectory() as d:
        page = g.save_html(Path(d) / "marin.html")
        w, h = (int(x) for x in args.size.split(","))
        driver = start(Path(d) / "profile", w, h)
        try:
            driver.get(page.as_uri())
            wait(driver, "window.llExplorer && llExplorer.ready")
            click_node(driver, head)
            wait(driver, f"document.querySelector('#ll-panel .ll-panel[data-node=\"{head}\"]')")
            from selenium.webdriver.common.action_chains import ActionChains
            from selenium.webdriver.common.by import By

            driver.execute_script("llExplorer.fit()")
            xy = driver.execute_script("return llExplorer.nodeScreen(arguments[0])", token)
            canvas = driver.find_element(By.ID, "ll-canvas")
            ActionChains(driver).move_to_element_with_offset(
                canvas, int(xy["x"] - canvas.size["width"] / 2),
                int(xy["y"] - canvas.size["height"] / 2)).perform()
            wait(driver, "llExplorer.view.paths")
            time.sleep(0.5)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
            from PIL import Image  # matplotlib's dependency: a 256-colour PNG, ~4x smaller

            Image.open(args.out).convert("RGB").quantize(256).save(args.out, optimize=True)
        finally:
            driver.quit()
    print(f"{args.out}: {g.labels[head]} clicked, paths from {g.labels[token]} lit")


if __name__ == "__main__":
    main()
