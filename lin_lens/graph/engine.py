"""One graph computation: the target, the node space, total effects and the rows of edges.

Both passes are the maps engine's one detached forward (:func:`lin_lens.maps.graph
.detached_forward`): the **probe** pass adds a zero leaf to every node output, so the gradient of
the objective there is the *total* gradient over all paths; the **cut** pass replaces every node
output by a fresh leaf of equal value, so differentiating a node's *computed* output (or the
target) gives only the *direct* effects of the nodes before it. Both run in detached mode, so the
network between leaves is exactly linear and Euler's identity makes every value the sum of its
edges. Rows of edges are batched backward passes through the cut pass's retained graph.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from lin_lens._tl import LOGITS, canonical, clean_name, hook_dict
from lin_lens.errors import InvalidArgumentError, UnsupportedFeatureError
from lin_lens.graph._naming import param_layer
from lin_lens.graph.nodes import NodeSpace
from lin_lens.graph.target import resolve_target
from lin_lens.maps import budget
from lin_lens.maps.graph import Forward, batched_grad, detached_forward

EMBED = "hook_embed"
_ABS_ROWS = 8  # rows whose |edges| are ranked at once (top_k mode)


def node_hooks(model: Any) -> list[str]:
    """The per-layer hooks whose outputs are nodes (heads: ``attn.hook_z``, neurons:
    ``mlp.hook_post``); refuses models without them."""
    hooks = []
    for layer in range(model.cfg.n_layers):
        for h in (f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.mlp.hook_post"):
            if h not in hook_dict(model):
                raise UnsupportedFeatureError(
                    f"{h}: this model has no such hook (mixture-of-experts or another MLP / "
                    "attention form), so its heads or neurons cannot be graph nodes")
            hooks.append(h)
    return hooks


def row_memory(model: Any, n: int, dtype: torch.dtype, heads: bool, neurons: bool
               ) -> tuple[int, int]:
    """Bytes an ``n``-token graph holds throughout and bytes per receiver row of a batched
    pass, estimated from the config before any pass.

    Throughout: the detached forward kept for the backward passes and a dozen float64
    vectors over the node space (weights, influence, masks). Per row: the gradient at every
    node output, the row over every sender (``Attributor.rows``'s buffer) and the backward
    pass's working memory. Both grow linearly with ``n`` (the senders are per position), so
    the batch that fits shrinks as ``1/n``."""
    cfg = model.cfg
    L, d, d_mlp = int(cfg.n_layers), int(cfg.d_model), int(cfg.d_mlp or 4 * cfg.d_model)
    h, d_head = int(cfg.n_heads), int(cfg.d_head)
    senders = L * ((h if heads else 1) + (d_mlp if neurons else 1)) + 1  # per position
    grads = L * ((h * d_head if heads else d) + (d_mlp if neurons else d)) + d
    fixed = budget.graph_bytes(model, n, dtype) + 12 * 8 * n * senders
    per_row = budget.itemsize(dtype) * n * (senders + grads) + budget.row_bytes(model, n, dtype)
    return fixed, per_row


def _target_act(fwd: Forward, model: Any, hook: str) -> Tensor:
    if hook != LOGITS:
        return fwd.acts[canonical(model, hook)]
    assert fwd.logits is not None  # the pass ran to the end (full=True)
    return fwd.logits


class Attributor:
    """Probe and cut passes for one prompt; :meth:`rows` gives exact rows of edges.

    ``stack`` keeps the passes' context (detached mode, flags, bias grads) open for as long as
    rows are computed."""

    def __init__(self, stack: contextlib.ExitStack, model: Any, tokens: Tensor, target: Any,
                 hook: str, pos: int, heads: bool, neurons: bool, str_token):
        self.model, self.tokens = model, tokens
        layer_hooks = node_hooks(model)
        full = hook == LOGITS
        with contextlib.ExitStack() as probe_stack:  # the probe pass is freed after use
            # to the end: the logits give the default target and the targets' probabilities
            probe = detached_forward(probe_stack, model, tokens, EMBED, [hook], constants=True,
                                     full=True, probes=layer_hooks)
            act = _target_act(probe, model, hook)
            assert probe.logits is not None  # full=True
            self.logits = probe.logits.detach()
            self.target = resolve_target(target, hook, pos, act, self.logits, str_token)
            self.T = self.target.read(act).detach()  # [k]
            J = (self.target.weights * self.target.read(act)).sum()
            leaves = {EMBED: probe.x, **probe.origins, **probe.probes, **probe.biases}
            grads = torch.autograd.grad(J, list(leaves.values()), allow_unused=True)
            total = dict(zip(leaves, grads, strict=True))
            values = {EMBED: probe.x.detach(), **{k: v.detach() for k, v in probe.origins.items()},
                      **{k: v.detach() for k, v in probe.computed.items()},
                      **{k: v.detach() for k, v in probe.biases.items()}}
            bias_names = list(probe.biases)
            del probe, grads, J, act
        used = {n for n in leaves if total[n] is not None and n not in bias_names}
        if EMBED not in used:
            raise InvalidArgumentError(f"the target at hook={hook!r} does not depend on the input")
        n_layers = model.cfg.n_layers
        used_biases = {n: param_layer(n, n_layers) for n in bias_names if total[n] is not None}
        self.space = NodeSpace(model, pos + 1, used=used, biases=used_biases, heads=heads,
                               neurons=neurons, n_targets=len(self.T))
        self.dirs = {n: total[n] for n in used}  # ∂J/∂output: reads head and MLP outputs
        self._values = values
        te = self.space.columns({n: total[n].unsqueeze(0) for n in used | set(used_biases)},
                                values, 1, self.T)[0]
        self.total_effect = torch.cat([te, self.T])  # a target's "total effect" is itself
        self.value = self.total_effect.clone()
        for b in self.space.blocks:  # a neuron's value is its activation
            if b.kind == "neuron":
                self.value[b.start:b.stop] = values[b.source][0, :self.space.n].reshape(-1)
        del total
        cut = detached_forward(stack, model, tokens, EMBED, [hook], constants=True, full=full,
                               cuts=[h for h in layer_hooks if h in used])
        self.cut = cut
        self.T_cut = self.target.read(_target_act(cut, model, hook))  # from the leaves
        leaf_of = {EMBED: cut.x, **cut.origins, **cut.sources}
        self._inputs = [leaf_of[b.source] for b in self.space.sender_blocks
                        if b.kind != "bias"] + [cut.biases[n] for n in self.space.biases]
        self._input_names = [b.source for b in self.space.sender_blocks if b.kind != "bias"] \
            + list(self.space.biases)
        self._values.update({n: v.detach() for n, v in cut.sources.items()})
        self._buf: Tensor | None = None

    def rows(self, idx: Tensor, *, select: Tensor | None = None, top_k: int | None = None
             ) -> dict[str, Tensor]:
        """Exact edges into the receivers ``idx``: row b, column a is ∂ value(idx[b]) / ∂ out(a)
        · out(a), from one batched backward pass through the cut network.

        Returns ``total`` [B] (Σ of the whole row) and, by mode: ``dense`` [B, n_senders]
        (default); ``select`` [B, len(select)] at the sorted sender ids ``select``; or with
        ``top_k``: ``cols`` / ``vals`` [B, k] (the k largest |edges|) and ``abs_sum`` [B].
        """
        shapes = {n: t.shape for n, t in self.cut.computed.items()}
        shapes["target"] = self.T_cut.shape
        cots = self.space.cotangents(idx, shapes, self.dirs, self.T)
        keys = list(cots)
        outs = [self.T_cut if k == "target" else self.cut.computed[k] for k in keys]
        grads = dict(zip(self._input_names,
                         batched_grad(outs, self._inputs, [cots[k] for k in keys],
                                      allow_unused=True), strict=True))
        B, like, n = len(idx), self.T, self.space.n
        # one reusable buffer: fresh [B, n_senders] allocations cost more than the arithmetic
        buf = self._buf
        if buf is None or buf.shape[0] < B:
            buf = self._buf = like.new_empty((B, self.space.n_senders))
        dense = buf[:B]
        for b in self.space.sender_blocks:
            g = grads.pop(b.source, None)
            if g is None:
                dense[:, b.start:b.stop] = 0
            else:
                dense[:, b.start:b.stop] = b.reduce(g * self._values[b.source], n)
            del g
        res = {"total": dense.sum(-1)}
        if top_k is not None:  # |row| a few rows at a time: a whole copy would double the buffer
            k = min(top_k, dense.shape[1])
            abs_sum, cols = dense.new_empty(B), torch.empty((B, k), dtype=torch.long,
                                                           device=dense.device)
            for i in range(0, B, _ABS_ROWS):
                mag = dense[i:i + _ABS_ROWS].abs()
                abs_sum[i:i + _ABS_ROWS] = mag.sum(-1)
                cols[i:i + _ABS_ROWS] = torch.topk(mag, k, dim=-1).indices
            del mag
            res["abs_sum"], res["cols"], res["vals"] = abs_sum, cols, dense.gather(1, cols)
        elif select is not None:
            res["select"] = dense[:, select.to(dense.device)]
        else:
            res["dense"] = dense.clone()
        return res

    def bias_labels(self) -> list[str]:
        return [clean_name(n) for n in self.space.biases]
