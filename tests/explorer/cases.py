"""Shared material of the explorer's tests: a tiny corpus run, a linear map, the pages' data.

    from tests.explorer.cases import corpus_run, page_data, CT_FILE
"""

from __future__ import annotations

import functools
import json
import re
import tempfile
from pathlib import Path

from lin_lens import corpus
from lin_lens.corpus import LoadSpec
from tests.conftest import BACKENDS

CT_FILE = Path(__file__).parent.parent / "graph" / "data" / "circuit_tracer_dallas.json"
PROMPTS = ["w1 w2 w3", "w4 w5 w6 w7", "w9 w9 w1 w3", ""]  # the empty one is an error row


@functools.cache
def corpus_run() -> Path:
    """Four prompts (one an error row) on tiny-gpt2, every analysis the views read."""
    out = Path(tempfile.mkdtemp(prefix="lin_lens_explorer_run_")) / "run"
    corpus.run(LoadSpec("tiny-gpt2", "float64", BACKENDS[0]), PROMPTS, out,
               analyses=["svd", "decode", "contributions"], k=4, progress=False)
    return out


def page_data(page: str) -> dict:
    """The data a page carries (its ``#ll-data`` script)."""
    m = re.search(r'<script type="application/json" id="ll-data">(.*?)</script>', page, re.S)
    assert m, "no #ll-data script in the page"
    return json.loads(m.group(1))


def page_state(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="ll-state">(.*?)</script>', page, re.S)
    assert m, "no #ll-state script in the page"
    return json.loads(m.group(1))
