"""Paper-scale configurations without weights (issue 14, item 4).

Random-weight models with the exact published configurations of Llama-3.2-3B, Gemma-3-4B (text
model) and Qwen3-14B, wrapped in a TransformerLens ``TransformerBridge`` and measured with
lin_lens's public API at the paper's sizes (J. R. Golden, *Equivalent Linear Mappings of Large
Language Models*, TMLR 2025):

  full8       lin_lens.linear_map(model, tokens, "unembed.hook_in", -1) at 8 tokens: the full
              operator J⁺ [8, d, d] (paper: ~10 s for Llama-3.2-3B float32 on a 24 GB GPU).
  top16_100   lin_lens.top_singular(..., k=16) at 100 tokens (matrix-free, stacked operator).
  top1_400    lin_lens.top_singular(..., k=1) at 400 tokens. NB: the STACKED operator
              [d, 400·d]; lin_lens has no per-source-token matrix-free mode (paper: per-token
              top-1 with JAX Lanczos, 40–80 GB).
  top1tok_400 (opt-in) per-token top-1 the dense way: linear_map at 400 tokens (J is 400·d²,
              15 GB for Llama-3.2-3B float32) + lin_lens.svd(lm, k=1), one SVD per token.

Each measurement runs in its own subprocess (its own model build, one warm-up backward pass at 3
tokens, then the timed call): wall seconds, peak memory (CPU: the process's peak RSS during the
call, VmHWM after resetting it, and the growth over the RSS before it; CUDA:
max_memory_allocated) and the map's own error (linear_map: relative reconstruction error;
top_singular: max ‖Jᵀu − σv‖/σ and the σ error estimate). Random weights (normal, std 0.02, the
configs' initializer_range) give the real shapes and FLOPs, but not a real spectrum: the top
singular values of a random network are close together, so Lanczos may need more products than
on a trained model, up to lin_lens's cap of 6k + 32 each way ("converged=False" then).

On CPU the default depths are 2 and 4 layers; with two or more depths each measurement is fitted
as t(L) = a + b·L and peak(L) = a + b·L and printed at the full depth labelled "EXTRAPOLATED"
(top-k runs that stopped at different product counts: seconds per product fitted instead, times
the deepest run's count, an approximation since the Lanczos algebra grows with the Krylov
size, not with depth). Gemma-3's first five layers are local (sliding window 1024), so reduced
depths have no global layer; below 1024 tokens the two kinds cost the same. A model whose
weights, graph and J cannot fit the free RAM / GPU memory (2 GB margin) is skipped, saying so.

Commands (repository root; .venv/main is TransformerLens 3.9, .venv/tl4 TransformerLens 4.x):

  python bench/paper_scale.py --out /tmp/ps.json     # CPU: all three models, L = 2 and 4
  python bench/paper_scale.py --models llama3.2-3b,gemma3-4b --what full8 --repeats 3
  python bench/paper_scale.py --device cuda                     # full depth on the GPU
  python bench/paper_scale.py --device cuda --what full8,top16_100,top1_400,top1tok_400
  python bench/paper_scale.py --models llama3.2-3b --layers 1 --what full8 --tokens 4  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LIN_LENS_PROGRESS", "0")

GB = 1024**3
HOOK = "unembed.hook_in"  # J⁺: the final normalised residual at the last position (as bench/)

# The published config.json of each model on the Hugging Face Hub, verbatim (legacy rope keys
# included: transformers converts them to rope_parameters as it does for the real checkpoints);
# cross-checked with TransformerLens's hard-coded configs (loading_from_pretrained.py) and the
# parameter counts of the model cards (3.21 B; 3.88 B text = 675 M embedding + 3209 M; 14.8 B,
# 13.2 B non-embedding).
CONFIGS = {
    "smollm2-135m": dict(  # HuggingFaceTB/SmolLM2-135M, config.json (for GPU runs without weights)
        cls="LlamaConfig", architectures=["LlamaForCausalLM"], hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, hidden_act="silu",
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, initializer_range=0.041666,
        bos_token_id=0, eos_token_id=0),
    "llama3.2-3b": dict(  # meta-llama/Llama-3.2-3B, config.json
        cls="LlamaConfig", architectures=["LlamaForCausalLM"], hidden_size=3072,
        intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, hidden_act="silu",
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, initializer_range=0.02,
        bos_token_id=128000, eos_token_id=128001),
    "gemma3-4b": dict(  # google/gemma-3-4b-it, config.json "text_config" (Gemma3ForCausalLM)
        cls="Gemma3TextConfig", architectures=["Gemma3ForCausalLM"], hidden_size=2560,
        intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, vocab_size=262208,
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=1024,
        sliding_window_pattern=6, rope_local_base_freq=10000.0, rope_theta=1000000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, max_position_embeddings=131072,
        rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
        final_logit_softcapping=None, attn_logit_softcapping=None, initializer_range=0.02,
        bos_token_id=2, eos_token_id=1, pad_token_id=0),
    "qwen3-14b": dict(  # Qwen/Qwen3-14B, config.json
        cls="Qwen3Config", architectures=["Qwen3ForCausalLM"], hidden_size=5120,
        intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, hidden_act="silu",
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        rope_scaling=None, tie_word_embeddings=False, attention_bias=False,
        use_sliding_window=False, initializer_range=0.02, bos_token_id=151643,
        eos_token_id=151645),
}
# measurement → (tokens, k); k None: the full operator
WHAT = {"full8": (8, None), "top16_100": (100, 16), "top1_400": (400, 1),
        "top1tok_400": (400, None)}
DEFAULT_WHAT = "full8,top16_100,top1_400"


def n_params(c: dict, layers: int) -> int:
    d, hd = c["hidden_size"], c["head_dim"]
    attn = 2 * d * c["num_attention_heads"] * hd + 2 * d * c["num_key_value_heads"] * hd
    emb = c["vocab_size"] * d * (1 if c["tie_word_embeddings"] else 2)
    return emb + layers * (attn + 3 * d * c["intermediate_size"])


def need_bytes(c: dict, layers: int, what: str, itemsize: int, n: int | None = None) -> int:
    """Weights + kept forward graph (lin_lens.maps.budget.graph_bytes' formula) + J; a floor,
    not the peak (batched VJP rows come on top)."""
    k = WHAT[what][1]
    n = n or WHAT[what][0]
    d, h = c["hidden_size"], c["num_attention_heads"]
    graph = layers * (n * (12 * d + 4 * c["intermediate_size"]) + h * n * n)
    J = n * d * d if k is None else 0
    if what == "top1tok_400":  # lin_lens.svd's float64 sum of squares: J.double().pow(2)
        J *= 1 + 2 * 8 // itemsize
    return (n_params(c, layers) + graph + J) * itemsize


# -- child: one measurement ---------------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _available(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    from lin_lens.maps.budget import available_bytes

    return available_bytes()


def build(name: str, layers: int, device: str, dtype):
    """(TransformerBridge, seconds to build) for a random-weight model of ``name``'s config."""
    import torch
    import transformers as tf

    from lin_lens._tl import TransformerBridge
    from lin_lens.testing import tiny_tokenizer

    c = dict(CONFIGS[name])
    cfg = getattr(tf, c.pop("cls"))(**{**c, "num_hidden_layers": layers})
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: no host copy of a 60 GB model
        hf = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager")
    hf.to(device).eval()
    tok = tiny_tokenizer(cfg.vocab_size)  # word-level, full vocab size: we feed token ids
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    model = TransformerBridge.boot_transformers(f"random-{name}", hf_model=hf, tokenizer=tok,
                                                device=device, dtype=dtype)
    shutil.rmtree(tok.name_or_path, ignore_errors=True)  # tiny_tokenizer's temporary folder
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, time.perf_counter() - t0


def measure(name: str, layers: int, what: str, device: str, dtype_s: str, repeats: int,
            tokens_override: int | None) -> dict:
    import torch

    import lin_lens

    dtype = getattr(torch, dtype_s)
    c = CONFIGS[name]
    n, k = WHAT[what]
    n = tokens_override or n
    out = dict(model=name, layers=layers, what=what, tokens=n, k=k, device=device,
               dtype=dtype_s, threads=torch.get_num_threads(), full_layers=c["num_hidden_layers"],
               params=n_params(c, layers), torch=torch.__version__)
    need = need_bytes(c, layers, what, torch.empty((), dtype=dtype).element_size(), n)
    avail = _available(device)
    out.update(need_floor_gb=need / GB, available_gb=avail / GB)
    if need > avail - 2 * GB:
        out["skipped"] = (f"needs at least {need / GB:.1f} GB (weights + graph + J), "
                          f"{avail / GB:.1f} GB available (2 GB margin)")
        return out
    cuda = device.startswith("cuda")
    budget = max(avail - GB, GB)  # lin_lens's default (min(RAM/2, 8 GB)) is for laptops
    model, out["build_seconds"] = build(name, layers, device, dtype)
    from importlib import metadata

    out["transformer_lens"] = metadata.version("transformer_lens")
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, c["vocab_size"], (1, n), generator=g)
    d = c["hidden_size"]
    # warm-up: one backward pass at 3 tokens (library init, allocator, cuBLAS)
    lin_lens.linear_map(model, toks[:, :3], HOOK, -1, progress=False, max_memory=budget,
                        direction=torch.ones(d, dtype=dtype, device=device))

    def run():
        if k is not None:
            return lin_lens.top_singular(model, toks, HOOK, -1, k=k, progress=False,
                                         max_memory=budget)
        t = time.perf_counter()
        lm = lin_lens.linear_map(model, toks, HOOK, -1, progress=False, max_memory=budget)
        if cuda:
            torch.cuda.synchronize()
        out["map_seconds"] = time.perf_counter() - t
        print(f"linear_map: {out['map_seconds']:.2f} s", file=sys.stderr, flush=True)
        return (lm, lin_lens.svd(lm, k=1)) if what == "top1tok_400" else (lm, None)

    secs = []
    for _ in range(repeats):
        res = None  # free the previous result before the next run
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _status_kb("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        t0 = time.perf_counter()
        res = run()
        if cuda:
            torch.cuda.synchronize()
        secs.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
        out.update(before_gb=before / GB, peak_gb=peak / GB, extra_gb=(peak - before) / GB)
    out["seconds_all"] = secs
    out["seconds"] = sorted(secs)[len(secs) // 2]
    if k is not None:
        i = res.info
        out.update(error=max(i["rel_residuals"]), error_kind="max |J'u - s v| / s",
                   sigma_error_estimate=max(i["rel_error_estimate"]), n_jvp=i["n_jvp"],
                   n_vjp=i["n_vjp"], iterations=i["iterations"], converged=i["converged"],
                   block=i["block"], sigma=[float(s) for s in res.S])
        out["seconds_per_product"] = out["seconds"] / (i["n_jvp"] + i["n_vjp"])
    else:
        lm, sv = res
        out.update(error=float(lm.relative_error), error_kind="reconstruction rel. error",
                   engine=lm.meta.get("engine") if hasattr(lm, "meta") else None)
        if sv is not None:
            out["sigma1_per_token_max"] = float(sv.S[..., 0].max())
    return out


# -- parent -------------------------------------------------------------------------------------

def child(args, name: str, layers: int, what: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", name, str(layers), what,
           "--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats)]
    if args.tokens:
        cmd += ["--tokens", str(args.tokens)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:  # a row saying so, and the child's last words
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return dict(model=name, layers=layers, what=what,
                    error_text=f"{err[-2000:]}\ntimed out after {args.timeout:.0f} s")
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        return dict(model=name, layers=layers, what=what, error_text=p.stderr[-3000:])
    r = json.loads(lines[-1])
    r["wall_with_build"] = time.perf_counter() - t0
    return r


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares a, b of y = a + b·x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs)
    return my - b * mx, b


def extrapolate(results: list[dict]) -> list[dict]:
    """Per (model, measurement) with ≥ 2 depths: linear in L, evaluated at the full depth."""
    rows = []
    keys = dict.fromkeys((r["model"], r["what"]) for r in results)
    for name, what in keys:
        rs = sorted((r for r in results if (r["model"], r["what"]) == (name, what)
                     and "seconds" in r), key=lambda r: r["layers"])
        if len({r["layers"] for r in rs}) < 2:
            continue
        L = rs[0]["full_layers"]
        xs = [r["layers"] for r in rs]
        prods = {r.get("n_jvp", 0) + r.get("n_vjp", 0) for r in rs}
        if len(prods) > 1:  # Lanczos stopped at different sizes: scale per product (approx.)
            a, b = fit(xs, [r["seconds_per_product"] for r in rs])
            prod = rs[-1]["n_jvp"] + rs[-1]["n_vjp"]
            secs, how = (a + b * L) * prod, f"per product x {prod} products of the deepest run"
        else:
            a, b = fit(xs, [r["seconds"] for r in rs])
            secs, how = a + b * L, "t = a + b*L" + (f", {prods.pop()} products" if rs[0]["k"]
                                                      else "")
        if b <= 0:  # noise larger than the per-layer cost (tiny smoke sizes, a busy machine)
            secs, how = None, how + "; time slope <= 0, noise: not extrapolated"
        pa, pb = fit(xs, [r["peak_gb"] for r in rs])
        rows.append(dict(model=name, layers=L, what=what, tokens=rs[-1]["tokens"],
                         seconds=secs, peak_gb=pa + pb * L, extrapolated=True,
                         from_layers=xs, seconds_per_layer=b, peak_gb_per_layer=pb, how=how,
                         error=None))
    return rows


def table(results: list[dict], extra: list[dict]) -> str:
    head = (f"{'model':<12} {'layers':>6} {'measurement':<12} {'tokens':>6} {'seconds':>9} "
            f"{'peak GB':>8} {'+GB':>6} {'error':>9}  note")
    lines = [head, "-" * len(head)]
    for r in results + extra:
        note = ""
        if "skipped" in r:
            note = "SKIPPED: " + r["skipped"]
        elif "error_text" in r:
            note = "FAILED: " + r["error_text"].strip().splitlines()[-1][:80]
        elif r.get("extrapolated"):
            note = f"EXTRAPOLATED from L={r['from_layers']} ({r['how']})"
        elif r.get("k"):
            note = (f"{r['n_jvp']}+{r['n_vjp']} products, converged={r['converged']}"
                    + (" (stacked operator)" if r["k"] == 1 else ""))
        elif r.get("engine"):
            note = f"engine={r['engine']}"

        def f(key, fmt, r=r):
            v = r.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-".rjust(int(fmt[0]))
        lines.append(f"{r['model']:<12} {r['layers']:>6} {r['what']:<12} {r.get('tokens', '-'):>6}"
                     f" {f('seconds', '9.2f')} {f('peak_gb', '8.2f')} {f('extra_gb', '6.2f')}"
                     f" {f('error', '9.1e')}  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama3.2-3b,gemma3-4b,qwen3-14b")
    ap.add_argument("--layers", default=None,
                    help="comma-separated depths, or 'full' (default: 2,4 on CPU, full on CUDA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--what", default=DEFAULT_WHAT, help=f"from {', '.join(WHAT)}")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON results (appended as they come)")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per measurement")
    ap.add_argument("--tokens", type=int, default=None, help=argparse.SUPPRESS)  # smoke tests
    ap.add_argument("--_child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        name, layers, what = args._child
        print(json.dumps(measure(name, int(layers), what, args.device, args.dtype,
                                 args.repeats, args.tokens)), flush=True)
        return
    models = [m for m in args.models.split(",") if m]
    whats = [w for w in args.what.split(",") if w]
    bad = [m for m in models if m not in CONFIGS] + [w for w in whats if w not in WHAT]
    if bad:
        ap.error(f"unknown {bad}; models: {list(CONFIGS)}, measurements: {list(WHAT)}")
    layers_arg = args.layers or ("full" if args.device.startswith("cuda") else "2,4")
    print(f"paper_scale: device={args.device} dtype={args.dtype} hook={HOOK} "
          f"depths={layers_arg}; random weights, exact published shapes", flush=True)
    print("\n".join(table([], []).splitlines()[:2]), flush=True)
    results: list[dict] = []
    for name in models:
        full = CONFIGS[name]["num_hidden_layers"]
        depths = [full if x == "full" else int(x) for x in layers_arg.split(",")]
        for layers in depths:
            for what in whats:
                r = child(args, name, layers, what)
                results.append(r)
                print(table([r], []).splitlines()[-1], flush=True)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump({"results": results, "extrapolated": extrapolate(results)},
                                  f, indent=1)
    extra = extrapolate(results)
    print("\n" + table(results, extra))
    if extra:
        print("\nRows marked EXTRAPOLATED are linear fits over the measured depths, evaluated "
              "at the published depth; they were not run.")
    if any(r.get("k") == 1 for r in results):
        print("top1_400 is the top singular triplet of the stacked operator [d, 400*d]; "
              "per-token top-1 (the paper's) is top1tok_400 (dense J).")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": results, "extrapolated": extra}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
