"""The paper's long-context headline and a same-run ratio on a GPU (issue 25): one prepared run.

Random-weight models with the published configurations (bench/paper_scale.py's CONFIGS, full
depth, float32, TF32 off inside lin_lens and in the reference), in this order, each step only if
the time left allows it (``--budget`` seconds in all):

1. **ratio**: the reference as it really runs — ``torch.autograd.functional.jacobian(f,
   x, vectorize=True, strategy="reverse-mode")`` on the Hugging Face Llama with the paper's detach
   points (norm scale, act(gate), softmax weights; eager attention) — against
   ``lin_lens.linear_map(bridge, tokens, "unembed.hook_in", -1)``, three interleaved pairs at 8
   tokens, then at 64; both operators compared entry by entry.
2. **per-token top-1 at 400 tokens**, Llama-3.2-3B then Gemma-3-4B: the full operator
   (``linear_map``, J is 400·d²) and ``lin_lens.svd(lm, k=1)`` (each token's top triplet from its
   Gram matrix): seconds and peak GPU memory; accuracy against a dense float64 SVD
   (``torch.linalg.svd``) of a few tokens' J_i.

Results: ``$OUT/gpu_headline.json`` (one record per measurement) and the log on stdout.

  python bench/gpu_headline.py --device cuda --budget 480          # on the GPU
  python bench/gpu_headline.py --layers 1 --n-ratio 4,6 --n-top 12 --budget 120   # CPU smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIN_LENS_PROGRESS", "0")

import torch  # noqa: E402

from bench.paper_scale import CONFIGS, build  # noqa: E402

HOOK = "unembed.hook_in"
T0 = time.perf_counter()


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s]", *a, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


@contextlib.contextmanager
def reference_patch():
    """The paper's detach points in Hugging Face's Llama modules
    (:func:`bench.bench_engines.patch_hf_detached`), for the reference's calls only (the Bridge
    wraps the same classes: the originals come back after each call)."""
    from transformers.models.llama import modeling_llama as ml

    from bench.bench_engines import patch_hf_detached

    saved = patch_hf_detached()
    prec = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference at full float32 too
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        ml.LlamaRMSNorm.forward, ml.LlamaMLP.forward, ml.eager_attention_forward = saved
        torch.backends.cuda.matmul.allow_tf32 = prec[0]
        torch.set_float32_matmul_precision(prec[1])


def hf_reference(name: str, layers: int | None, dev: str) -> tuple[Any, dict]:
    """The reference's Hugging Face model of config ``name`` (eager attention, float32, frozen
    parameters) with the same random weights as :func:`bench.paper_scale.build` gives the
    Bridge (seed 0), and the config's fields."""
    import transformers as tf

    c = dict(CONFIGS[name])
    cfg = getattr(tf, c.pop("cls"))(**{**c, "num_hidden_layers": layers
                                       or c["num_hidden_layers"]})
    torch.manual_seed(0)
    with torch.device(dev):
        hf = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                                 attn_implementation="eager")
    hf.eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    return hf, c


def ratio(args, records: list) -> None:
    import lin_lens

    name, dev = "llama3.2-3b", args.device
    bridge, secs = build(name, args.layers or CONFIGS[name]["num_hidden_layers"], dev,
                         torch.float32)
    hf, c = hf_reference(name, args.layers, dev)
    log(f"built {name} Bridge ({secs:.1f} s) and its Hugging Face reference")
    g = torch.Generator().manual_seed(0)
    budget = int(torch.cuda.mem_get_info()[0] * 0.8) if dev.startswith("cuda") else None
    for n in args.n_ratio:
        toks = torch.randint(0, c["vocab_size"], (1, n), generator=g).to(dev)
        emb = hf.model.embed_tokens(toks)[0].detach()

        def f(e):
            return hf.model(inputs_embeds=e[None]).last_hidden_state[0, -1]

        with reference_patch():  # warm-ups
            torch.autograd.functional.jacobian(f, emb[:3], vectorize=True,
                                               strategy="reverse-mode")
        lin_lens.linear_map(bridge, toks[:, :3], HOOK, -1, progress=False, max_memory=budget)
        for rep in range(3):
            if time.perf_counter() - T0 > args.budget * 0.45:
                log(f"ratio at {n} tokens: stopped after {rep} pairs (time)")
                break
            rec = {"what": "ratio", "model": name, "tokens": n, "pair": rep}
            peak_reset(dev)
            with reference_patch():
                t = time.perf_counter()
                Jr = torch.autograd.functional.jacobian(f, emb, vectorize=True,
                                                        strategy="reverse-mode")
                sync(dev)
                rec["reference_s"] = time.perf_counter() - t
            rec["reference_peak_gb"] = peak_gb(dev)
            peak_reset(dev)
            t = time.perf_counter()
            lm = lin_lens.linear_map(bridge, toks, HOOK, -1, progress=False, max_memory=budget)
            sync(dev)
            rec["lin_lens_s"] = time.perf_counter() - t
            rec["lin_lens_peak_gb"] = peak_gb(dev)
            Jr = Jr.permute(1, 0, 2)  # [n, d_out, d_in]
            rec["ratio"] = rec["reference_s"] / rec["lin_lens_s"]
            rec["J_rel_diff"] = float((lm.J - Jr).norm() / Jr.norm())
            rec["lin_lens_rel_error"] = float(lm.relative_error)
            rec["engine"] = lm.meta.get("engine")
            records.append(rec)
            log(json.dumps(rec))
            del Jr, lm
    del bridge, hf
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()


