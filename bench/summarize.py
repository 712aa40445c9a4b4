"""Tables for BENCHMARKS.md from the JSON that ``bench_engines.py plan`` writes.

Usage: python bench/summarize.py RESULTS.json [RESULTS2.json ...]
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from bench_engines import D, fwd_flops, vjp_flops  # noqa: E402

GB = 1024**3


def load(paths):
    rows = []
    for p in paths:
        run = os.path.basename(p).removeprefix("results_").removesuffix(".json")
        rows += [{**r, "run": run} for r in json.load(open(p))]
    return sorted(rows, key=lambda r: (r["n"], r["dtype"]))  # stable: run order within (n, dtype)


def gemm_for(rows, n, dtype, key="gflops_mean"):
    def pick(rs):
        g = sorted(r[key] for r in rs)
        return g[len(g) // 2] if g else None

    gem = [r for r in rows if r.get("engine") == "gemm" and r["dtype"] == dtype and key in r]
    return pick([r for r in gem if r["n"] == n]) or pick(gem) or float("nan")


def work(r):
    """FLOPs the engine's output needs (the analytic count of bench_engines)."""
    n = r["n"]
    e = r["engine"]
    if e in ("hf_jacobian", "hf_rows", "jacrev", "jr_rows", "linear_map", "lm_rows"):
        return D * vjp_flops(n)
    if e == "sweep":
        # one replay column per input coordinate, token s's columns on positions s: only
        return D * sum(fwd_flops(m) for m in range(1, n + 1))
    if e == "topk":
        i = r["info"]
        return (i["n_jvp"] + i["n_vjp"]) * vjp_flops(n)  # JVPs: double-backward, same matmuls
    return float("nan")


def table(rows):
    out = ["| run | engine | n | dtype | wall s | CPU s | vs hf_jacobian (wall / CPU) | "
           "GFLOP/s wall (counted) | % of GEMM (wall) | peak RSS | RSS above load | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["run"], r["n"], r["dtype"]): r for r in rows
            if r.get("engine") in ("hf_jacobian", "hf_rows") and "seconds" in r}
    for r in rows:
        if r.get("engine") == "gemm" or "seconds" not in r:
            continue
        cpu_s = r.get("cpu_seconds", float("nan"))
        g = gemm_for(rows, r["n"], r["dtype"])
        rate = work(r) / r["seconds"] / 1e9
        b = base.get((r["run"], r["n"], r["dtype"]))  # the baseline of the same run
        ratio = (f"{b['seconds'] / r['seconds']:.2f}× / "
                 f"{b.get('cpu_seconds', float('nan')) / cpu_s:.2f}×") if b else "–"
        note = []
        if r.get("extrapolated"):
            note.append(f"extrapolated from {r['rows']} rows")
        if "recon_rel_err" in r:
            note.append(f"recon err {r['recon_rel_err']:.1e}")
        if "max_recon_rel_err" in r:
            note.append(f"{r['n_hooks']} operators, max recon err {r['max_recon_rel_err']:.1e}")
        if "info" in r:
            i = r["info"]
            note.append(f"{i['n_jvp']} JVP + {i['n_vjp']} VJP, {i['iterations']} it, "
                        f"converged {i['converged']}, max rel resid {max(i['rel_residuals']):.1e}")
        out.append(
            f"| {r['run']} | {r['engine']} | {r['n']} | {r['dtype']} | {r['seconds']:.1f} | "
            f"{cpu_s:.1f} | "
            f"{ratio} | {rate:.1f} | {100 * rate / g:.0f}% | {r['peak_rss'] / GB:.2f} GB | "
            f"{(r['peak_rss'] - r.get('rss_after_load', 0)) / GB:.2f} GB | {'; '.join(note)} |")
    return "\n".join(out)


