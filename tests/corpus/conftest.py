"""Fixtures of the corpus tests: tiny float64 models loaded from a :class:`LoadSpec` (what a
worker process loads) on each backend this TransformerLens has, and short prompt lists in the
tiny tokenizer's words.

    from tests.corpus.conftest import PROMPTS, many_prompts
"""

from __future__ import annotations

import random

import pytest

from lin_lens.corpus import LoadSpec
from tests.conftest import BACKENDS

# words of lin_lens.testing.tiny_tokenizer: w0 … w47
PROMPTS = ["w1 w2 w3", "w4 w5", "w9 w9 w9 w1 w3 w7", "w11 w12", "w3 w3 w5 w6"]
DEFAULT_BACKEND = BACKENDS[0]  # hooked where this TransformerLens has it


def many_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct prompts of 2–6 tiny-tokenizer words."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        out[" ".join(f"w{rng.randrange(48)}" for _ in range(rng.randint(2, 6)))] = None
    return list(out)


@pytest.fixture(params=BACKENDS)
def spec(request) -> LoadSpec:
    """tiny-gpt2 in float64 (biases and positional embeddings: the constant is non-trivial)."""
    return LoadSpec("tiny-gpt2", "float64", request.param)


@pytest.fixture
def model(spec):
    return spec.load()
