"""Side-by-side benchmark of detached-Jacobian engines on SmolLM2-135M (CPU).

Engines (each measured in its own subprocess, so each gets its own peak RSS):

  hf_vec       THE BASELINE, the reference as it really runs (its src/JacobianAnalyzer.py):
               torch.autograd.functional.jacobian(f, x, vectorize=True, strategy="reverse-mode")
               on the raw Hugging Face LlamaForCausalLM (eager attention) with RMSNorm's rsqrt
               factor, act(gate) and the softmax weights detached by patching the HF forwards
               *in this script only*; input embeddings [n, d] → final normalised hidden state at
               the last position.
  hf_jacobian  extra row, labelled: the same with jacobian's default vectorize=False (one
               backward pass per output row; several times slower than hf_vec).
  hf_rows      the same function, R single-row VJPs timed (what jacobian(vectorize=False) does
               per row) → extrapolated full time where the full baseline would exceed the budget.
  jacrev       torch.func.jacrev (chunk_size=64) on the TL HookedTransformer with lin_lens's
               detach hooks, same input/output.
  jr_rows      the same for the first R output rows → per-row cost (extrapolated full time).
  linear_map   lin_lens.linear_map(model, tokens, "unembed.hook_in", -1) (reverse engine).
  lm_rows      R rows of the same via out_index → per-row cost (extrapolated full time).
  sweep        lin_lens.operators_at_hooks over every resid_post, attn_out, mlp_out
               at the last position (engine="forward"), all 90 operators with constants.
  topk         lin_lens.top_singular(k=16) at the last position (matrix-free).
  gemm         the machine's matmul rate on the shapes a detached VJP multiplies.

Usage:
  python bench/bench_engines.py one ENGINE N DTYPE [--rows R] [--save PATH]   (child)
  python bench/bench_engines.py plan PLAN.json                                 (parent)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402
import torch  # noqa: E402

CACHE = os.environ.get("LIN_LENS_BENCH_CACHE", "/tmp/lin_lens_bench")
DT = {"f32": torch.float32, "f64": torch.float64}
D, DM, L = 576, 1536, 30  # SmolLM2-135M: d_model, d_mlp, layers
KV = 192  # 3 kv heads × 64


def vjp_flops(n: int) -> float:
    """FLOPs (2 × multiply-adds) of the matmuls one detached VJP must do at n tokens: q and k feed
    only the frozen pattern and the gate branch only the frozen act(gate), so the gradient passes
    W_v, W_o, W_up, W_down (per token) and patternᵀ·grad (heads·n²·d_head = n²·d per layer)."""
    per_tok = D * KV + D * D + 2 * D * DM
    attn = n * n * D  # pattern^T · grad over 9 heads × 64
    return 2.0 * L * (n * per_tok + attn)


def fwd_flops(n: int) -> float:
    """A full forward of the frozen network (what the replay does per column)."""
    per_tok = 2 * D * D + 2 * D * KV + 3 * D * DM
    attn = 2 * n * n * D
    return 2.0 * L * (n * per_tok + attn)


# -- models --------------------------------------------------------------------------------------

def hf_model(dtype):
    os.makedirs(CACHE, exist_ok=True)
    p = f"{CACHE}/hf_{dtype}.pt"
    if os.path.exists(p):
        hf = torch.load(p, weights_only=False)
        tok = torch.load(f"{CACHE}/tok.pt", weights_only=False)
        _eager(hf)
        return hf, tok
    hf, tok = C.load_hf(torch.float32)
    hf = hf.to(dtype)
    torch.save(hf, p)
    torch.save(tok, f"{CACHE}/tok.pt")
    _eager(hf)  # as when loaded from the cache: the patched detaches live in the eager path
    return hf, tok


def _eager(hf) -> None:
    if hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation("eager")
    hf.config._attn_implementation = "eager"
    assert hf.config._attn_implementation == "eager"


def tl_model(dtype):
    os.makedirs(CACHE, exist_ok=True)
    p = f"{CACHE}/tl_{dtype}.pt"
    if os.path.exists(p):
        return torch.load(p, weights_only=False)
    m = C.load_hooked(torch.float32, hf_model(torch.float32))
    m = m.to(dtype)
    torch.save(m, p)
    return m


def tokens(n):
    tok = torch.load(f"{CACHE}/tok.pt", weights_only=False) if os.path.exists(
        f"{CACHE}/tok.pt") else hf_model(torch.float32)[1]
    return C.prompt_tokens(tok, n)


def patch_hf_detached() -> tuple:
    """Detach the norm scale, act(gate) and softmax weights in the HF Llama modules (bench only).
    Norms and softmax are computed in the model dtype (HF upcasts to fp32, which would be a
    downcast in fp64 and cost the fp64 comparison its precision). Returns the original
    ``(LlamaRMSNorm.forward, LlamaMLP.forward, eager_attention_forward)`` for a caller that
    restores them."""
    from torch import nn
    from transformers.models.llama import modeling_llama as ml

    saved = (ml.LlamaRMSNorm.forward, ml.LlamaMLP.forward, ml.eager_attention_forward)

    def rms_forward(self, h):
        var = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(var + self.variance_epsilon).detach())

    def mlp_forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)).detach() * self.up_proj(x))

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        k = ml.repeat_kv(key, module.num_key_value_groups)
        v = ml.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = nn.functional.softmax(w, dim=-1).detach()
        out = torch.matmul(w, v).transpose(1, 2).contiguous()
        return out, w

    ml.LlamaRMSNorm.forward = rms_forward
    ml.LlamaMLP.forward = mlp_forward
    ml.eager_attention_forward = eager
    return saved


# -- engines (children) --------------------------------------------------------------------------

def run_one(engine: str, n: int, dtype_s: str, rows: int, save: str | None) -> dict:
    dtype = DT[dtype_s]
    torch.manual_seed(0)
    out: dict = {"engine": engine, "n": n, "dtype": dtype_s, "threads": torch.get_num_threads()}
    if engine == "gemm":
        return gemm_rate(n, dtype, out)
    toks = tokens(n)
    if engine in ("hf_jacobian", "hf_vec", "hf_rows"):
        hf, _ = hf_model(dtype)
        hf.eval()
        for p in hf.parameters():
            p.requires_grad_(False)
        patch_hf_detached()
        emb = hf.model.embed_tokens(toks)[0].detach()

        def f(e):
            return hf.model(inputs_embeds=e[None]).last_hidden_state[0, -1]

        out["rss_after_load"] = C.peak_rss_bytes()
        vec = ({"vectorize": True, "strategy": "reverse-mode"} if engine == "hf_vec" else {})
        torch.autograd.functional.jacobian(f, emb[:3], **vec)  # warm-up (library init, allocator)
        if engine in ("hf_jacobian", "hf_vec"):
            t0 = time.perf_counter()
            c0 = cpu()
            J = torch.autograd.functional.jacobian(f, emb, **vec)  # [d_out, n, d_in]
            out["seconds"] = time.perf_counter() - t0
            out["cpu_seconds"] = cpu() - c0
            J = J.permute(1, 0, 2)  # [n, d_out, d_in]
            out["recon_rel_err"] = rel_err(J, emb, f(emb).detach())
        else:
            e = emb.clone().requires_grad_(True)
            with torch.enable_grad():
                t0 = time.perf_counter()
                y = f(e)
                out["forward_seconds"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                c0 = cpu()
                for r in range(rows):
                    torch.autograd.grad(y[r], e, retain_graph=True)
                dt = time.perf_counter() - t0
                out["cpu_seconds"] = (cpu() - c0) / rows * D
            out["rows"] = rows
            out["seconds_per_row"] = dt / rows
            out["seconds"] = out["forward_seconds"] + dt / rows * D  # extrapolated: 1 fwd + D rows
            out["extrapolated"] = True
            J = None
    else:
        from lin_lens import linear_map, operators_at_hooks, top_singular
        from lin_lens.freeze import detached
        from lin_lens.maps import layer_sweep_hooks

        m = tl_model(dtype)
        for p in m.parameters():
            p.requires_grad_(False)
        out["rss_after_load"] = C.peak_rss_bytes()
        linear_map(m, toks[:, :3], "unembed.hook_in", -1, progress=False)  # warm-up
        J = None
        if engine in ("jacrev", "jr_rows"):
            from lin_lens._hooks import HookSet

            emb = m.embed(toks)[0].detach()

            def g(e):
                got = {}
                with HookSet(m) as hs:
                    hs.add("hook_embed", lambda t, hook: e[None])
                    hs.add("unembed.hook_in", lambda t, hook: got.__setitem__("y", t))
                    m(toks, return_type="logits")
                return got["y"][0, -1]

            if engine == "jr_rows":
                with detached(m):
                    t0 = time.perf_counter()
                    c0 = cpu()
                    torch.func.jacrev(lambda e: g(e)[:rows], chunk_size=rows)(emb)
                    dt = time.perf_counter() - t0
                    out["cpu_seconds"] = (cpu() - c0) / rows * D
                out.update(rows=rows, seconds_per_row=dt / rows, seconds=dt / rows * D,
                           extrapolated=True, peak_rss=C.peak_rss_bytes())
                return out
            with detached(m):
                t0 = time.perf_counter()
                c0 = cpu()
                J = torch.func.jacrev(g, chunk_size=64)(emb).permute(1, 0, 2)
                out["seconds"] = time.perf_counter() - t0
                out["cpu_seconds"] = cpu() - c0
                out["recon_rel_err"] = rel_err(J, emb, g(emb).detach())
        elif engine == "linear_map":
            t0 = time.perf_counter()
            c0 = cpu()
            lm = linear_map(m, toks, "unembed.hook_in", -1, engine="reverse", progress=False)
            out["seconds"] = time.perf_counter() - t0
            out["cpu_seconds"] = cpu() - c0
            out["recon_rel_err"] = lm.relative_error
            J = lm.J
        elif engine == "lm_rows":
            t0 = time.perf_counter()
            c0 = cpu()
            linear_map(m, toks, "unembed.hook_in", -1, engine="reverse", progress=False,
                       out_index=list(range(rows)), check=False, chunk_size=rows)
            dt = time.perf_counter() - t0
            out["cpu_seconds"] = (cpu() - c0) / rows * D
            out.update(rows=rows, seconds_per_row=dt / rows, seconds=dt / rows * D,
                       extrapolated=True)
        elif engine in ("sweep", "sweep_reverse_rows"):
            hooks = layer_sweep_hooks(m)
            t0 = time.perf_counter()
            c0 = cpu()
            res = operators_at_hooks(m, toks, hooks, -1, engine="forward", progress=False)
            out["seconds"] = time.perf_counter() - t0
            out["cpu_seconds"] = cpu() - c0
            out["n_hooks"] = len(hooks)
            out["max_recon_rel_err"] = max(r.relative_error for r in res.values())
            J = res[f"blocks.{L - 1}.hook_resid_post"].J
        elif engine == "topk":
            t0 = time.perf_counter()
            c0 = cpu()
            r = top_singular(m, toks, "unembed.hook_in", -1, k=16,
                             block=int(os.environ["TOPK_BLOCK"]) if "TOPK_BLOCK" in os.environ
                             else None,
                             tol=float(os.environ.get("TOPK_TOL", "1e-4")), progress=False,
                             max_iter=int(os.environ["TOPK_ITERS"]) if "TOPK_ITERS" in os.environ
                             else None, max_memory=os.environ.get("LIN_LENS_MAX_MEMORY"))
            out["seconds"] = time.perf_counter() - t0
            out["cpu_seconds"] = cpu() - c0
            out["info"] = {k: v for k, v in r.info.items() if k not in ("hook", "history")}
            if save:
                torch.save({"U": r.U, "S": r.S, "V": r.V}, save + ".topk.pt")
        else:
            raise SystemExit(f"unknown engine {engine}")
    out["peak_rss"] = C.peak_rss_bytes()
    if J is not None and save:
        torch.save(J.detach(), save)
    return out


def cpu() -> float:
    """CPU seconds of this process (user + system): robust to other jobs sharing the cores."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rel_err(J, x, y):
    rec = torch.einsum("soi,si->o", J, x)
    return float(torch.linalg.vector_norm(rec - y) / torch.linalg.vector_norm(y))


