"""Memory preflight: a map that would not fit is refused before any work, pointing to the
matrix-free engine; chunks shrink to the budget without changing the result."""

from __future__ import annotations

import pytest
import torch

from lin_lens import linear_map, operators_at_hooks
from lin_lens.errors import MemoryBudgetError
from lin_lens.maps import layer_sweep_hooks
from lin_lens.maps.budget import choose_chunk, memory_budget, parse_bytes
from tests.conftest import tiny


def _tokens(n: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (1, n), generator=g)


def test_memory_preflight_refuses_and_points_to_matrix_free(backend):
    model = tiny("gpt2", backend)
    toks = _tokens()
    with pytest.raises(MemoryBudgetError, match="top_singular"):
        linear_map(model, toks, "blocks.1.hook_resid_post", max_memory=1000)
    with pytest.raises(MemoryBudgetError):
        operators_at_hooks(model, toks, layer_sweep_hooks(model), max_memory="1KB")
    with memory_budget("1KB"), pytest.raises(MemoryBudgetError):
        linear_map(model, toks, "blocks.1.hook_resid_post", engine="reverse")
    m = linear_map(model, toks, "blocks.1.hook_resid_post", max_memory="1GB")
    assert m.relative_error <= 1e-12


def test_parse_bytes():
    assert parse_bytes("1.5GB") == int(1.5 * 1024**3) and parse_bytes(123) == 123
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_budget_of_a_cuda_model_is_the_gpus_memory(monkeypatch):
    """On CUDA the default budget is 80 % of the GPU's available memory (free to the driver plus
    torch's unused cache), not the host's RAM, and a refusal names the GPU (CUDA faked: the
    numbers are the point, not the device)."""
    from lin_lens.maps import budget

    GB = 1024**3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (100 * GB, 140 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 12 * GB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 10 * GB)
    monkeypatch.setattr(budget, "DEFAULT_CAP", 8 * GB)
    assert budget.available_bytes("cuda:0") == 102 * GB
    assert budget.default_budget(torch.device("cuda", 0)) == int(0.8 * 102 * GB)
    assert budget.budget(None, "cuda") == int(0.8 * 102 * GB) > 8 * GB  # no laptop cap
    assert budget.budget("1GB", "cuda") == GB  # max_memory still wins
    assert budget.default_budget("cpu") <= 8 * GB and budget.default_budget() <= 8 * GB
    with pytest.raises(MemoryBudgetError, match=r"80% of cuda:0's available memory.*on cuda:0"):
        budget.check(90 * GB, "J", device=torch.device("cuda:0"))
    budget.check(80 * GB, "J", device="cuda:0")  # fits the GPU, though not the 8 GB CPU default
    with pytest.raises(MemoryBudgetError, match="RAM"):
        budget.check(80 * GB, "J")


def test_chunk_shrinks_to_budget_and_results_unchanged(backend):
    model = tiny("gpt2", backend)
    big = choose_chunk(model, 6, torch.float64, 10**12, 64, 10**6)
    small = choose_chunk(model, 6, torch.float64, 20_000, 64, 10**6)
    assert big == 64 and 1 <= small < 16
    toks = _tokens()
    a = linear_map(model, toks, "blocks.1.hook_resid_post", engine="reverse", chunk_size=3)
    b = linear_map(model, toks, "blocks.1.hook_resid_post", engine="reverse")
    assert torch.allclose(a.J, b.J, rtol=0, atol=1e-13)
