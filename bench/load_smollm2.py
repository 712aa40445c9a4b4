"""Loading time and peak memory of SmolLM2-135M on each TransformerLens backend and dtype.

Each configuration runs in a fresh Python process, so its peak RSS is its own:

    python bench/load_smollm2.py            # all backends this TransformerLens has, fp32 + fp64
    python bench/load_smollm2.py --fold-ln  # with TransformerLens weight processing

Columns: ``import`` (torch, transformers, TransformerLens, lin_lens), ``load_hf`` (GGUF →
dequantized Hugging Face model + tokenizer), ``to TL`` (HookedTransformer / TransformerBridge
build), ``first fwd`` (one 8-token forward pass), ``total``; each as wall-clock / CPU seconds
(CPU = this process's user + system time, the robust number on a shared machine); ``peak RSS``
of the whole process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _one(backend: str, dtype_name: str, fold_ln: bool) -> dict:
    marks = [(time.perf_counter(), time.process_time())]
    import torch

    from lin_lens import models

    marks.append((time.perf_counter(), time.process_time()))
    dtype = getattr(torch, dtype_name)
    hf, tok = models.load_hf("smollm2-135m", dtype)
    marks.append((time.perf_counter(), time.process_time()))
    m = models.load_model("smollm2-135m", dtype=dtype, backend=backend, fold_ln=fold_ln,
                          hf_model=hf, tokenizer=tok)
    marks.append((time.perf_counter(), time.process_time()))
    with torch.no_grad():
        m(m.to_tokens("The bridge out of Marin is the"))
    marks.append((time.perf_counter(), time.process_time()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB on Linux
    row = {"backend": backend, "dtype": dtype_name, "fold_ln": fold_ln, "peak RSS MiB": peak}
    for k, phase in enumerate(["import", "load_hf", "to TL", "first fwd"]):
        row[phase] = (marks[k + 1][0] - marks[k][0], marks[k + 1][1] - marks[k][1])
    row["total"] = (marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fold-ln", action="store_true")
    ap.add_argument("--backends", nargs="*", default=None)
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--one", nargs=2, metavar=("BACKEND", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one[0], args.one[1], args.fold_ln)))
        return

    from lin_lens._tl import HAS_HOOKED, TL_VERSION

    backends = args.backends or (["hooked", "bridge"] if HAS_HOOKED else ["bridge"])
    rows = []
    for backend in backends:
        for dt in args.dtypes:
            cmd = [sys.executable, __file__, "--one", backend, dt] + (
                ["--fold-ln"] if args.fold_ln else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    try:
        from importlib.metadata import version

        tl = version("transformer_lens")
    except Exception:  # noqa: BLE001 - only a label
        tl = TL_VERSION
    print(f"SmolLM2-135M load, transformer_lens {tl}, fold_ln={args.fold_ln}, "
          f"{os.cpu_count()} CPUs (seconds wall / CPU; each row a fresh process; load average "
          f"{os.getloadavg()[0]:.1f})")
    cols = ["backend", "dtype", "import", "load_hf", "to TL", "first fwd", "total",
            "peak RSS MiB"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [r[c] if isinstance(r[c], str) else f"{r[c]:.0f}" if c == "peak RSS MiB"
                 else f"{r[c][0]:.1f} / {r[c][1]:.1f}" for c in cols]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