def gemm_rate(n: int, dtype, out) -> dict:
    """GFLOP/s of the matmuls a batched VJP does at n tokens: [chunk·n, d] @ [d, d_mlp] and
    [d, d], with lin_lens's own chunk for n (``memory.preferred_chunk``)."""
    from lin_lens.maps.budget import preferred_chunk

    rows = preferred_chunk(n) * n
    res = {}
    for name, k2 in (("d_mlp", DM), ("d_model", D)):
        a = torch.randn(rows, D, dtype=dtype)
        w = torch.randn(D, k2, dtype=dtype)
        a @ w
        best, cbest = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            c0 = cpu()
            for _ in range(3):
                a @ w
            best.append((time.perf_counter() - t0) / 3)
            cbest.append((cpu() - c0) / 3)
        best.sort()
        cbest.sort()
        res[name] = 2 * rows * D * k2 / best[len(best) // 2] / 1e9
        res[name + "_per_cpu_s"] = 2 * rows * D * k2 / cbest[len(cbest) // 2] / 1e9
    out["gflops"] = res
    wall = [v for k, v in res.items() if not k.endswith("cpu_s")]
    per_cpu = [v for k, v in res.items() if k.endswith("cpu_s")]
    out["gflops_mean"] = sum(wall) / len(wall)
    out["gflops_per_cpu_s_mean"] = sum(per_cpu) / len(per_cpu)
    return out


# -- parent --------------------------------------------------------------------------------------

def child(engine, n, dtype, rows=16, save=None, timeout=3600, env=None) -> dict:
    cmd = [sys.executable, __file__, "one", engine, str(n), dtype, "--rows", str(rows)]
    if save:
        cmd += ["--save", save]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "LIN_LENS_PROGRESS": "0", **(env or {})})
    line = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not line:
        return {"engine": engine, "n": n, "dtype": dtype, "error": p.stderr[-2000:]}
    r = json.loads(line[-1])
    r["wall_with_load"] = time.perf_counter() - t0
    return r


def main():
    if sys.argv[1] == "one":
        engine, n, dtype = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        rows = int(sys.argv[sys.argv.index("--rows") + 1]) if "--rows" in sys.argv else 16
        save = sys.argv[sys.argv.index("--save") + 1] if "--save" in sys.argv else None
        print(json.dumps(run_one(engine, n, dtype, rows, save)))
        return
    if sys.argv[1] == "prepare":
        for dt in DT.values():
            hf_model(dt)
            tl_model(dt)
        return
    if sys.argv[1] == "plan":
        plan = json.load(open(sys.argv[2]))
        outp = sys.argv[3]
        results = json.load(open(outp)) if os.path.exists(outp) else []
        for step in plan:
            r = child(**step)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "error"})
                  if "error" not in r else f"ERROR {step}: {r['error'][-600:]}", flush=True)
            json.dump(results, open(outp, "w"), indent=1)
        return
    raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
