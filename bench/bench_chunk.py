"""Rows per batched backward pass vs wall time of one full operator (SmolLM2 f32, CPU).

    LIN_LENS_PROGRESS=0 python bench/bench_chunk.py    # after bench_engines.py prepare
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("LIN_LENS_PROGRESS", "0")
import bench_engines as E  # noqa: E402
import torch  # noqa: E402

from lin_lens import linear_map  # noqa: E402


def main() -> None:
    m = E.tl_model(torch.float32)
    for p in m.parameters():
        p.requires_grad_(False)
    for n in (5, 7, 16):
        toks = E.tokens(n)
        linear_map(m, toks[:, :3], "unembed.hook_in", -1)  # warm-up
        for c in (64, 128, 256, 576):
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                linear_map(m, toks, "unembed.hook_in", -1, chunk_size=c)
                ts.append(time.perf_counter() - t0)
            print(json.dumps({"n": n, "chunk": c, "s": ts}), flush=True)


if __name__ == "__main__":
    main()
