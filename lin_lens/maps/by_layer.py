"""Reverse passes one block at a time, for operators whose many rows share per-block work.

The ordinary reverse engine (:func:`.reverse.row_batches`) pushes each batch of rows through the
whole network. Here every block input between the source and the target
(``blocks.L.hook_resid_pre``) is cut into a leaf of its own (``detached_forward(cuts=...)``), and
all the rows cross one block before any row crosses the next. The rows' cotangents at the
current cut are kept in one buffer (``[rows, 1, n, d]``, the size of ``J``), so work that serves
every row is done once per block: each gated MLP's per-token matrices (:mod:`.formed_mlp`) are
formed when the first batch of rows reaches that block and dropped after the last. The constants'
gradients add up over the blocks (a bias reaches the output through the blocks after it; the cut
at each block input splits those paths, and their sum is its whole gradient).

Used where forming pays (:func:`.formed_mlp.pays`) and up to ``MAX_TOKENS`` tokens. Beyond that
the batched attention backward wants small batches of rows (``budget.PASS_ROWS``), with which
the per-token products cost about what forming saves, and the buffers (``J``-sized cotangents,
``n·d²`` per block) outgrow the whole-network passes' memory (BENCHMARKS.md, issue 24).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lin_lens._tl import LOGITS, block_of, hook_dict
from lin_lens.maps.graph import batched_grad

MAX_TOKENS = 64  # SmolLM2 f32, last-position operator: 52 s vs 55 s at 128 with 4x the memory
TOKEN_ROWS = 4096  # rows × tokens per batched pass within one block (tuned on SmolLM2)
MIN_CHUNK, MAX_CHUNK = 64, 192


def cut_hooks(model: Any, source: str, target: str) -> list[str]:
    """The block inputs strictly after the source's block and up to the target's, in forward
    order (none where the target is itself a block input cut off by them, or comes before the
    blocks)."""
    n_layers = int(model.cfg.n_layers)
    src, tgt = block_of(source), block_of(target)
    lo = 1 if src is None else src + 1
    if target == LOGITS or target.startswith(("ln_final.", "unembed.")):
        hi = n_layers
    elif tgt is None:
        return []
    else:
        hi = tgt if target == f"blocks.{tgt}.hook_resid_pre" else tgt + 1
    hd = hook_dict(model)
    return [h for layer in range(lo, min(hi, n_layers))
            if (h := f"blocks.{layer}.hook_resid_pre") in hd]


def preferred_chunk(n_tokens: int) -> int:
    """Rows per batched pass through one block."""
    return max(MIN_CHUNK, min(MAX_CHUNK, TOKEN_ROWS // max(1, n_tokens)))


def row_batches(segments: Sequence[tuple[Tensor, Tensor]], constants: list[Tensor],
                batches: list[tuple[Tensor, Tensor]], top: Callable[[Tensor, Tensor], Tensor],
                after_block: Callable[[], None], bar: Any
                ) -> Iterator[tuple[Tensor, Tensor, tuple]]:
    """Batched VJPs block by block. ``segments``: ``(output, input leaf)`` of each block from the
    source up (the last output is the target activation, each other one the computed value at
    the next cut); ``batches``: the ``(t_idx, r_idx)`` rows of each pass and ``top`` their
    cotangent at the target, as in :func:`.reverse.row_batches`. Yields ``(t_idx, r_idx,
    grads)`` for inputs ``[source, *constants]``: in the last block every batch, with the
    source's gradient (zeros where unreached); before that, a batch for each block in which
    it reaches a constant, with None for the source. A block's graph is freed once every row
    has crossed it, then ``after_block`` runs and ``bar`` advances by one."""
    cot: Tensor | None = None  # every row's cotangent at the current block's output
    for s in reversed(range(len(segments))):
        out, leaf = segments[s]
        inputs = [leaf, *constants]
        nxt: Tensor | None = None
        start = 0
        for b, (t_idx, r_idx) in enumerate(batches):
            k = len(t_idx)
            go = top(t_idx, r_idx) if cot is None else cot[start:start + k]
            grads = batched_grad(out, inputs, go, allow_unused=True,
                                 retain_graph=b < len(batches) - 1)
            gx = torch.zeros(k, *leaf.shape, dtype=leaf.dtype, device=leaf.device) \
                if grads[0] is None else grads[0]
            if s == 0:
                yield t_idx, r_idx, (gx, *grads[1:])
            else:
                if any(g is not None for g in grads[1:]):
                    yield t_idx, r_idx, (None, *grads[1:])
                if nxt is None:  # reuse the buffer in place where the shapes allow
                    nxt = cot if cot is not None and cot.shape[1:] == leaf.shape else torch.empty(
                        sum(len(t) for t, _ in batches), *leaf.shape, dtype=leaf.dtype,
                        device=leaf.device)
                nxt[start:start + k] = gx
            start += k
        after_block()
        cot = nxt
        bar.update(1)
