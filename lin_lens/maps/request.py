"""A map request, checked once: tokens, target and source hooks, positions, the output selection
(direction / out_index / head) and the engine options. Every engine receives a
:class:`MapRequest` and trusts it (the einops way: plan, then run)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from lin_lens._tl import LOGITS, canonical, model_device, resolve_hook
from lin_lens._types import Inputs
from lin_lens.errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    InvalidPositionError,
    NotLinearError,
    UnsupportedFeatureError,
)
from lin_lens.freeze import in_functorch_transform, is_detached
from lin_lens.maps import budget

NOT_LINEAR = {
    "hook_pattern": "the attention pattern is a softmax of the input (frozen, not linear)",
    "hook_attn_scores": "attention scores are bilinear (q·k) in the input",
    "hook_scale": "a norm's scale is sqrt(mean(x²)+eps), not linear in the input",
    "hook_cos": "rotary tables do not depend on the input",
    "hook_sin": "rotary tables do not depend on the input",
    "hook_tokens": "token ids are not activations",
    "hook_expert_weights": "router weights are a softmax of the input",
    "hook_expert_indices": "router indices are discrete",
}
ENGINES = ("auto", "reverse", "forward", "matrix_free")


def to_tokens(model: Any, inputs: Inputs, prepend_bos: bool | None = None, *,
              truncate: bool = False) -> Int[Tensor, "1 pos"]:
    """Text, a list of ids or an id tensor → one [1, pos] token tensor on the model's device.

    An input longer than the model's context (``cfg.n_ctx``) is refused with both lengths:
    TransformerLens's own ``to_tokens`` would cut it silently, and every result would then
    answer for another prompt than the one given. ``truncate=True`` keeps the first ``n_ctx``
    tokens instead (then say so wherever the result is reported)."""
    if isinstance(inputs, str):
        if not inputs:
            raise InvalidArgumentError("empty input text")
        kw = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
        tokens = model.to_tokens(inputs, truncate=False, **kw)
    else:
        tokens = torch.as_tensor(inputs)
        if tokens.numel() == 0:
            raise InvalidArgumentError("empty input: no tokens")
        if tokens.dtype not in (torch.int32, torch.int64):
            raise ArgumentTypeError(f"token ids must be integers, got {tokens.dtype}")
        if tokens.ndim == 1:
            tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise InvalidArgumentError(
            f"one prompt at a time: expected [pos] or [1, pos], got {list(tokens.shape)}")
    if tokens.shape[1] == 0:
        raise InvalidArgumentError("empty input: no tokens")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and tokens.shape[1] > n_ctx:
        if not truncate:
            raise InvalidArgumentError(
                f"the input has {tokens.shape[1]} tokens, more than the model's context length "
                f"n_ctx={n_ctx}; shorten it, or cut it knowingly with "
                f"lin_lens.to_tokens(model, text, truncate=True)")
        tokens = tokens[:, :n_ctx]
    d_vocab = getattr(model.cfg, "d_vocab", None)
    if d_vocab and (int(tokens.max()) >= d_vocab or int(tokens.min()) < 0):
        raise InvalidArgumentError(f"token id out of range for d_vocab={d_vocab}")
    return tokens.to(model_device(model))


def as_index(value: Any, what: str) -> int:
    """An integer scalar (Python, numpy or a 0-d integer tensor) as an int; anything else —
    bools, floats, strings — is refused rather than truncated."""
    if isinstance(value, Tensor):
        if value.ndim != 0 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ArgumentTypeError(f"{what}={value!r}: expected an integer")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{what}={value!r}: expected an integer, got "
                                f"{type(value).__name__}")
    return int(value)


def is_int_position(pos: Any) -> bool:
    """One integer position (J then drops its target axis)."""
    if isinstance(pos, Tensor):
        return pos.ndim == 0 and not pos.dtype.is_floating_point and pos.dtype != torch.bool
    return isinstance(pos, numbers.Integral) and not isinstance(pos, bool)


def positions(pos: Any, n: int) -> list[int]:
    """``pos`` (an integer, a sequence of integers, a slice, or None = all) → non-negative
    positions in the order given."""
    if pos is None:
        idx = list(range(n))
    elif isinstance(pos, slice):
        idx = list(range(n))[pos]
    elif is_int_position(pos):
        idx = [as_index(pos, "pos")]
    elif isinstance(pos, (str, bytes, bool, float)) or not hasattr(pos, "__iter__"):
        raise ArgumentTypeError(
            f"pos={pos!r}: expected an int, a list of ints, a slice or None (-1 is the last "
            "position)")
    else:
        idx = [as_index(p, "pos") for p in (pos.tolist() if isinstance(pos, Tensor) else pos)]
    out = []
    for p in idx:
        if not -n <= p < n:
            raise InvalidPositionError(f"position {p} out of range for an input of {n} tokens")
        out.append(p % n)
    if not out:
        raise InvalidPositionError(f"pos={pos!r} selects no position of an input of {n} tokens")
    return out


def check_hook(model: Any, hook: str, role: str) -> None:
    """An unknown name, or a target without an exact linear map, raises with the reason."""
    if hook == LOGITS:
        if role == "source":
            raise InvalidArgumentError("source='logits': the logits cannot be the source")
        return
    resolve_hook(model, hook)
    leaf = hook.rsplit(".", 1)[-1]
    if leaf == "hook_attn_in" and getattr(model.cfg, "n_key_value_heads", None):
        raise UnsupportedFeatureError(
            f"{hook!r} needs cfg.use_attn_in, which TransformerLens does not support with "
            "grouped-query attention; use hook_q_input / hook_k_input / hook_v_input")
    if leaf in NOT_LINEAR:
        raise NotLinearError(f"no exact linear map at {hook!r}: {NOT_LINEAR[leaf]}")


@dataclass
class MapRequest:
    """Everything an engine needs to compute one map, validated against the model."""

    tokens: Tensor  # [1, n]
    hook: str  # as the user named it ("logits" or a hook name)
    source: str
    positions: list[int]  # target positions, non-negative
    int_pos: bool  # J drops its target axis
    direction: Tensor | None = None
    out_index: Any = None
    head: int | None = None
    detach: bool = True
    chunk_size: int | None = None
    progress: bool | None = None
    check: bool = True
    tol: float | None = None
    max_memory: int | None = None
    engine: str = "auto"

    @property
    def n(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def plain(self) -> bool:
        """A whole activation (no selection), detached: what the forward engine computes."""
        return (self.direction is None and self.out_index is None and self.head is None
                and self.detach and self.hook != LOGITS and self.hook != self.source)

    @classmethod
    def build(cls, model: Any, inputs: Any, hook: str = LOGITS, pos: Any = -1, *,
              source: str = "hook_embed", direction: Any = None, out_index: Any = None,
              head: int | None = None, detach: bool = True, chunk_size: int | None = None,
              progress: bool | None = None, check: bool = True, tol: float | None = None,
              prepend_bos: bool | None = None, engine: str = "auto",
              max_memory: Any = None) -> MapRequest:
        if engine not in ENGINES:
            raise InvalidArgumentError(f"engine must be one of {ENGINES}, got {engine!r}")
        if engine == "matrix_free":
            raise InvalidArgumentError(
                "engine='matrix_free' never forms J; call lin_lens.top_singular(model, tokens, "
                "hook, pos, k=...) for the top singular triplets instead")
        _check_model(model)
        tokens = to_tokens(model, inputs, prepend_bos)
        check_hook(model, source, "source")
        check_hook(model, hook, "target")
        if direction is not None and out_index is not None:
            raise InvalidArgumentError("give either direction or out_index, not both")
        if head is not None:
            head = as_index(head, "head")
            if hook == LOGITS:
                raise InvalidArgumentError("head= is for per-head hooks, not 'logits'")
            if out_index is not None or direction is not None:
                raise InvalidArgumentError("head= selects the rows itself; give head= alone, "
                                           "without out_index= or direction=")
        if out_index is not None:
            out_index = _index_list(out_index)
        if direction is not None:
            direction = torch.as_tensor(direction)
            if not direction.dtype.is_floating_point:
                raise ArgumentTypeError(f"direction must be a float vector, got {direction.dtype}")
            if not bool(torch.isfinite(direction).all()):
                raise InvalidArgumentError("direction contains NaN or inf")
            direction = direction.to(model_device(model))  # a CPU vector for a CUDA model
        if chunk_size is not None and (isinstance(chunk_size, bool)
                                       or not isinstance(chunk_size, numbers.Integral)
                                       or chunk_size < 1):
            raise InvalidArgumentError(f"chunk_size must be a positive int or None, got "
                                       f"{chunk_size!r}")
        if tol is not None and not (isinstance(tol, numbers.Real) and math.isfinite(tol)
                                    and tol > 0):
            raise InvalidArgumentError(f"tol must be a positive finite number, got {tol!r}")
        if not detach and is_detached(model):
            raise InvalidArgumentError(
                "detach=False inside `with lin_lens.detached(model)`: the model is detached, "
                "so the ordinary Jacobian cannot be computed here; call it outside the block")
        return cls(tokens=tokens, hook=hook, source=source,
                   positions=positions(pos, tokens.shape[1]), int_pos=is_int_position(pos),
                   direction=direction, out_index=out_index, head=head, detach=detach,
                   chunk_size=chunk_size, progress=progress, check=check, tol=tol,
                   max_memory=budget.parse_bytes(max_memory), engine=engine)

    def canonical_hook(self, model: Any) -> str:
        return canonical(model, self.hook)


def _index_list(out_index: Any) -> Tensor:
    """Output indices as a 1-D long tensor; boolean masks, floats and empty lists are refused."""
    t = torch.as_tensor(out_index)
    if t.dtype == torch.bool:
        raise ArgumentTypeError("out_index is a boolean mask; pass the indices "
                                "(e.g. mask.nonzero().flatten())")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise ArgumentTypeError(f"out_index must hold integers, got {t.dtype}")
    if t.numel() == 0:
        raise InvalidArgumentError("out_index is empty: no output row selected")
    return t.reshape(-1).long()


def _check_model(model: Any) -> None:
    """Environment problems that would otherwise surface as raw torch errors."""
    if torch.is_inference_mode_enabled():
        raise InvalidArgumentError(
            "lin_lens needs autograd, which torch.inference_mode() disables; call it outside "
            "the inference_mode block (torch.no_grad() around it is fine)")
    if in_functorch_transform():
        raise InvalidArgumentError(
            "torch is inside a vmap/functorch transform. If no transform of yours is running, "
            "an interrupt inside torch's own vmap bookkeeping left it open: restart the Python "
            "process (lin_lens.reset(model) restores the model, not torch)")
    p = next(model.parameters(), None)
    if p is not None and p.device.type == "meta":
        raise InvalidArgumentError("the model's parameters are on the 'meta' device (no "
                                   "values); load real weights first")


def hook_width(model: Any, hook: str) -> int:
    """Flattened width of a hook's activation per position, from the config (for preflight)."""
    cfg = model.cfg
    leaf = hook.rsplit(".", 1)[-1]
    if leaf in ("hook_pre", "hook_post", "hook_pre_linear", "hook_mid"):
        return int(cfg.d_mlp)
    if leaf in ("hook_q", "hook_z"):
        return int(cfg.n_heads * cfg.d_head)
    if leaf in ("hook_k", "hook_v"):
        return int((getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * cfg.d_head)
    if leaf == "hook_result":
        return int(cfg.n_heads * cfg.d_model)
    return int(cfg.d_model)


def sequence_of_hooks(hooks: Sequence[str]) -> list[str]:
    """Hooks in order, duplicates dropped; an empty list is refused."""
    out = list(dict.fromkeys(hooks))
    if not out:
        raise InvalidArgumentError("hooks=[]: no hooks given")
    return out