def top1(args, name: str, records: list) -> None:
    import lin_lens

    dev, n = args.device, args.n_top
    bridge, secs = build(name, args.layers or CONFIGS[name]["num_hidden_layers"], dev,
                         torch.float32)
    log(f"built {name} ({secs:.1f} s)")
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, CONFIGS[name]["vocab_size"], (1, n), generator=g).to(dev)
    budget = int(torch.cuda.mem_get_info()[0] * 0.8) if dev.startswith("cuda") else None
    lin_lens.linear_map(bridge, toks[:, :3], HOOK, -1, progress=False, max_memory=budget)
    rec = {"what": "per-token top-1", "model": name, "tokens": n}
    peak_reset(dev)
    t = time.perf_counter()
    lm = lin_lens.linear_map(bridge, toks, HOOK, -1, progress=False, max_memory=budget)
    sync(dev)
    rec["map_s"] = time.perf_counter() - t
    t2 = time.perf_counter()
    sv = lin_lens.svd(lm, k=1)
    sync(dev)
    rec["top1_s"] = time.perf_counter() - t2
    rec["seconds"] = time.perf_counter() - t
    rec["peak_gb"] = peak_gb(dev)
    rec["map_rel_error"] = float(lm.relative_error)
    S = sv.S[:, 0]
    checks = []
    for i in sorted({0, n // 2, n - 1}):
        Ji = lm.J[i].double()
        U, Sd, Vh = torch.linalg.svd(Ji)
        v = sv.Vh[i, 0].double()
        checks.append({"token": i, "sigma1": float(Sd[0]),
                       "sigma1_rel_err": float(abs(S[i].double() - Sd[0]) / Sd[0]),
                       "v_alignment": float((v @ Vh[0]).abs()),
                       "gap": float(Sd[1] / Sd[0])})
    rec["checks"] = checks
    rec["sigma1_min_max"] = [float(S.min()), float(S.max())]
    records.append(rec)
    log(json.dumps(rec))
    del lm, sv, bridge
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=None, help="depth (default: full)")
    ap.add_argument("--n-ratio", default="8,64")
    ap.add_argument("--n-top", type=int, default=400)
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for everything")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"),
                                                  "gpu_headline.json"))
    ap.add_argument("--skip", default="", help="comma list: ratio, llama, gemma")
    args = ap.parse_args(argv)
    args.n_ratio = [int(x) for x in args.n_ratio.split(",") if x]
    skip = set(args.skip.split(","))
    records: list = []
    if args.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        log(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
    steps = [("ratio", lambda: ratio(args, records)),
             ("llama", lambda: top1(args, "llama3.2-3b", records)),
             ("gemma", lambda: top1(args, "gemma3-4b", records))]
    for i, (name, fn) in enumerate(steps):
        if name in skip:
            continue
        left = args.budget - (time.perf_counter() - T0)
        if i and left < args.budget * 0.3:
            log(f"{name}: skipped, {left:.0f} s left of {args.budget:.0f}")
            records.append({"what": name, "skipped": f"{left:.0f} s left"})
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - record and go on to the next measurement
            log(f"{name} FAILED: {type(e).__name__}: {e}")
            records.append({"what": name, "failed": f"{type(e).__name__}: {e}"})
        with open(args.out, "w") as fh:
            json.dump(records, fh, indent=1)
    log(f"done; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
