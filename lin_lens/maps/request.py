"""A map request, checked once: tokens, target and source hooks, positions, the output selection
(direction / out_index / head) and the engine options. Every engine receives a
:class:`MapRequest` and trusts it (the einops way: plan, then run)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from lin_lens._tl import LOGITS, canonical, model_device, resolve_hook
from lin_lens.errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    InvalidPositionError,
    NotLinearError,
)
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


def to_tokens(model: Any, inputs: Any, prepend_bos: bool | None = None) -> Int[Tensor, "1 pos"]:
    """Text, a list of ids or an id tensor → one [1, pos] token tensor on the model's device."""
    if isinstance(inputs, str):
        if not inputs:
            raise InvalidArgumentError("empty input text")
        kw = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
        tokens = model.to_tokens(inputs, **kw)
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
    d_vocab = getattr(model.cfg, "d_vocab", None)
    if d_vocab and (int(tokens.max()) >= d_vocab or int(tokens.min()) < 0):
        raise InvalidArgumentError(f"token id out of range for d_vocab={d_vocab}")
    return tokens.to(model_device(model))


def positions(pos: Any, n: int) -> list[int]:
    """``pos`` (int, list, slice or None = all) → sorted-as-given non-negative positions."""
    if pos is None:
        idx = list(range(n))
    elif isinstance(pos, slice):
        idx = list(range(n))[pos]
    elif isinstance(pos, numbers.Integral) and not isinstance(pos, bool):
        idx = [int(pos)]
    else:
        idx = [int(p) for p in pos]
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
        tokens = to_tokens(model, inputs, prepend_bos)
        check_hook(model, source, "source")
        check_hook(model, hook, "target")
        if direction is not None and out_index is not None:
            raise InvalidArgumentError("give either direction or out_index, not both")
        return cls(tokens=tokens, hook=hook, source=source,
                   positions=positions(pos, tokens.shape[1]),
                   int_pos=isinstance(pos, numbers.Integral) and not isinstance(pos, bool),
                   direction=direction, out_index=out_index, head=head, detach=detach,
                   chunk_size=chunk_size, progress=progress, check=check, tol=tol,
                   max_memory=budget.parse_bytes(max_memory), engine=engine)

    def canonical_hook(self, model: Any) -> str:
        return canonical(model, self.hook)


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
