"""One graph computation: the target, the node space, total effects and the rows of edges.

Must be used inside ``lin_lens.detached(model)``, ``requires_grad(biases, True)`` and
``torch.enable_grad`` (see :func:`lin_lens.graph.build.attribution_graph`): the cut pass's
autograd graph is kept for every batch of rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lin_lens._tl import LOGITS
from lin_lens.errors import InvalidArgumentError, UnsupportedFeatureError
from lin_lens.graph._naming import clean_name, param_layer
from lin_lens.graph.nodes import NodeSpace
from lin_lens.graph.passes import NOT_LINEAR, Pass, Target, grad_batch


def node_hooks(model: Any) -> list[str]:
    """The hooks whose outputs are nodes; refuses models without per-layer z / MLP post."""
    hooks = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_dict else [])
    for layer in range(model.cfg.n_layers):
        for h in (f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.mlp.hook_post"):
            if h not in model.hook_dict:
                raise UnsupportedFeatureError(
                    f"{h}: this model has no such hook (mixture-of-experts or another MLP / "
                    "attention form), so its heads or neurons cannot be graph nodes")
            hooks.append(h)
    return hooks


def resolve_target(target: Any, hook: str, pos: int, act: Tensor, logits: Tensor,
                   str_token) -> Target:
    """``target``: None (the top logit), a token id, a list of ids, or a float direction."""
    leaf = hook.rsplit(".", 1)[-1]
    if leaf in NOT_LINEAR:
        raise InvalidArgumentError(
            f"hook={hook!r}: no exact linear target there: {NOT_LINEAR[leaf]}")
    row = act[0, pos].reshape(-1).detach()
    probs_all = torch.softmax(logits[0, pos].double(), -1)
    u = None if target is None else torch.as_tensor(target)
    if u is None or not (u.is_floating_point() or u.is_complex()):
        if hook != LOGITS:
            raise InvalidArgumentError(
                f"target={target!r} names logits, but hook={hook!r}: give a float direction of "
                f"size {row.numel()} for that hook")
        ids = [int(logits[0, pos].argmax())] if u is None else [int(t) for t in u.reshape(-1)]
        if not ids or min(ids) < 0 or max(ids) >= row.numel() or len(set(ids)) != len(ids):
            raise InvalidArgumentError(
                f"target={target!r}: token ids must be distinct and in [0, {row.numel()})")
        probs = probs_all[ids].to(row.dtype)
        w = probs / probs.sum() if float(probs.sum()) > 0 else torch.full_like(probs, 1 / len(ids))
        return Target(hook, pos, ids, None, [str_token(i) for i in ids], w, probs)
    if u.is_complex() or u.numel() != row.numel():
        raise InvalidArgumentError(
            f"target: a direction on {hook!r} must be a float tensor of {row.numel()} entries, "
            f"got {tuple(u.shape)} {u.dtype}")
    u = u.reshape(-1).to(device=row.device, dtype=row.dtype)
    return Target(hook, pos, None, u, [f"direction on {hook}"], row.new_ones(1), None)


class Attributor:
    """Probe and cut passes for one prompt; :meth:`rows` gives exact rows of edges."""

    def __init__(self, model: Any, tokens: Tensor, target: Any, hook: str, pos: int,
                 heads: bool, neurons: bool, biases: dict[str, Tensor], str_token):
        self.model, self.tokens = model, tokens
        self.biases = biases
        hooks = node_hooks(model)
        probe = Pass(model, tokens, hooks, hook, cut=False)
        act = probe.act
        assert act is not None  # Pass raises when the target hook does not fire
        self.target = resolve_target(target, hook, pos, act, probe.logits, str_token)
        self.T = self.target.read(act).detach()  # [k]
        J = (self.target.weights * self.target.read(act)).sum()
        names = list(probe.leaves) + list(biases)
        grads = torch.autograd.grad(J, [probe.leaves[n] for n in probe.leaves]
                                    + list(biases.values()), allow_unused=True)
        total = dict(zip(names, grads, strict=True))
        used = {n for n in probe.leaves if total[n] is not None}
        if "hook_embed" not in used:
            raise InvalidArgumentError(f"the target at hook={hook!r} does not depend on the input")
        n_layers = model.cfg.n_layers
        used_biases = {n: param_layer(n, n_layers) for n in biases if total[n] is not None}
        self.space = NodeSpace(model, pos + 1, used=used, biases=used_biases, heads=heads,
                               neurons=neurons, n_targets=len(self.T))
        self.dirs = {n: total[n] for n in used}  # ∂J/∂output: reads head and MLP outputs
        values = dict(probe.values)
        values.update({n: p.detach() for n, p in biases.items()})
        self._values = values
        like = self.T
        te = self.space.columns({n: total[n].unsqueeze(0) for n in used | set(used_biases)},
                                values, 1, like)[0]
        self.total_effect = torch.cat([te, self.T])  # a target's "total effect" is itself
        self.value = self.total_effect.clone()
        for b in self.space.blocks:  # a neuron's value is its activation
            if b.kind == "neuron":
                self.value[b.start:b.stop] = values[b.source][0, :self.space.n].reshape(-1)
        self.logits = probe.logits
        del probe, grads, total, J
        self.cut = Pass(model, tokens, [h for h in hooks if h in used], hook, cut=True)
        assert self.cut.act is not None
        self.T_cut = self.target.read(self.cut.act)  # the target computed from the leaves
        self._inputs = [self.cut.leaves[b.source] for b in self.space.sender_blocks
                        if b.kind != "bias"] + [biases[n] for n in self.space.biases]
        self._input_names = [b.source for b in self.space.sender_blocks if b.kind != "bias"] \
            + list(self.space.biases)
        self._values.update({n: self.cut.leaves[n].detach() for n in self.cut.leaves})
        self._buf: Tensor | None = None

    def rows(self, idx: Tensor, *, select: Tensor | None = None, top_k: int | None = None
             ) -> dict[str, Tensor]:
        """Exact edges into the receivers ``idx``: row b, column a is ∂ value(idx[b]) / ∂ out(a)
        · out(a), from one batched backward pass through the cut network.

        Returns ``total`` [B] (Σ of the whole row) and, by mode: ``dense`` [B, n_senders]
        (default); ``select`` [B, len(select)] at the sorted sender ids ``select``; or with
        ``top_k``: ``cols`` / ``vals`` [B, k] (the k largest |edges|) and ``abs_sum`` [B].
        """
        shapes = {n: t.shape for n, t in self.cut.origs.items()}
        shapes["target"] = self.T_cut.shape
        cots = self.space.cotangents(idx, shapes, self.dirs, self.T)
        keys = list(cots)
        outs = [self.T_cut if k == "target" else self.cut.origs[k] for k in keys]
        grads = dict(zip(self._input_names,
                         grad_batch(outs, self._inputs, [cots[k] for k in keys]), strict=True))
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
        if top_k is not None:
            mag = dense.abs()
            res["abs_sum"] = mag.sum(-1)
            top = torch.topk(mag, min(top_k, mag.shape[1]), dim=-1)
            del mag
            res["cols"], res["vals"] = top.indices, dense.gather(1, top.indices)
        elif select is not None:
            res["select"] = dense[:, select.to(dense.device)]
        else:
            res["dense"] = dense.clone()
        return res

    def bias_labels(self) -> list[str]:
        return [clean_name(n) for n in self.space.biases]
