"""One last-position VJP of SmolLM2 at 256 tokens (f64), profiled on the TL HookedTransformer with
lin_lens's detached graph and on the HF model with the reference's patched detaches: where the
time goes (op table) and seconds per row for each.

Usage: python bench/profile_vjp.py   (after bench_engines.py prepare)
"""

from __future__ import annotations

import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import bench_engines as B  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from lin_lens.maps.graph import detached_forward  # noqa: E402

N, DT, REPS = 256, torch.float64, 3


def profiled(y, x, G, label):
    torch.autograd.grad(y, x, G, retain_graph=True)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(REPS):
            torch.autograd.grad(y, x, G, retain_graph=True)
    table = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in table) / 1e6
    print(f"{label}: {total / REPS:.3f} s per row (self CPU, under the profiler)")
    print(table.table(sort_by="self_cpu_time_total", row_limit=6))


toks = B.tokens(N)
G = torch.randn(B.D, dtype=DT)
m = B.tl_model(DT)
for p in m.parameters():
    p.requires_grad_(False)
with contextlib.ExitStack() as st:
    fwd = detached_forward(st, m, toks, "hook_embed", ["unembed.hook_in"])
    profiled(fwd.acts["unembed.hook_in"][0, -1], fwd.x, G, "TL + lin_lens")
del m, fwd
hf, _ = B.hf_model(DT)
hf.eval()
for p in hf.parameters():
    p.requires_grad_(False)
B.patch_hf_detached()
emb = hf.model.embed_tokens(toks)[0].detach().requires_grad_(True)
with torch.enable_grad():
    profiled(hf.model(inputs_embeds=emb[None]).last_hidden_state[0, -1], emb, G, "HF reference")
