"""Time and memory of an 8-token SmolLM2 attribution graph with neurons (issue 13's target:
≤ 2 min and ≤ 4 GB on 2 CPU cores, float32).

    /usr/bin/time -v python bench/bench_graph.py            # default pruning (0.8 / 0.98)
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import lin_lens  # noqa: E402
from lin_lens.graph import attribution_graph  # noqa: E402

PROMPT = "The bridge out of Marin is the"


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    t0 = time.perf_counter()
    model = lin_lens.load_model("smollm2-135m", dtype=torch.float32)
    t1 = time.perf_counter()
    graph = attribution_graph(model, PROMPT)
    t2 = time.perf_counter()
    print(f"load {t1 - t0:.1f} s, graph {t2 - t1:.1f} s ({len(graph.tokens)} tokens)")
    print(graph)
    print(graph.summary())
    print("relative errors:", graph.node_errors())
    if len(sys.argv) > 1:
        graph.save_json(sys.argv[1])


if __name__ == "__main__":
    main()
