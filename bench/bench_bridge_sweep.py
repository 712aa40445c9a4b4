"""Layer sweep on SmolLM2 as a TransformerBridge: the forward engine (the replay since
2026-12-04; graph columns before) against reverse mode for the last layer's three operators.

Usage: python bench/bench_bridge_sweep.py
"""

from __future__ import annotations

import time
import warnings

import torch

from lin_lens import operators_at_hooks
from lin_lens.maps import layer_sweep_hooks
from lin_lens.models import load_model

warnings.filterwarnings("ignore")
m = load_model("smollm2-135m", dtype=torch.float32, backend="bridge")
text = "The bridge out of Marin is the"
hooks = layer_sweep_hooks(m)
t0 = time.perf_counter()
fwd = operators_at_hooks(m, text, hooks, -1, engine="forward", progress=False)
engine = next(iter(fwd.values())).meta["engine"]
print(f"{engine}: {len(hooks)} operators in {time.perf_counter() - t0:.1f} s, "
      f"max reconstruction error {max(r.relative_error for r in fwd.values()):.1e}")
t0 = time.perf_counter()
rev = operators_at_hooks(m, text, hooks[-3:], -1, engine="reverse", progress=False)
print(f"reverse: the last layer's 3 operators in {time.perf_counter() - t0:.1f} s")
for h in hooks[-3:]:
    d = float((rev[h].J - fwd[h].J).abs().max() / rev[h].J.abs().max())
    print(f"  {h}: max |ΔJ| / max |J| = {d:.1e}")