def topk_speedup(rows):
    """Each (n, dtype)'s latest top-k run against every full-operator run of the same size."""
    out = ["| n | dtype | full operator (linear_map), s | top-16 matrix-free, s | speed-up | "
           "products |", "|---|---|---|---|---|---|"]
    full: dict = {}
    for r in rows:
        if r.get("engine") == "linear_map" and "seconds" in r:
            full.setdefault((r["n"], r["dtype"]), []).append(r["seconds"])
    last = {(r["n"], r["dtype"]): r for r in rows if r.get("engine") == "topk" and "seconds" in r}
    for (n, dt), r in last.items():
        f = sorted(full.get((n, dt), []))
        i = r["info"]
        t = r["seconds"]
        fs = " / ".join(f"{x:.1f}" for x in f) or "–"
        sp = " / ".join(f"{x / t:.1f}×" for x in f) or "–"
        out.append(f"| {n} | {dt} | {fs} | {t:.1f} ({r['run']}) | {sp} | "
                   f"{i['n_jvp']} JVP + {i['n_vjp']} VJP (block {i['block']}) |")
    return "\n".join(out)


def gemm_table(rows):
    out = ["| run | n | dtype | GEMM GFLOP/s wall (d_mlp / d_model shapes) | per CPU-s |",
           "|---|---|---|---|---|"]
    for r in rows:
        if r.get("engine") == "gemm" and "gflops" in r:
            g = r["gflops"]
            out.append(f"| {r['run']} | {r['n']} | {r['dtype']} | "
                       f"{g['d_mlp']:.1f} / {g['d_model']:.1f} | "
                       f"{r.get('gflops_per_cpu_s_mean', float('nan')):.1f} |")
    return "\n".join(out)


def agreement(cache="/tmp/lin_lens_bench"):
    out = []
    for dt in ("f32", "f64"):
        for n in (7, 64, 256):
            # the sweep's saved J is the last resid_post, before ln_final: not the same map
            names = {k: f"{cache}/J_{k}_{n}_{dt}.pt" for k in ("hf", "jr", "lm")}
            Js = {k: torch.load(p) for k, p in names.items() if os.path.exists(p)}
            if len(Js) < 2:
                continue
            ref = Js.get("lm")
            for k, J in Js.items():
                if k == "lm" or ref is None:
                    continue
                d = float((J.to(ref.dtype) - ref).abs().max())
                out.append(f"| n={n} {dt} | {k} vs linear_map | max abs diff {d:.2e} | "
                           f"max abs J {float(ref.abs().max()):.2e} |")
    return "\n".join(out)


def topk_accuracy(cache="/tmp/lin_lens_bench"):
    out = []
    for dt in ("f32", "f64"):
        for n in (7, 64, 256):
            pj, pt = f"{cache}/J_lm_{n}_{dt}.pt", f"{cache}/J_tk_{n}_{dt}.pt.topk.pt"
            if not (os.path.exists(pj) and os.path.exists(pt)):
                continue
            J = torch.load(pj).double()  # [n, d_out, d_in]
            Jm = J.permute(1, 0, 2).reshape(J.shape[1], -1)
            U0, S0, V0 = torch.linalg.svd(Jm, full_matrices=False)
            t = torch.load(pt)
            k = len(t["S"])
            S = t["S"].double()
            rel = float(((S - S0[:k]).abs() / S0[:k]).max())

            def sines(A, B):
                qa, qb = torch.linalg.qr(A)[0], torch.linalg.qr(B)[0]
                c = torch.linalg.svdvals(qa.T @ qb).clamp(max=1)
                return float(torch.sqrt(1 - c.min() ** 2))

            su = sines(t["U"].double(), U0[:, :k])
            sv = sines(t["V"].double().reshape(-1, k), V0[:k].T)
            # per-vector angles
            cu = (t["U"].double().T @ U0[:, :k]).diag().abs()
            out.append(f"| n={n} {dt} | k={k} | max rel σ err {rel:.1e} | sin∠(U_k) {su:.1e} | "
                       f"sin∠(V_k) {sv:.1e} | min |cos| per vector {float(cu.min()):.4f} |")
    return "\n".join(out)


if __name__ == "__main__":
    rows = load(sys.argv[1:])
    print(table(rows))
    print()
    print(topk_speedup(rows))
    print()
    print(gemm_table(rows))
    print()
    print(agreement())
    print()
    print(topk_accuracy())
