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
from lin_lens._tl import canonical
from lin_lens.analyses.decompose import post_norm_parts, writes
from lin_lens.errors import InvalidArgumentError, NotExactError, UnsupportedFeatureError
from lin_lens.freeze import detached
from lin_lens.maps import default_tolerance
from lin_lens.maps.columns import GraphColumns
from lin_lens.maps.graph import batched_grad
from lin_lens.qk.form import ScoreForm
from lin_lens.qk.result import Parts, QKAttribution

NOT_SUMMING = ("the node writes do not sum to the residual stream entering layer {L} (this block "
               "layout is not one lin_lens knows); use by='tokens'")


class NodeSides:
    """Everything node parts need for one layer and query position (see the module docstring).

    ``heads``/``neurons`` choose the node kinds (else whole attention layers / MLPs), as
    :func:`lin_lens.attribution_graph` does."""

    def __init__(self, model: Any, tokens: Tensor, form: ScoreForm, n: int,
                 nodes: Sequence[str]):
        nodes = (nodes,) if isinstance(nodes, str) else tuple(nodes)
        if not nodes or set(nodes) - {"heads", "neurons"}:
            raise InvalidArgumentError(f"nodes={nodes!r}: give 'heads' and/or 'neurons'")
        self.model, self.form = model, form
        self.heads, self.neurons = "heads" in nodes, "neurons" in nodes
        self.n = n  # positions read: every query asked about is below n
        self._cache(tokens)
        self._paths(tokens)
        self._writes(self.n)
        self._catalog()

    # -- the forward values and the residual writes ---------------------------------------------
    def _cache(self, tokens: Tensor) -> None:
        L, model = self.form.layer, self.model
        leaves = ("hook_embed", "hook_pos_embed", "attn.hook_z", "mlp.hook_post", "hook_mlp_out",
                  "hook_scale", f"blocks.{L}.hook_resid_pre")
        wanted = [h for h in model.hook_dict if h.endswith(leaves) and (
            not h.startswith("blocks.") or int(h.split(".")[1]) <= L)]
        names = set(wanted) | {canonical(model, h) for h in wanted}
        kw = {"stop_at_layer": L + 1} if L + 1 < int(model.cfg.n_layers) else {}
        with torch.no_grad(), detached(model):
            _, cache = model.run_with_cache(tokens[:, :self.n],
                                            names_filter=lambda n: n in names, **kw)
        self.cache = cache
        self.resid = cache[f"blocks.{L}.hook_resid_pre"][0].detach()  # [n, d_model]

    def _writes(self, n: int) -> None:
        L, cfg = self.form.layer, self.model.cfg
        at = (0, slice(0, n))
        parts = writes(self.model, self.cache, at, list(range(L)), L)
        if str(getattr(cfg, "positional_embedding_type", "")) == "shortformer":
            parts = [p for p in parts if p[1] != "pos_embed"]  # enters Q/K only (a constant)
        total = torch.stack([p[2].expand(n, -1) for p in parts]).sum(0)
        err = relative_error(self.resid, total)
        if not err <= default_tolerance(self.resid.dtype):
            raise NotExactError(_Failed(f"blocks.{L}.hook_resid_pre", err),
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
            dq, dk = f.n_heads * f.d_head, f.n_kv * f.d_head
            # a row's cotangent at every position at once: the path is position-local
            eye_q = torch.eye(dq, dtype=q.dtype, device=q.device)[:, None, :].expand(
                dq, self.n, dq)
            gq = batched_grad(q.reshape(self.n, dq), cols.x, eye_q)  # [dq, 1, n, d_model]
            self.Mq = gq[:, 0].permute(1, 0, 2).contiguous()  # [n, dq, d_model]
            eye_k = torch.eye(dk, dtype=k.dtype, device=k.device)[:, None, :].expand(
                dk, self.n, dk)
            gk = batched_grad(k.reshape(self.n, dk), cols.x, eye_k)  # [dk, 1, n, d_model]
            self.Mk = gk[:, 0].permute(1, 0, 2).contiguous()  # [n, dk, d_model]
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
        self._q_all: dict[int, Tensor] = {}

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
                layer = _layer_of(label)
                attn_sum[layer] = attn_sum.get(layer, 0) + w
                continue
            if kind == "mlp" and self.neurons:
                layer = int(label[1:].split(".")[0])
                d_mlp = int(self.model.cfg.d_mlp)
                desc += [("neuron", layer, i, "") for i in range(d_mlp)]
                src.append(("neurons", layer))
                continue
            desc.append((kind, _layer_of(label), _index_of(label), label))
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
            if unscaled is not None:
                W, scale = unscaled(W), scale[0, :self.n, 0]
            self._neuron_cache[layer] = (W, scale)
        return self._neuron_cache[layer]

    def _post(self, layer: int, p: int) -> Tensor:
        post = self.cache[f"blocks.{layer}.mlp.hook_post"][0, p]
        W, scale = self._neurons(layer)
        return post if scale is None else post / scale[p]

    def _marginals(self, p: int, g: Tensor) -> Tensor:
        """Every node's part at ``p`` dotted with ``g`` [d_model] (catalog order)."""
        out = []
        for kind, x in self.src:
            if kind == "write":
                out.append((x[p] @ g)[None])
            else:
                W, _ = self._neurons(x)
                out.append(self._post(x, p) * (W @ g))
        return torch.cat(out)

    def _vectors(self, p: int, M: Tensor, idx: list[int] | None = None) -> Tensor:
        """Nodes' parts at ``p`` through ``M`` [rows, d_model] ([P, rows]; only ``idx``)."""
        if idx is not None:
            out = []
            starts = self._starts()
            for i in idx:
                j = max(k for k, st in enumerate(starts) if st <= i)
                kind, x = self.src[j]
                if kind == "write":
                    out.append(x[p] @ M.T)
                else:
                    W, _ = self._neurons(x)
                    n_i = i - starts[j]
                    out.append(self._post(x, p)[n_i] * (W[n_i] @ M.T))
            return torch.stack(out) if out else M.new_zeros(0, M.shape[0])
        out = []
        for kind, x in self.src:
            if kind == "write":
                out.append((x[p] @ M.T)[None])
            else:
                W, _ = self._neurons(x)
                out.append(self._post(x, p)[:, None] * (W @ M.T))
        return torch.cat(out)

    def _starts(self) -> list[int]:
        if not hasattr(self, "_start_list"):
            starts, at = [], 0
            for kind, _ in self.src:
                starts.append(at)
                at += int(self.model.cfg.d_mlp) if kind == "neurons" else 1
            self._start_list = starts
        return self._start_list

    def _parts(self, p: int, values: Tensor, consts: dict[str, Tensor]) -> Parts:
        kinds = [d[0] for d in self.desc]
        return Parts(kinds + [_const_kind(o) for o in consts],
                     [d[1] for d in self.desc] + [self.form.layer] * len(consts),
                     [p if d[0] != "bias" else -1 for d in self.desc] + [-1] * len(consts),
                     [d[2] for d in self.desc] + [-1] * len(consts),
                     [d[3] for d in self.desc] + [_origin_name(o) for o in consts],
                     torch.cat([values, torch.stack(list(consts.values()))]) if consts
                     else values)

    def q_parts(self, head: int, t: int) -> Parts:
        f = self.form
        if t not in self._q_all:  # every head at once: [P, heads·d]
            self._q_all[t] = self._vectors(t, self.Mq[t])
        V = self._q_all[t].reshape(-1, f.n_heads, f.d_head)[:, head]
        return self._parts(t, V, {o: c[t, head] for o, c in self.q_const.items()})

    def k_parts(self, head: int, t: int, s: int, gate: Tensor, top: int
                ) -> tuple[Parts, Parts]:
        """(the ``top`` key-side parts at key ``s`` by |marginal| and one exact rest part,
        every key-side part's marginal ``gate · q · k_b(s)``)."""
        f = self.form
        kv = f.kv_head(head)
        M = self.Mk[s].reshape(f.n_kv, f.d_head, -1)[kv]  # [d, d_model]
        qg = gate * self.q_actual[t, head]
        marg = self._marginals(s, M.T @ qg)
        consts = {o: c[s, kv] for o, c in self.k_const.items()}
        full = self._parts(s, marg, {o: c @ qg for o, c in consts.items()})
        keep = full.vectors.abs().topk(min(top, len(full))).indices.tolist()
        kept = full.subset(keep)
        n_nodes = len(self.desc)
        vecs = self._vectors(s, M, [i for i in keep if i < n_nodes])
        cv = [consts[o] for o in consts]
        rows, vi = [], 0
        for i in keep:
            if i < n_nodes:
                rows.append(vecs[vi])
                vi += 1
            else:
                rows.append(cv[i - n_nodes])
        kept.vectors = torch.stack(rows)
        rest = self.k_actual[s, kv] - kept.vectors.sum(0)
        kept.kind.append("rest")
        kept.layer.append(-1)
        kept.pos.append(s)
        kept.index.append(-1)
        kept.name.append("(other key-side nodes)")
        kept.vectors = torch.cat([kept.vectors, rest[None]])
        return kept, full

    def attribution(self, head: int, t: int, keys: list[int], top: int, str_tokens: list[str],
                    tokens: Tensor) -> QKAttribution:
        f = self.form
        if t >= self.n:
            raise InvalidArgumentError(f"query {t} beyond the {self.n} positions read")
        kv = f.kv_head(head)
        gate = f.gate(head, t, keys)
        q = self.q_parts(head, t)
        ks, alls = zip(*(self.k_parts(head, t, s, gate[j], top) for j, s in enumerate(keys)),
                       strict=True)
        return QKAttribution(
            layer=f.layer, head=head, kv_head=kv, query=t, keys=keys, by="nodes", q_parts=q,
            k_parts=list(ks), gate=gate, bias=f.position_bias(head, t, keys),
            scores=f.scores[head, t, keys], pattern=f.pattern[head, t, keys],
            q=f.q[t, head], k=f.k[keys, kv], str_tokens=str_tokens,
            tokens=tokens[0].detach().cpu(), k_marginal_all=list(alls),
            meta={"form": f.how, "q_hook": f.q_hook, "k_hook": f.k_hook,
                  "nodes": ("heads" if self.heads else "attn") + "+"
                  + ("neurons" if self.neurons else "mlp")})


def _const_kind(o: str) -> str:
    return "pos_embed" if o == "hook_pos_embed" else "bias"


class _Failed:
    """What NotExactError reports when the writes do not sum (no map to carry)."""

    def __init__(self, hook: str, err: float):
        self.hook, self.relative_error = hook, err


def _layer_of(label: str) -> int:
    if label.startswith("L"):
        return int(label[1:].replace(".", "H").split("H")[0])
    if label.startswith("blocks."):
        return int(label.split(".")[1])
    return -1


def _index_of(label: str) -> int:
    if label.startswith("L") and "H" in label:
        return int(label.split("H")[1])
    return -1


def _origin_name(o: str) -> str:
    if o == "hook_pos_embed":
        return "pos_embed"
    return o.replace("._original_component", "").replace("_original_component.", "")


def node_sides(model: Any, tokens: Tensor, form: ScoreForm, n: int,
               nodes: Sequence[str]) -> NodeSides:
    """The node parts of layer ``form.layer`` for queries below position ``n``."""
    for h in (f"blocks.{form.layer}.hook_resid_pre",):
        if h not in model.hook_dict:
            raise UnsupportedFeatureError(f"{h}: by='nodes' reads the residual stream there")
    if canonical(model, form.q_hook) == canonical(model, form.k_hook):
        raise UnsupportedFeatureError("queries and keys share one hook")
    return NodeSides(model, tokens, form, n, nodes)


