"""Shared, cached loaders for real-model tests (SmolLM2-135M, Gemma 3 270M), fully offline.

Other test files import these; each (model, dtype, backend, fold_ln) is built once and kept while
it is among the two most recent (a float64 SmolLM2 takes about 1 GB, Gemma 3 270M 2-4 GB); the
HookedTransformer reads the cached HF model without changing it, a Bridge gets its own copy.

    from tests._real import smollm2, needs
    from tests.conftest import BACKENDS
    @needs("smollm2-135m")
    @pytest.mark.slow
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_x(backend):
        model = smollm2(torch.float64, backend)
"""

from __future__ import annotations

import copy
import gc
import os
from functools import lru_cache

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIN_LENS_PROGRESS", "0")

from lin_lens import models  # noqa: E402

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
PROMPT = "The bridge out of Marin is the"
PROMPTS = (
    PROMPT,
    "Paris is the capital of",
    "def add(a, b):\n    return",
    "One, two, three, four,",
)


def needs(name: str):
    """Skip unless the package shipping ``name``'s weights is installed."""
    spec = models.MODELS[name]
    return pytest.mark.skipif(
        not models.available(name),
        reason=f"{name} weights not installed: {spec.install} (package {spec.pip_package})",
    )


@lru_cache(maxsize=1)
def hf_pair(name: str = SMOLLM2, dtype: torch.dtype = torch.float32):
    """The raw Hugging Face ``(model, tokenizer)``: a reference, never handed to a Bridge."""
    return models.load_hf(name, dtype)


_last_name: list[str] = []


def release() -> None:
    """Drop every cached model (Gemma 3 in float64 alone takes 3.5 GB as a HookedTransformer)."""
    _model.cache_clear()
    hf_pair.cache_clear()
    gc.collect()


def model(name: str = SMOLLM2, dtype: torch.dtype = torch.float64, backend: str | None = None,
          fold_ln: bool = False):
    """A TransformerLens model, cached; switching to another model name frees the previous
    one's."""
    if _last_name and _last_name[0] != name:
        release()
    _last_name[:] = [name]
    return _model(name, dtype, backend or models.default_backend(), fold_ln)


@lru_cache(maxsize=2)
def _model(name: str, dtype: torch.dtype, backend: str, fold_ln: bool):
    hf, tok = hf_pair(name, dtype)
    if backend == "bridge":  # the Bridge wraps its HF model in place (compat mode rewrites it)
        hf = copy.deepcopy(hf)
    return models.load_model(name, dtype=dtype, backend=backend, fold_ln=fold_ln,
                             hf_model=hf, tokenizer=tok)


def smollm2(dtype: torch.dtype = torch.float64, backend: str | None = None,
            fold_ln: bool = False):
    return model(SMOLLM2, dtype, backend, fold_ln)


def gemma3(dtype: torch.dtype = torch.float64, backend: str | None = None,
           fold_ln: bool = False):
    return model(GEMMA3, dtype, backend, fold_ln)
