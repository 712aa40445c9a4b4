"""The node space of an attribution graph: every possible node, in one topological order.

Nodes are grouped in blocks that share one tensor of the forward pass (their *leaf*):

=========  ==========================  ===========================  =========================
kind       one node per                leaf (output replaced)       scalar value
=========  ==========================  ===========================  =========================
embed      position                    ``hook_embed``               total effect on target
pos_embed  position                    ``hook_pos_embed``           total effect on target
bias       nonzero bias parameter      the parameter itself         total effect on target
head       (layer, query pos, head)    ``blocks.L.attn.hook_z``     total effect on target
attn       (layer, query pos)          ``blocks.L.attn.hook_z``     total effect on target
neuron     (layer, pos, neuron)        ``blocks.L.mlp.hook_post``   its activation (hook_post)
mlp        (layer, pos)                ``blocks.L.mlp.hook_post``   total effect on target
target     target (logit / direction)  —                            the target itself
=========  ==========================  ===========================  =========================

A head's output is ``z_h W_O[h]`` (then any post-attention norm, frozen): linear in its slice of
``hook_z``, so the slice stands for the output. An MLP neuron's output is ``post_n W_out[n]``.
Global node ids run over the blocks in this order (sources, then layer by layer attention before
MLP, then the targets), so every edge goes from a lower id to a higher one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lin_lens.errors import InvalidArgumentError, InvalidPositionError

KINDS = ("embed", "pos_embed", "bias", "head", "attn", "neuron", "mlp", "target")
SOURCES = ("embed", "pos_embed", "bias")
TOTAL_VALUED = ("head", "attn", "mlp")  # value = total effect: a vector output, read along ∂J


@dataclass
class Block:
    """Nodes ``start … start+size-1``, all of one kind, read from one leaf."""

    kind: str
    start: int
    layer: int
    grid: tuple[int, ...]  # node grid: (n,), (n, heads), (n, d_mlp), () for a bias, (k,)
    source: str  # hook name, parameter name, or "target"

    @property
    def size(self) -> int:
        out = 1
        for g in self.grid:
            out *= g
        return out

    @property
    def stop(self) -> int:
        return self.start + self.size

    def reduce(self, p: Tensor, n: int) -> Tensor:
        """Activation × gradient ``p`` [B, *leaf shape] → one column per node [B, size]."""
        B = p.shape[0]
        if self.kind == "bias":
            return p.reshape(B, -1).sum(-1, keepdim=True)
        p = p[:, 0, :n]  # [B, n, ...] (leaves carry a batch axis of 1)
        if self.kind in ("embed", "pos_embed", "mlp"):
            return p.sum(-1)
        if self.kind == "head":
            return p.sum(-1).reshape(B, -1)
        if self.kind == "attn":
            return p.sum((-1, -2))
        return p.reshape(B, -1)  # neuron


class NodeSpace:
    """All candidate nodes for one prompt and target (``n`` positions up to the target's)."""

    def __init__(self, model: Any, n: int, *, used: set[str], biases: dict[str, int],
                 heads: bool, neurons: bool, n_targets: int):
        """``used``: leaf hooks connected to the target (others hold no node that matters);
        ``biases``: bias parameter name → its layer, in the order they become nodes."""
        cfg = model.cfg
        self.n, self.n_layers = n, cfg.n_layers
        self.n_heads, self.d_mlp = cfg.n_heads, cfg.d_mlp
        self.blocks: list[Block] = []
        self._add("embed", -1, (n,), "hook_embed")
        if "hook_pos_embed" in used:
            self._add("pos_embed", -1, (n,), "hook_pos_embed")
        for name, layer in biases.items():
            self._add("bias", layer, (), name)
        for layer in range(self.n_layers):
            z, post = f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.mlp.hook_post"
            if z in used:
                self._add(*(("head", layer, (n, self.n_heads)) if heads
                            else ("attn", layer, (n,))), z)
            if post in used:
                self._add(*(("neuron", layer, (n, self.d_mlp)) if neurons
                            else ("mlp", layer, (n,))), post)
        self.n_senders = self.blocks[-1].stop
        self._add("target", self.n_layers, (n_targets,), "target")
        self.size = self.blocks[-1].stop
        self.biases = list(biases)

    def _add(self, kind: str, layer: int, grid: tuple[int, ...], source: str) -> None:
        start = self.blocks[-1].stop if self.blocks else 0
        self.blocks.append(Block(kind, start, layer, grid, source))

    @property
    def sender_blocks(self) -> list[Block]:
        return [b for b in self.blocks if b.kind != "target"]

    @property
    def targets(self) -> Block:
        return self.blocks[-1]

    def block_of(self, i: int) -> Block:
        for b in self.blocks:
            if b.start <= i < b.stop:
                return b
        raise InvalidPositionError(f"node {i} out of range for a graph of {self.size} nodes")

    # -- per-node descriptors ---------------------------------------------------------------
    def describe(self, tokens: Tensor, target_ids: list[int]) -> dict[str, Tensor]:
        """``kind`` (index into KINDS), ``layer``, ``pos`` (-1: every position) and ``index``
        (token id for embeddings and logit targets, head, neuron, bias ordinal; else -1)."""
        kind, layer, pos, index = [], [], [], []
        n_bias = 0
        for b in self.blocks:
            s = b.size
            kind.append(torch.full((s,), KINDS.index(b.kind)))
            layer.append(torch.full((s,), b.layer))
            if b.kind == "bias":
                pos.append(torch.tensor([-1]))
                index.append(torch.tensor([n_bias]))
                n_bias += 1
            elif b.kind == "target":
                pos.append(torch.full((s,), self.n - 1))
                index.append(torch.tensor(target_ids, dtype=torch.long))
            elif len(b.grid) == 2:
                grid = torch.arange(s)
                pos.append(grid // b.grid[1])
                index.append(grid % b.grid[1])
            else:
                pos.append(torch.arange(s))
                ids = tokens[: self.n].cpu() if b.kind == "embed" else torch.full((s,), -1)
                index.append(ids.long())
        return {k: torch.cat(v).long() for k, v in
                (("kind", kind), ("layer", layer), ("pos", pos), ("index", index))}

    # -- batched receivers ------------------------------------------------------------------
    def cotangents(self, idx: Tensor, shapes: dict[str, torch.Size], dirs: dict[str, Tensor],
                   like: Tensor) -> dict[str, Tensor]:
        """Cotangents selecting each receiver's scalar value: ``{source: [B, *shape]}``.

        A neuron's value is its activation (a one-hot on ``hook_post``); a head's, an attention
        layer's or an MLP's is its output read along ``dirs`` (∂J/∂output, the total gradient):
        its total effect. A target's is one-hot on the target vector (key ``"target"``).
        """
        B = len(idx)
        out: dict[str, Tensor] = {}
        for r, i in enumerate(idx.tolist()):
            b = self.block_of(i)
            local = i - b.start
            if b.source not in out:
                out[b.source] = like.new_zeros((B, *shapes[b.source]))
            cot = out[b.source][r]
            if b.kind == "target":
                cot[local] = 1
            elif b.kind == "neuron":
                cot[0, local // self.d_mlp, local % self.d_mlp] = 1
            elif b.kind == "head":
                q, h = divmod(local, self.n_heads)
                cot[0, q, h] = dirs[b.source][0, q, h]
            elif b.kind in ("attn", "mlp"):
                cot[0, local] = dirs[b.source][0, local]
            else:
                raise InvalidArgumentError(
                    f"node {i} ({b.kind}) is a source and has no incoming edges")
        return out

    def columns(self, grads: dict[str, Tensor | None], values: dict[str, Tensor], B: int,
                like: Tensor) -> Tensor:
        """Activation × gradient per leaf (one leaf at a time, to bound memory) → one column
        per sender node: ``[B, n_senders]``."""
        out = like.new_zeros((B, self.n_senders))
        for b in self.sender_blocks:
            g = grads.get(b.source)
            if g is not None:
                out[:, b.start:b.stop] = b.reduce(g * values[b.source], self.n)
        return out

    def receiver_mask(self) -> Tensor:
        m = torch.zeros(self.size, dtype=torch.bool)
        for b in self.blocks:
            if b.kind not in SOURCES:
                m[b.start:b.stop] = True
        return m
