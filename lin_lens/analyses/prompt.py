"""One prompt, analysed once: the prediction, the exact map at a hook, the ordinary Jacobian's
reconstruction beside it, the decoded singular vectors, and each token's contribution to the
predicted logit. The report (:mod:`lin_lens.report`) and corpus runs (:mod:`lin_lens.corpus`)
both read their numbers from here."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lin_lens.decoding import Decoding, decode
from lin_lens.errors import InvalidArgumentError
from lin_lens.maps import LinearMap, linear_map, ordinary_reconstruction

TOP_PREDICTIONS = 5


@dataclass
class Prediction:
    """The model's top next tokens at each target position."""

    ids: Int[Tensor, "n_tgt top"]
    probs: Float[Tensor, "n_tgt top"]


@dataclass
class HookAnalysis:
    """The exact map at one hook and what is derived from it, per target position."""

    hook: str
    lm: LinearMap  # J [n_tgt, n_src, d_out, d_in] (lm.at(j): one position)
    ordinary: Tensor | None  # the ordinary Jacobian's reconstruction [n_tgt, d_out]
    decodings: list[Decoding] | None  # one per target position
    seconds: float = 0.0


@dataclass
class PromptAnalysis:
    tokens: Int[Tensor, "1 pos"]
    positions: list[int]
    prediction: Prediction
    hooks: dict[str, HookAnalysis]
    logit_map: LinearMap | None  # the predicted token's logit at each position (d_out = 1)
    timings: dict[str, float] = field(default_factory=dict)


def predict(model: Any, tokens: Tensor, positions: Sequence[int],
            top: int = TOP_PREDICTIONS) -> Prediction:
    with torch.no_grad():
        logits = model(tokens, return_type="logits")[0, list(positions)]
    probs = logits.double().softmax(-1)
    best = probs.topk(min(top, probs.shape[-1]))
    return Prediction(best.indices, best.values)


def ordinary(model: Any, tokens: Tensor, hook: str, positions: Sequence[int]) -> Tensor:
    """The ordinary Jacobian's reconstruction ``[n_tgt, d_out]``: one forward-mode pass, or the
    full ordinary Jacobian where an operation has no forward-mode derivative."""
    try:
        return ordinary_reconstruction(model, tokens, hook, list(positions))
    except (RuntimeError, NotImplementedError):
        lm = linear_map(model, tokens, hook, list(positions), detach=False, check=False,
                        progress=False)
        return lm.reconstruct().reshape(len(positions), -1)


def logit_map(model: Any, tokens: Tensor, positions: Sequence[int], ids: Tensor,
              source: str = "hook_embed") -> LinearMap:
    """The exact map of the logit of token ``ids[j]`` at each position ``j``."""
    onehot = torch.zeros(len(positions), int(model.cfg.d_vocab), dtype=torch.float64,
                         device=ids.device)
    onehot[torch.arange(len(positions), device=ids.device), ids] = 1
    return linear_map(model, tokens, "logits", list(positions), direction=onehot, source=source,
                      progress=False)


def analyze_hook(model: Any, tokens: Tensor, hook: str, positions: Sequence[int], *,
                 source: str = "hook_embed", with_ordinary: bool = True, decoded: bool = True,
                 k: int = 8, top: int = 5, progress: bool | None = None) -> HookAnalysis:
    t0 = time.perf_counter()
    lm = linear_map(model, tokens, hook, list(positions), source=source, progress=progress)
    orig = ordinary(model, tokens, hook, positions) if with_ordinary else None
    decs = None
    if decoded:
        if len(lm.out_shape) != 1:
            raise InvalidArgumentError(
                f"hook {hook!r}: decoding needs a vector-valued activation, got output shape "
                f"{list(lm.out_shape)}")
        decs = [decode(model, lm.at(j), k=k, top=top, n_rows=0) for j in range(len(positions))]
    return HookAnalysis(hook, lm, orig, decs, time.perf_counter() - t0)


def analyze_prompt(model: Any, tokens: Tensor, hooks: Sequence[str], positions: Sequence[int],
                   *, source: str = "hook_embed", with_ordinary: bool = True,
                   decoded: bool = True, contributions: bool = True, k: int = 8, top: int = 5,
                   progress: bool | None = None) -> PromptAnalysis:
    """Everything a report or a corpus row shows for one prompt (``tokens`` ``[1, pos]``,
    target ``positions`` already checked)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pred = predict(model, tokens, positions)
    timings["forward"] = time.perf_counter() - t0
    results = {}
    for h in hooks:
        results[h] = analyze_hook(model, tokens, h, positions, source=source,
                                  with_ordinary=with_ordinary, decoded=decoded, k=k, top=top,
                                  progress=progress)
        timings[h] = results[h].seconds
    lmap = None
    if contributions:
        t1 = time.perf_counter()
        lmap = logit_map(model, tokens, positions, pred.ids[:, 0], source)
        timings["logit map"] = time.perf_counter() - t1
    return PromptAnalysis(tokens, list(positions), pred, results, lmap, timings)
