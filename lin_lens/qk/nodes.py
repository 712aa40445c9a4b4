"""Query and key parts by attribution-graph node, through each node's direct path.

The residual stream entering layer ``L`` at position ``p`` is exactly the sum of what the nodes
at ``p`` wrote (token and position embeddings, each head's ``z_h W_O[h]``, each neuron's
``post_n W_out[n]``, each bias; a post-attention/-MLP norm applied with its frozen scale):
:func:`lin_lens.analyses.decompose.writes`, checked against the model's own residual stream. The
layer's query and key at ``p`` are an exact affine function of that stream (its norm's scale
frozen, rotary fixed by the position): ``q(p) = M_p r(p) + c_p``. The rows of ``M_p`` come from
backward passes through layer ``L``'s own query/key path only, and each constant ``c_p`` (``b_Q``,
``b_K``, the norm's bias, a shortformer's position embedding) from forward columns of that path,
so a node's part of the query is ``M_t`` applied to what it wrote — a neuron's, ``post_n[t] ·
M_t W_out[n]`` — and its share of a score at key ``s`` needs one product ``W_out (M_sᵀ g q(t))``
per layer: the cost never grows with the number of nodes times ``d_head``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lin_lens._numeric import relative_error
from lin_lens._tl import canonical, hook_dict
from lin_lens.analyses.decompose import post_norm_parts, writes
from lin_lens.errors import InvalidArgumentError, NotExactError, UnsupportedFeatureError
from lin_lens.maps import budget, default_tolerance
from lin_lens.maps.columns import GraphColumns
from lin_lens.maps.graph import batched_grad
from lin_lens.qk.form import ScoreForm
from lin_lens.qk.node_parts import (
    FailedSum,
    const_dots,
    const_kind,
    index_of,
    layer_of,
    node_cache,
    origin_name,
    top_indices,
)
from lin_lens.qk.result import Parts, QKAttribution

NOT_SUMMING = ("the node writes do not sum to the residual stream entering layer {L} (this block "
               "layout is not one lin_lens knows); use by='tokens'")


class NodeSides:
    """Everything node parts need for one layer and query position (see the module docstring).

    ``heads``/``neurons`` choose the node kinds (else whole attention layers / MLPs), as
    :func:`lin_lens.attribution_graph` does."""

    def __init__(self, model: Any, tokens: Tensor, form: ScoreForm, n: int,
                 nodes: Sequence[str], cache: Any = None, heads: Sequence[int] | None = None):
        nodes = (nodes,) if isinstance(nodes, str) else tuple(nodes)
        if not nodes or set(nodes) - {"heads", "neurons"}:
            raise InvalidArgumentError(f"nodes={nodes!r}: give 'heads' and/or 'neurons'")
        self.model, self.form = model, form
        self.heads, self.neurons = "heads" in nodes, "neurons" in nodes
        self.n = n  # positions read: every query asked about is below n
        self.heads_used = sorted(set(range(form.n_heads) if heads is None else heads))
        self.cache = cache if cache is not None else node_cache(model, tokens[:, :n],
                                                                form.layer)
        self.resid = self.cache[f"blocks.{form.layer}.hook_resid_pre"][0, :n].detach()
        self._paths(tokens)
        self._writes(self.n)
        self._catalog()

    # -- the residual writes ----------------------------------------------------------------------
    def _writes(self, n: int) -> None:
        L, cfg = self.form.layer, self.model.cfg
        at = (0, slice(0, n))
        parts = writes(self.model, self.cache, at, list(range(L)), L)
        if str(getattr(cfg, "positional_embedding_type", "")) == "shortformer":
            parts = [p for p in parts if p[1] != "pos_embed"]  # enters Q/K only (a constant)
        total = torch.stack([p[2].expand(n, -1) for p in parts]).sum(0)
        err = relative_error(self.resid, total)
        if not err <= default_tolerance(self.resid.dtype):
            raise NotExactError(FailedSum(f"blocks.{L}.hook_resid_pre", err),
                                default_tolerance(self.resid.dtype), NOT_SUMMING.format(L=L))
        self.write_parts = parts  # (label, kind, [n, d_model]) from decompose

    # -- layer L's own query/key path ------------------------------------------------------------
    def _paths(self, tokens: Tensor) -> None:
        """``Mq`` [heads·d, d_model] at the query position, ``Mk`` [n, kv·d, d_model] at every
        key, and each constant origin's part of the query and the keys."""
        f, model, L = self.form, self.model, self.form.layer
        src = f"blocks.{L}.hook_resid_pre"
        hooks = [f.q_hook, f.k_hook]
        with contextlib.ExitStack() as stack:
            cols = GraphColumns(stack, model, tokens[:, :self.n], src, hooks,
                                list(range(self.n)))
            q = cols.acts[f.q_hook][0].reshape(self.n, f.n_heads, f.d_head)
            k = cols.acts[f.k_hook][0].reshape(self.n, f.n_kv, f.d_head)
            if f.rotate is not None:
                q, k = f.rotate(q, "q"), f.rotate(k, "k")
            # rows of the requested heads only (and their key-value heads), each row's cotangent
            # at every position at once: the path is position-local
            self.Mq = self._rows(q, cols.x, self.heads_used)  # {head: [n, d, d_model]}
            kv_used = sorted({f.kv_head(h) for h in self.heads_used})
            self.Mk = self._rows(k, cols.x, kv_used)
            self.q_const: dict[str, Tensor] = {}
            self.k_const: dict[str, Tensor] = {}
            for o in cols.origins():
                out = cols.run(None, origin=o)
                oq = out[f.q_hook].reshape(self.n, f.n_heads, f.d_head)
                ok = out[f.k_hook].reshape(self.n, f.n_kv, f.d_head)
                if f.rotate is not None:
                    oq, ok = f.rotate(oq, "q"), f.rotate(ok, "k")
                if bool(oq.ne(0).any()) or bool(ok.ne(0).any()):
                    self.q_const[o], self.k_const[o] = oq, ok
        self.q_actual, self.k_actual = q.detach(), k.detach()

    def _rows(self, y: Tensor, x: Tensor, heads: list[int]) -> dict[int, Tensor]:
        """``{h: ∂y[p, h]/∂x[p]}`` ``[n, d_head, d_model]`` for every position ``p`` at once."""
        n, H, d = y.shape
        cot = torch.zeros(len(heads) * d, n, H, d, dtype=y.dtype, device=y.device)
        for i, h in enumerate(heads):
            cot[torch.arange(i * d, (i + 1) * d), :, h, torch.arange(d)] = 1
        # a few rows per pass: one pass over every row is memory-bound (5x slower at 64 tokens)
        g = batched_grad(y, x, cot, chunk=budget.preferred_chunk(n))[:, 0]  # [rows, n, d_model]
        return {h: g[i * d:(i + 1) * d].permute(1, 0, 2).contiguous()
                for i, h in enumerate(heads)}

    # -- node parts ------------------------------------------------------------------------------
    def _catalog(self) -> None:
        """The nodes at a position, in one order: ``(kind, layer, index, name)`` descriptors and
        where each part comes from (a residual write, or a layer's block of neurons)."""
        desc: list[tuple[str, int, int, str]] = []
        src: list[tuple[str, Any]] = []
        L = self.form.layer
        attn_sum: dict[int, Tensor] = {}
        for label, kind, w in self.write_parts:
            w = w.expand(self.n, -1)
            if kind == "head" and not self.heads:
                layer = layer_of(label)
                attn_sum[layer] = attn_sum.get(layer, 0) + w
                continue
            if kind == "mlp" and self.neurons:
                layer = int(label[1:].split(".")[0])
                d_mlp = int(self.model.cfg.d_mlp)
                desc += [("neuron", layer, i, "") for i in range(d_mlp)]
                src.append(("neurons", layer))
                continue
            desc.append((kind, layer_of(label), index_of(label), label))
            src.append(("write", w))
        for layer in range(L) if not self.heads else ():
            desc.append(("attn", layer, -1, f"L{layer}.attn"))
            src.append(("write", attn_sum.get(layer, torch.zeros_like(self.resid))))
        self.desc, self.src = desc, src
        self._neuron_cache: dict[int, tuple[Tensor, Tensor | None]] = {}

    def _neurons(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """(``post_norm`` without its scale applied to ``W_out`` [d_mlp, d_model], the post norm's
        frozen scale per position [n] or None): a neuron's write at ``p`` is
        ``post[p, n] · W[n] / scale[p]``."""
        if layer not in self._neuron_cache:
            block = self.model.blocks[layer]
            unscaled, scale = post_norm_parts(block, self.cache, layer, "ln2")
            W = block.mlp.W_out.detach().to(self.resid.dtype)
            if unscaled is not None and scale is not None:
                W, scale = unscaled(W), scale[0, :self.n, 0]
            self._neuron_cache[layer] = (W, scale)
        return self._neuron_cache[layer]

    def _stacked(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Every part's source stacked once: the writes ``[n_w, n, d_model]``, every neuron
        layer's ``W`` ``[n_neurons, d_model]`` and activations (over the post norm's scale)
        ``[n, n_neurons]``, and where each lands in the catalog order."""
        if not hasattr(self, "_stack"):
            writes, w_at, Ws, posts, n_at = [], [], [], [], []
            starts = self._starts()
            for (kind, x), st in zip(self.src, starts, strict=True):
                if kind == "write":
                    writes.append(x)
                    w_at.append(st)
                else:
                    W, scale = self._neurons(x)
                    post = self.cache[f"blocks.{x}.mlp.hook_post"][0, :self.n]
                    Ws.append(W)
                    posts.append(post if scale is None else post / scale[:, None])
                    n_at.append(torch.arange(st, st + W.shape[0]))
            like = self.resid
            self._stack = (
                torch.stack(writes) if writes else like.new_zeros(0, self.n, like.shape[-1]),
                torch.tensor(w_at, dtype=torch.long),
                torch.cat(Ws) if Ws else like.new_zeros(0, like.shape[-1]),
                torch.cat(posts, -1) if posts else like.new_zeros(self.n, 0),
                torch.cat(n_at) if n_at else torch.zeros(0, dtype=torch.long))
        return self._stack

    def _rows_of(self) -> tuple[Tensor, Tensor]:
        """For each catalog index: whether it is a residual write, and its row in the stacked
        writes or in the stacked neuron weights (:meth:`_stacked`)."""
        if not hasattr(self, "_row_map"):
            _, w_at, W, _, n_at = self._stacked()
            is_write = torch.zeros(len(self.desc), dtype=torch.bool)
            row = torch.zeros(len(self.desc), dtype=torch.long)
            is_write[w_at] = True
            row[w_at] = torch.arange(len(w_at))
            row[n_at] = torch.arange(W.shape[0])
            self._row_map = (is_write, row)
        return self._row_map

    def _vectors(self, p: int, M: Tensor, idx: list[int]) -> Tensor:
        """Nodes ``idx``'s parts at ``p`` through ``M`` [rows, d_model]: ``[len(idx), rows]``."""
        writes, _, W, post, _ = self._stacked()
        is_write, row = self._rows_of()
        at = torch.tensor(idx, dtype=torch.long)
        w, r = is_write[at], row[at]
        out = M.new_zeros(len(idx), M.shape[0])
        if bool(w.any()):
            out[w.to(M.device)] = writes[r[w].to(M.device), p] @ M.T
        if not bool(w.all()):
            nr = r[~w].to(M.device)
            out[(~w).to(M.device)] = post[p, nr][:, None] * (W[nr] @ M.T)
        return out

    def _starts(self) -> list[int]:
        if not hasattr(self, "_start_list"):
            starts, at = [], 0
            for kind, _ in self.src:
                starts.append(at)
                at += int(self.model.cfg.d_mlp) if kind == "neurons" else 1
            self._start_list = starts
        return self._start_list

    def _parts(self, p: int, values: Tensor, origins: Sequence[str]) -> Parts:
        """Every node's part at ``p`` and then each constant origin's, with ``values`` (one
        number each). The descriptor lists are built once (positions once per position) and
        shared, read-only, by every Parts (a model has tens of thousands of neurons)."""
        origins = tuple(origins)
        if not hasattr(self, "_desc_by"):
            d = self.desc
            self._desc_by: dict[Any, Any] = {
                "kind": [x[0] for x in d], "layer": [x[1] for x in d],
                "index": [x[2] for x in d], "name": [x[3] for x in d],
                "bias_at": [i for i, x in enumerate(d) if x[0] == "bias"]}
        memo = self._desc_by
        if origins not in memo:
            k = len(origins)
            memo[origins] = (memo["kind"] + [const_kind(o) for o in origins],
                             memo["layer"] + [self.form.layer] * k, memo["index"] + [-1] * k,
                             memo["name"] + [origin_name(o) for o in origins])
        if (p, origins) not in memo:
            pos = [p] * len(self.desc) + [-1] * len(origins)
            for i in memo["bias_at"]:
                pos[i] = -1
            memo[p, origins] = pos
        kinds, layers, index, names = memo[origins]
        return Parts(kinds, layers, memo[p, origins], index, names, values)

    def _marginals_many(self, jobs: list[tuple[int, Tensor]], consts: list[Tensor],
                        batch: int = 1024) -> Tensor:
        """Every node's marginal ``part · g`` for many ``(position, g)`` at once, then the
        constant origins' (``consts``, one vector per job): ``[n_jobs, n_nodes + n_consts]``,
        a row per job. The neurons' come from one product with ``W`` per batch of jobs (their
        activations differ by position only as a per-row scale), the residual writes' from one
        product per position."""
        writes, w_at, _, _, _ = self._stacked()
        Wc, Pc = self._catalog_weights()
        n_nodes, n_c = len(self.desc), (len(consts[0]) if consts else 0)
        dev = Wc.device
        out = Wc.new_zeros(len(jobs), n_nodes + n_c)
        w_cols = w_at.to(dev)
        for b0 in range(0, len(jobs), batch):
            part = jobs[b0:b0 + batch]
            G = torch.stack([g for _, g in part])  # [m, d_model]
            pos = torch.tensor([p for p, _ in part], dtype=torch.long, device=dev)
            out[b0:b0 + len(part), :n_nodes] = (G @ Wc.T).mul_(Pc[pos])
            by_p: dict[int, list[int]] = {}
            for c, (p, _) in enumerate(part):
                by_p.setdefault(p, []).append(c)
            for p, cs in by_p.items():
                at = torch.tensor(cs, device=dev)
                out[(b0 + at)[:, None], w_cols] = G[at] @ writes[:, p].T
        if n_c:
            out[:, n_nodes:] = torch.stack(consts)
        return out

    def _catalog_weights(self) -> tuple[Tensor, Tensor]:
        """The neurons' ``W`` rows ``[n_nodes, d_model]`` and activations ``[n, n_nodes]`` in
        catalog order, zero at the residual writes: one product gives every neuron's marginal
        in place."""
        if not hasattr(self, "_cat_w"):
            _, _, W, post, n_at = self._stacked()
            Wc = W.new_zeros(len(self.desc), W.shape[1])
            Pc = post.new_zeros(post.shape[0], len(self.desc))
            Wc[n_at.to(W.device)] = W
            Pc[:, n_at.to(post.device)] = post
            self._cat_w = (Wc, Pc)
        return self._cat_w

    def _side(self, p: int, M: Tensor, margs: list[Tensor], tops: list[list[int]],
              consts: dict[str, Tensor], actual: Tensor, rest_name: str
              ) -> tuple[Parts, list[Parts]]:
        """One side at position ``p`` through ``M`` [d_head, d_model]: every part's marginal
        ``margs`` (nodes, then constants) along each of the other side's vectors (times the
        gate), and the vectors of the parts in ``tops`` (the largest |marginal| along any of
        them) plus one exact rest part."""
        full = [self._parts(p, m, list(consts)) for m in margs]
        keep: list[int] = []
        for t in tops:
            for i in t:
                if i not in keep:
                    keep.append(i)
        kept = full[0].subset(keep)
        n_nodes = len(self.desc)
        vecs = self._vectors(p, M, [i for i in keep if i < n_nodes])
        cv = list(consts.values())
        rows, vi = [], 0
        for i in keep:
            if i < n_nodes:
                rows.append(vecs[vi])
                vi += 1
            else:
                rows.append(cv[i - n_nodes])
        kept.vectors = torch.stack(rows) if rows else actual.new_zeros(0, len(actual))
        rest = actual - kept.vectors.sum(0)
        kept.kind.append("rest")
        kept.layer.append(-1)
        kept.pos.append(p)
        kept.index.append(-1)
        kept.name.append(rest_name)
        kept.vectors = torch.cat([kept.vectors, rest[None]])
        return kept, full

    def attribution(self, head: int, t: int, keys: list[int], top: int, str_tokens: list[str],
                    tokens: Tensor) -> QKAttribution:
        return self.attributions([(head, t, keys)], top, str_tokens, tokens)[0]

    def attributions(self, requests: Sequence[tuple[int, int, list[int]]], top: int,
                     str_tokens: list[str], tokens: Tensor) -> list[QKAttribution]:
        """One :class:`QKAttribution` per ``(head, query, keys)``, their marginals computed
        together (one product per position for all of them)."""
        f = self.form
        plans, jobs, job_consts = [], [], []
        for head, t, keys in requests:
            if t >= self.n:
                raise InvalidArgumentError(f"query {t} beyond the {self.n} positions read")
            if head not in self.Mq:
                raise InvalidArgumentError(f"head {head} was not among the heads prepared")
            kv = f.kv_head(head)
            gate = f.gate(head, t, keys)
            Mq, q_act = self.Mq[head][t], self.q_actual[t, head]
            uq = [gate[j] * self.k_actual[s, kv] for j, s in enumerate(keys)]
            uk = [gate[j] * q_act for j in range(len(keys))]
            first = len(jobs)
            jobs += [(t, Mq.T @ u) for u in uq]
            jobs += [(s, self.Mk[kv][s].T @ u) for s, u in zip(keys, uk, strict=True)]
            job_consts += [const_dots(self.q_const, t, head, u) for u in uq]
            job_consts += [const_dots(self.k_const, s, kv, u)
                           for s, u in zip(keys, uk, strict=True)]
            plans.append((head, t, keys, kv, gate, Mq, q_act, first))
        # each job's marginals: every node's, then each constant origin's; its top parts
        all_margs = self._marginals_many(jobs, job_consts)
        tops = top_indices(all_margs, top)
        margs = list(all_margs)
        out = []
        for head, t, keys, kv, gate, Mq, q_act, first in plans:
            nk = len(keys)
            q, q_all = self._side(t, Mq, margs[first:first + nk], tops[first:first + nk],
                                  {o: c[t, head] for o, c in self.q_const.items()}, q_act,
                                  "(other query-side nodes)")
            ks, k_all = [], []
            for j, s in enumerate(keys):
                at = first + nk + j
                kept, full = self._side(s, self.Mk[kv][s], [margs[at]], [tops[at]],
                                        {o: c[s, kv] for o, c in self.k_const.items()},
                                        self.k_actual[s, kv], "(other key-side nodes)")
                ks.append(kept)
                k_all += full
            out.append(QKAttribution(
                layer=f.layer, head=head, kv_head=kv, query=t, keys=keys, by="nodes",
                q_parts=q, k_parts=ks, gate=gate, bias=f.position_bias(head, t, keys),
                scores=f.scores[head, t, keys], pattern=f.pattern[head, t, keys],
                q=f.q[t, head], k=f.k[keys, kv], str_tokens=str_tokens,
                tokens=tokens[0].detach().cpu(), k_marginal_all=k_all, q_marginal_all=q_all,
                meta={"form": f.how, "q_hook": f.q_hook, "k_hook": f.k_hook,
                      "nodes": ("heads" if self.heads else "attn") + "+"
                      + ("neurons" if self.neurons else "mlp")}))
        return out


def node_sides(model: Any, tokens: Tensor, form: ScoreForm, n: int,
               nodes: Sequence[str], heads: Sequence[int] | None = None, cache: Any = None
               ) -> NodeSides:
    """The node parts of layer ``form.layer`` for queries below position ``n`` (``cache``: a
    :func:`~lin_lens.qk.node_parts.node_cache` of ``tokens[:, :n]`` reaching that layer)."""
    for h in (f"blocks.{form.layer}.hook_resid_pre",):
        if h not in hook_dict(model):
            raise UnsupportedFeatureError(f"{h}: by='nodes' reads the residual stream there")
    if canonical(model, form.q_hook) == canonical(model, form.k_hook):
        raise UnsupportedFeatureError("queries and keys share one hook")
    return NodeSides(model, tokens, form, n, nodes, cache=cache, heads=heads)


