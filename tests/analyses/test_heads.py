"""Per-head operators: each head's exact map at hook_result, of rank ≤ d_head, adding up to
attn_out's (tiny float64 models)."""

from __future__ import annotations

import pytest
import torch

import lin_lens
from lin_lens.analyses import head_operators
from tests.conftest import DEVICE, tiny

TOKENS = torch.tensor([3, 17, 5, 41, 8], device=DEVICE)


@pytest.mark.parametrize("arch", ["gpt2", "gemma"])  # biases+positions; post-norms+softcap
def test_head_operators(arch, backend):
    model = tiny(arch, backend)
    maps = head_operators(model, TOKENS, 1, pos=-1)
    assert len(maps) == model.cfg.n_heads
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(TOKENS)
    finally:
        model.set_use_attn_result(False)
    result = cache["blocks.1.attn.hook_result"][0, -1]
    for h, hm in enumerate(maps):
        assert hm.relative_error < 1e-12
        assert torch.allclose(hm.act, result[h], atol=1e-12)
        assert (torch.linalg.matrix_rank(hm.J) <= model.cfg.d_head).all()
    if getattr(model.blocks[1], "ln1_post", None) is None:
        # heads + b_O is attn_out: the per-head operators add up to attn_out's operator
        lm = lin_lens.linear_map(model, TOKENS, "blocks.1.hook_attn_out", pos=-1)
        assert (sum(hm.J for hm in maps) - lm.J).abs().max() < 1e-10
