"""Rows per backward pass on a GPU (issue 24/25 follow-up): ``linear_map``'s chunk size against
the reference, on random-weight Llama-3.2-3B (full depth, float32), at 8 and 64 tokens.

The CPU-tuned default (64 rows per pass, fewer at long inputs) leaves a GPU mostly idle: the
reference runs all d_model rows in one vmapped pass. This times ``linear_map(chunk_size=c)`` for
a few ``c`` (and the default) beside the reference, two repeats each, in one run.

  python bench/gpu_chunks.py --device cuda --budget 300          # on the GPU
  python bench/gpu_chunks.py --layers 1 --n 4 --chunks 8,32 --budget 60   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIN_LENS_PROGRESS", "0")

import torch  # noqa: E402

from bench.gpu_headline import (  # noqa: E402
    HOOK,
    T0,
    hf_reference,
    log,
    peak_gb,
    peak_reset,
    reference_patch,
    sync,
)
from bench.paper_scale import CONFIGS, build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--n", default="8,64", help="token counts")
    ap.add_argument("--chunks", default="0,256,1024,3072", help="0: the default")
    ap.add_argument("--budget", type=float, default=300.0)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"),
                                                  "gpu_chunks.json"))
    args = ap.parse_args()
    import lin_lens

    name, dev = "llama3.2-3b", args.device
    layers = args.layers or CONFIGS[name]["num_hidden_layers"]
    bridge, _ = build(name, layers, dev, torch.float32)
    hf, c = hf_reference(name, layers, dev)
    g = torch.Generator().manual_seed(0)
    records: list[dict] = []
    for n in [int(v) for v in args.n.split(",")]:
        toks = torch.randint(0, c["vocab_size"], (1, n), generator=g).to(dev)
        emb = hf.model.embed_tokens(toks)[0].detach()

        def f(e):
            return hf.model(inputs_embeds=e[None]).last_hidden_state[0, -1]

        with reference_patch():
            torch.autograd.functional.jacobian(f, emb[:3], vectorize=True,
                                               strategy="reverse-mode")
        lin_lens.linear_map(bridge, toks[:, :3], HOOK, -1, progress=False)
        for rep in range(2):
            if time.perf_counter() - T0 > args.budget:
                break
            peak_reset(dev)
            with reference_patch():
                t = time.perf_counter()
                torch.autograd.functional.jacobian(f, emb, vectorize=True,
                                                   strategy="reverse-mode")
                sync(dev)
            rec = {"tokens": n, "rep": rep, "what": "reference",
                   "seconds": time.perf_counter() - t, "peak_gb": peak_gb(dev)}
            log(json.dumps(rec))
            records.append(rec)
            for ch in [int(v) for v in args.chunks.split(",")]:
                if time.perf_counter() - T0 > args.budget:
                    break
                peak_reset(dev)
                t = time.perf_counter()
                lm = lin_lens.linear_map(bridge, toks, HOOK, -1, progress=False,
                                         chunk_size=ch or None)
                sync(dev)
                rec = {"tokens": n, "rep": rep, "what": "linear_map", "chunk_size": ch or "default",
                       "seconds": time.perf_counter() - t, "peak_gb": peak_gb(dev),
                       "rel_error": float(lm.relative_error)}
                log(json.dumps(rec))
                records.append(rec)
                del lm
    with open(args.out, "w") as fh:
        json.dump(records, fh, indent=1)
    log("done;", args.out)


if __name__ == "__main__":
    main()
