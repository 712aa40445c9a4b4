"""Population-scale benchmark (issue 12, criterion 8): same-run ratios on this machine.

  (i)   corpus: lin_lens.corpus.run over the 100 shipped phrases on SmolLM2 float32 (one process,
        model loaded once, wall time including the load) vs the reference's own workflow on the
        first 10 phrases: one process per prompt that loads the model, computes J with
        torch.autograd.functional.jacobian(vectorize=True, strategy="reverse-mode") on the
        Hugging Face model with its detach points (RMSNorm's rsqrt factor, act(gate), softmax
        weights), its SVD per token and the decoded top singular vectors (W_U / cosine with W_E).
  (ii)  batched direction maps: prompts/s of lin_lens.corpus.batched_contributions at batch 32
        vs batch 1, 16-token prompts, a logit-difference direction.
  (iii) --ray N: the Ray engine with 2 one-thread workers vs the local engine with 2 threads,
        on N phrases (optional).
  (iv)  the measured per-prompt cost extrapolated to one million prompts.

Usage (full size; minutes, run it on an otherwise idle machine):
  python bench/bench_corpus.py --save /tmp/bench_corpus.json [--ray 20]
Quick check that everything runs (tiny random Llama, seconds):
  python bench/bench_corpus.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIN_LENS_PROGRESS", "0")

TINY_WORDS = [f"w{i}" for i in range(48)]


# -- the reference workflow (child process, one per prompt) -----------------------------------

def tiny_hf():
    """A tiny random HF Llama (float32) and the tiny word-level tokenizer."""
    import torch
    import transformers as tf

    from lin_lens.testing import tiny_tokenizer

    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).eval(), tiny_tokenizer(50)


def reference_child(prompt: str, tiny: bool) -> dict:
    import torch

    torch.manual_seed(0)
    if tiny:
        hf, tok = tiny_hf()
    else:
        import lin_lens

        hf, tok = lin_lens.load_hf("smollm2-135m", torch.float32)
    for p in hf.parameters():
        p.requires_grad_(False)
    from bench_engines import _eager, patch_hf_detached  # the reference's detach points

    _eager(hf)  # the patched softmax lives in eager attention (sdpa would skip the detach)
    patch_hf_detached()
    t0 = time.perf_counter()
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = [tok.bos_token_id] + ids if tok.bos_token_id is not None else ids  # as TL prepends
    emb = hf.model.embed_tokens(torch.tensor([ids]))[0].detach()

    def f(e):
        return hf.model(inputs_embeds=e[None]).last_hidden_state[0, -1]

    J = torch.autograd.functional.jacobian(f, emb, vectorize=True, strategy="reverse-mode")
    J = J.permute(1, 0, 2)  # [n, d_out, d_in]
    y = f(emb).detach()
    rel = float((torch.einsum("noi,ni->o", J, emb) - y).norm() / y.norm())
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    stable_rank = (S.pow(2).sum(-1) / S[:, 0].pow(2)).tolist()
    W_U, W_E = hf.lm_head.weight, hf.model.embed_tokens.weight
    decoded = []
    for i in range(J.shape[0]):
        out = (W_U @ U[i][:, :3]).topk(5, dim=0).indices.T.tolist()
        cos = (W_E @ Vh[i][:3].T) / (W_E.norm(dim=-1, keepdim=True) * Vh[i][:3].norm(dim=-1))
        decoded.append((out, cos.topk(5, dim=0).indices.T.tolist()))
    return {"n_tokens": len(ids), "compute_seconds": time.perf_counter() - t0,
            "relative_error": rel, "stable_rank": stable_rank}


# -- (i) corpus vs reference ------------------------------------------------------------------

def prompts_for(tiny: bool, n: int, seed: int = 0) -> list[str]:
    if tiny:
        import random

        rng = random.Random(seed)
        return [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(2, 4)))
                for _ in range(n)]
    from lin_lens.corpus import phrases

    return phrases()[:n]


def spec_for(tiny: bool, dtype: str = "float32"):
    from lin_lens.corpus import LoadSpec

    return LoadSpec("tiny-llama" if tiny else "smollm2-135m", dtype)


def bench_corpus(args) -> dict:
    from lin_lens import corpus

    prompts = prompts_for(args.tiny, args.n_phrases)
    out = tempfile.mkdtemp(prefix="lin_lens_bench_corpus_")
    t0 = time.perf_counter()
    corpus.run(spec_for(args.tiny), prompts, out, progress=False, threads=args.threads)
    total = time.perf_counter() - t0
    rows = corpus.read(out, columns=["wall_time_s", "status", "relative_error"]).to_pylist()
    res = {"n": len(prompts), "total_seconds": total, "per_prompt_seconds": total / len(prompts),
           "compute_median_seconds": statistics.median(r["wall_time_s"] for r in rows),
           "ok": sum(r["status"] == "ok" for r in rows),
           "max_relative_error": max(r["relative_error"] or 0 for r in rows)}
    ref = []
    for p in prompts[:args.n_ref]:
        cmd = [sys.executable, os.path.abspath(__file__), "ref-child", p] + (
            ["--tiny"] if args.tiny else [])
        t1 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t1
        ref.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_seconds": wall})
    res["reference"] = {
        "n": len(ref), "per_prompt_seconds": statistics.mean(r["wall_seconds"] for r in ref),
        "compute_mean_seconds": statistics.mean(r["compute_seconds"] for r in ref),
        "max_relative_error": max(r["relative_error"] for r in ref)}
    res["speedup_per_prompt"] = res["reference"]["per_prompt_seconds"] / res["per_prompt_seconds"]
    return res


# -- (ii) batched direction maps --------------------------------------------------------------

def bench_batched(args) -> dict:
    import torch

    from lin_lens.corpus import batched_contributions

    model = spec_for(args.tiny).load()
    for p in model.parameters():
        p.requires_grad_(False)
    text = " ".join(prompts_for(args.tiny, 400, seed=1))
    ids = _token_ids(model, text)
    n_tok = args.tokens - 1  # + BOS
    bos = [int(model.tokenizer.bos_token_id)] if model.tokenizer.bos_token_id is not None else []
    starts = range(0, len(ids) - n_tok, 7)
    prompts = [bos + ids[s:s + n_tok] for s in starts][:args.batch]
    if len(prompts) < args.batch:
        raise SystemExit(f"need {args.batch} prompts of {args.tokens} tokens, got {len(prompts)}")
    a, b = (3, 4) if args.tiny else (model.tokenizer.encode(" the")[0],
                                     model.tokenizer.encode(" a")[0])
    u = torch.zeros(model.cfg.d_vocab, dtype=next(model.parameters()).dtype)
    u[a], u[b] = 1, -1
    batched_contributions(model, prompts[:2], u)  # warm-up
    t_one, t_all = [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        ones = [batched_contributions(model, [p], u) for p in prompts]
        t_one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        full = batched_contributions(model, prompts, u)
        t_all.append(time.perf_counter() - t0)
    diff = max(float((full.contributions[i] - o.contributions[0]).abs().max()
                     / o.value.abs().clamp_min(1e-30)[0]) for i, o in enumerate(ones))
    one, allb = min(t_one), min(t_all)
    return {"tokens": args.tokens, "batch": args.batch, "batch1_prompts_per_s": len(prompts) / one,
            f"batch{args.batch}_prompts_per_s": len(prompts) / allb, "ratio": one / allb,
            "max_relative_difference": diff}


def _token_ids(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


# -- (iii) Ray vs local ------------------------------------------------------------------------

def bench_ray(args) -> dict:
    import ray

    from lin_lens import corpus

    prompts = prompts_for(args.tiny, args.ray)
    spec = spec_for(args.tiny)
    t0 = time.perf_counter()
    corpus.run(spec, prompts, tempfile.mkdtemp(prefix="lin_lens_bench_local_"), progress=False,
               threads=2)
    local = time.perf_counter() - t0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        corpus.run(spec, prompts, tempfile.mkdtemp(prefix="lin_lens_bench_ray_"), engine="ray",
                   workers=2, threads=1, batch_size=max(1, len(prompts) // 8), progress=False)
        on_ray = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {"n": len(prompts), "local_2_threads_seconds": local,
            "ray_2x1_thread_seconds": on_ray, "overhead": on_ray / local - 1}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "ref-child":
        print(json.dumps(reference_child(sys.argv[2], "--tiny" in sys.argv[3:])))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random Llama: a quick check")
    p.add_argument("--n-phrases", type=int, default=100)
    p.add_argument("--n-ref", type=int, default=10, help="prompts run the reference way")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16, help="tokens per batched prompt (BOS incl.)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--ray", type=int, default=0, metavar="N", help="(iii) on N prompts")
    p.add_argument("--node-cores", type=int, default=64, help="for (iv)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: corpus,batched")
    p.add_argument("--save", default=None, help="write the results as JSON here")
    args = p.parse_args()
    import torch

    res: dict = {"tiny": args.tiny, "threads": torch.get_num_threads()}
    skip = set(args.skip.split(","))
    if "corpus" not in skip:
        c = res["corpus"] = bench_corpus(args)
        r = c["reference"]
        print(f"(i)   lin_lens corpus: {c['n']} prompts in {c['total_seconds']:.1f} s "
              f"({c['per_prompt_seconds']:.2f} s/prompt incl. load; median compute "
              f"{c['compute_median_seconds']:.2f} s; max rel. error "
              f"{c['max_relative_error']:.1e})")
        print(f"      reference workflow: {r['per_prompt_seconds']:.2f} s/prompt over {r['n']} "
              f"processes (compute {r['compute_mean_seconds']:.2f} s; rel. error "
              f"{r['max_relative_error']:.1e})  →  {c['speedup_per_prompt']:.1f}× per prompt")
        cpu_s = c["compute_median_seconds"] * (args.threads or torch.get_num_threads())
        nodes_hours = 1e6 * cpu_s / args.node_cores / 3600
        res["million"] = {"cpu_seconds_per_prompt": cpu_s, "node_hours": nodes_hours}
        print(f"(iv)  1M prompts ≈ {1e6 * cpu_s / 3600:.0f} core-hours ≈ {nodes_hours:.1f} "
              f"node-hours on {args.node_cores}-core nodes ({nodes_hours / 24:.1f} nodes for a "
              "day), from the median per-prompt compute × threads, one prompt per core")
    if "batched" not in skip:
        b = res["batched"] = bench_batched(args)
        print(f"(ii)  batched maps, {b['tokens']} tokens: batch 1 "
              f"{b['batch1_prompts_per_s']:.2f} prompts/s, batch {b['batch']} "
              f"{b[f'batch{args.batch}_prompts_per_s']:.2f} prompts/s  →  {b['ratio']:.1f}× "
              f"(batch vs one-by-one agree to {b['max_relative_difference']:.1e})")
    if args.ray:
        r = res["ray"] = bench_ray(args)
        print(f"(iii) {r['n']} prompts: local 2 threads {r['local_2_threads_seconds']:.1f} s, "
              f"Ray 2×1 thread {r['ray_2x1_thread_seconds']:.1f} s  →  overhead "
              f"{100 * r['overhead']:+.0f} %")
    if args.save:
        with open(args.save, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
