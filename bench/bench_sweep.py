"""layer_sweep vs its own operators vs the reference, in one run (issue 14, criterion 2).

SmolLM2-135M float32, 7 tokens, last position, the operators of the sweep's default kinds: the 90
cumulative ones (every ``resid_post``, ``attn_out``, ``mlp_out``, source = input embeddings) and
the 30 per-layer transforms (``resid_pre`` → ``resid_post`` of each layer):

* ``operators``: exactly the sweep's calls, timed alone:
  ``lin_lens.operators_at_hooks(model, tokens, hooks, -1, source="hook_embed")`` for the 90,
  and ``lin_lens.layer_transforms(model, tokens, None, -1)`` for the 30 (one pass);
* ``sweep``: ``lin_lens.layer_sweep(model, tokens, -1)`` (the same maps plus every summary:
  stable ranks per token and stacked, top singular values and vectors, decoded tokens);
* ``reference``: the paper's method as it really runs, once per target:
  ``torch.autograd.functional.jacobian(f, x, vectorize=True, strategy="reverse-mode")`` on the
  Hugging Face model (eager attention) with its detach points (bench_engines.patch_hf_detached),
  ``f`` = that target's activation at the last position (forward hooks on the decoder layer,
  ``self_attn`` and ``mlp``; for a transform, a pre-hook feeds ``x`` in as the layer's input
  hidden state), then ``torch.linalg.svd`` of the stacked operator ``[d_out, n·d_in]`` (the
  singular vectors the sweep reports).

Prints per-repeat ratios: sweep / operators (target ≤ 1.3) and reference / sweep (target ≥ 10).

    LIN_LENS_PROGRESS=0 python bench/bench_sweep.py --repeats 3 --out /tmp/sweep.json
    # a quick look: --ref-stride 5 times every 5th target and scales the sum (labelled)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import bench_engines as E  # noqa: E402
import torch  # noqa: E402

KINDS = ("resid_post", "attn_out", "mlp_out")


def reference_target(hf, emb: torch.Tensor, layer: int, kind: str) -> float:
    """Seconds for one target: jacobian (vectorize=True) + SVD of the stacked operator."""
    block = hf.model.layers[layer]
    module = {"resid_post": block, "attn_out": block.self_attn, "mlp_out": block.mlp,
              "transform": block}[kind]
    got: dict = {}

    def keep(mod, args, out):
        got["y"] = out[0] if isinstance(out, tuple) else out

    def feed(mod, args, kwargs):  # a transform's input: x replaces the layer's hidden state
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": got["x"]}
        return (got["x"], *args[1:]), kwargs

    at = emb
    t_at = time.perf_counter()
    if kind == "transform":  # at the layer's actual input (timed with the target)
        seen: dict = {}

        def grab(mod, args, kwargs):
            seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        h = block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                hf.model(inputs_embeds=emb[None])
        finally:
            h.remove()
        at = seen["x"][0]
    t_at = time.perf_counter() - t_at
    handles = [module.register_forward_hook(keep)]
    if kind == "transform":
        handles.append(block.register_forward_pre_hook(feed, with_kwargs=True))
    try:
        def f(e):
            got["x"] = e[None]
            hf.model(inputs_embeds=emb[None] if kind == "transform" else e[None])
            return got["y"][0, -1]

        t0 = time.perf_counter()
        J = torch.autograd.functional.jacobian(f, at, vectorize=True, strategy="reverse-mode")
        torch.linalg.svd(J.reshape(J.shape[0], -1), full_matrices=False)
        return time.perf_counter() - t0 + t_at
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-stride", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import lin_lens
    from lin_lens.maps import layer_sweep_hooks

    out: dict = {"n": a.n, "threads": torch.get_num_threads(), "repeats": []}
    m = E.tl_model(torch.float32)
    for p in m.parameters():
        p.requires_grad_(False)
    toks = E.tokens(a.n)
    hooks = layer_sweep_hooks(m, KINDS)
    lin_lens.layer_sweep(m, toks[:, :3], -1, progress=False)  # warm-up
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        ops = lin_lens.operators_at_hooks(m, toks, hooks, -1, source="hook_embed",
                                          progress=False)
        engine = getattr(next(iter(ops.values())), "meta", {}).get("engine")
        del ops
        t_cum = time.perf_counter() - t0
        lin_lens.layer_transforms(m, toks, None, -1, progress=False)
        t_ops = time.perf_counter() - t0
        t0 = time.perf_counter()
        sw = lin_lens.layer_sweep(m, toks, -1, progress=False)
        t_sweep = time.perf_counter() - t0
        rec = {"operators_s": t_ops, "cumulative_s": t_cum, "transforms_s": t_ops - t_cum,
               "sweep_s": t_sweep, "sweep_over_operators": t_sweep / t_ops,
               "engine": engine, "max_err": float(max(e.max() for e in sw.relative_error.values()))}
        out["repeats"].append(rec)
        print(json.dumps(rec), flush=True)
    del m

    hf, _ = E.hf_model(torch.float32)
    for p in hf.parameters():
        p.requires_grad_(False)
    E.patch_hf_detached()
    emb = hf.model.embed_tokens(toks)[0].detach()
    reference_target(hf, emb[:3], 0, "mlp_out")  # warm-up
    targets = [(layer, kind) for layer in range(len(hf.model.layers))
               for kind in (*KINDS, "transform")]
    timed = targets[::a.ref_stride]
    secs = []
    for layer, kind in timed:
        secs.append(reference_target(hf, emb, layer, kind))
        print(f"reference {kind} L{layer}: {secs[-1]:.2f} s", flush=True)
    ref = sum(secs) * len(targets) / len(timed)
    out.update(reference_s=ref, reference_targets_timed=len(timed), reference_targets=len(targets),
               reference_extrapolated=len(timed) < len(targets))
    for rec in out["repeats"]:
        rec["reference_over_sweep"] = ref / rec["sweep_s"]
    print(json.dumps(out, indent=1))
    label = f" (extrapolated from every {a.ref_stride}-th target)" if a.ref_stride > 1 else ""
    print(f"\nreference, {len(targets)} targets{label}: {ref:.1f} s")
    for i, rec in enumerate(out["repeats"]):
        print(f"repeat {i + 1}: operators {rec['operators_s']:.1f} s, sweep {rec['sweep_s']:.1f} s"
              f" -> sweep/operators {rec['sweep_over_operators']:.2f}x (target <= 1.3), "
              f"reference/sweep {rec['reference_over_sweep']:.1f}x (target >= 10)")
    if a.out:
        json.dump(out, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
