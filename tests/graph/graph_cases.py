"""Shared cases of the attribution-graph tests: the tiny float64 models of ``tests.conftest`` on
every backend this TransformerLens has, and their graphs, built once per session."""

from __future__ import annotations

import functools

import pytest
import torch

from lin_lens.graph import attribution_graph
from tests.conftest import ARCHS, BACKENDS, tiny

TOKENS = [3, 17, 42, 8, 8, 29, 11]
CASES = [pytest.param(b, a, id=f"{b}-{a}") for b in BACKENDS for a in ARCHS] + [
    pytest.param("hooked", a, id=f"hooked-{a}") for a in ("solu", "relu") if "hooked" in BACKENDS]
# one case per backend, for the slower or broader checks
PAIR = [pytest.param(b, a, id=f"{b}-{a}") for b, a in (("hooked", "gpt2"), ("bridge", "llama"))
        if b in BACKENDS]


def model(backend: str, arch: str, dtype: torch.dtype = torch.float64):
    return tiny(arch, backend, dtype)


@functools.cache
def full_graph(backend: str, arch: str):
    """Every node and every edge (no pruning)."""
    return attribution_graph(model(backend, arch), TOKENS, prune=False)


@functools.cache
def pruned_graph(backend: str, arch: str):
    return attribution_graph(model(backend, arch), TOKENS)


def of_kind(graph, kind: str) -> list[int]:
    return [i for i, k in enumerate(graph.kinds) if k == kind]
