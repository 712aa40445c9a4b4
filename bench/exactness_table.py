"""Print the exactness matrix: worst relative reconstruction error over every hook, per family.

    python bench/exactness_table.py            # tiny random models, both backends where present

Detached maps should sit at rounding level; the ordinary Jacobian (nothing frozen) near 1.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIN_LENS_PROGRESS", "0")
warnings.simplefilter("ignore")

import torch  # noqa: E402

import lin_lens  # noqa: E402
from lin_lens._tl import HAS_HOOKED, TL_VERSION  # noqa: E402
from lin_lens.testing import BRIDGE_ARCHS, HOOKED_ARCHS, tiny_bridge, tiny_model  # noqa: E402

HOOKS = [
    "blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post",
    "blocks.0.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.attn.hook_v",
    "blocks.1.attn.hook_z", "blocks.1.attn.hook_result", "blocks.1.mlp.hook_post",
    "ln_final.hook_normalized", "logits",
]
TOKENS = torch.tensor([[3, 17, 42, 8, 8, 29, 11]])


def worst(model) -> tuple[float, float, int]:
    det, ordinary, n = 0.0, float("inf"), 0
    for hook in HOOKS:
        if hook != "logits" and hook not in model.hook_dict:
            continue
        det = max(det, lin_lens.linear_map(model, TOKENS, hook, pos=None).relative_error)
        o = lin_lens.linear_map(model, TOKENS, hook, pos=None, detach=False).relative_error
        ordinary, n = min(ordinary, o), n + 1
    return det, ordinary, n


def main() -> None:
    print(f"transformer_lens {TL_VERSION}, torch {torch.__version__}, 7 tokens, all positions\n")
    print("| backend | family | dtype | hooks | worst detached error | best ordinary error |")
    print("|---|---|---|---|---|---|")
    builders = []
    if HAS_HOOKED:
        builders += [("HookedTransformer", a, tiny_model) for a in HOOKED_ARCHS]
    builders += [("TransformerBridge", a, tiny_bridge) for a in BRIDGE_ARCHS]
    t0 = time.time()
    for backend, arch, build in builders:
        for dtype in (torch.float64, torch.float32):
            det, ordinary, n = worst(build(arch, dtype))
            name = str(dtype).replace("torch.", "")
            print(f"| {backend} | {arch} | {name} | {n} | {det:.1e} | {ordinary:.2f} |")
            sys.stdout.flush()
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
