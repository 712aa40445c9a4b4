"""``attribution_graph``: the exact, pruned attribution graph of heads and neurons for one prompt.

Cost: the rows of edges are batched backward passes through the cut network, one cotangent per
receiving node. With pruning (the default) only the rows the pruning needs are computed: the
targets' rows, then rows of the nodes with the highest influence so far, re-ranked after every
few batches (circuit-tracer's order), up to ``max_nodes``; then the exact rows of the kept
receivers, restricted to the kept nodes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lin_lens._precision import exact_matmul
from lin_lens._tl import LOGITS, model_device, model_dtype
from lin_lens._types import Inputs, MemoryBudget
from lin_lens.errors import ArgumentTypeError, InvalidArgumentError, NotExactError
from lin_lens.graph import prune as P
from lin_lens.graph.engine import Attributor, row_memory
from lin_lens.graph.nodes import KINDS, SOURCES, TOTAL_VALUED
from lin_lens.graph.qk import attach_qk
from lin_lens.graph.result import AttributionGraph
from lin_lens.graph.writes import node_writes
from lin_lens.maps import budget, default_tolerance, to_tokens
from lin_lens.maps.request import check_hook, is_int_position, positions
from lin_lens.progress import progress_bar

DENSE_LIMIT = 20_000  # prune=False keeps an [N, N] adjacency: refuse beyond this many nodes


@exact_matmul()
def attribution_graph(
    model: Any,
    prompt: Inputs,
    *,
    target: int | Sequence[int] | Int[Tensor, " k"] | Float[Tensor, " d_out"] | None = None,
    pos: int = -1,
    hook: str = LOGITS,
    nodes: Sequence[str] = ("heads", "neurons"),
    prune: bool = True,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_nodes: int | None = 1024,
    batch_size: int = 128,
    row_top_k: int = 2048,
    check: bool = True,
    tol: float | None = None,
    progress: bool | None = None,
    prepend_bos: bool | None = None,
    writes: int = 10,
    qk: bool = False,
    qk_keys: int = 1,
    qk_top: int = 10,
    max_memory: MemoryBudget = None,
) -> AttributionGraph:
    """The exact attribution graph of ``target`` for one prompt, in detached mode.

    Nodes: the input token embeddings (by position), every constant origin (each nonzero bias
    parameter, the positional embeddings by position), attention heads by (layer, head, query
    position), MLP neurons by (layer, neuron, position) — or whole attention layers / MLPs by
    (layer, position) when ``nodes`` leaves out ``"heads"`` / ``"neurons"`` — and the target(s).

    Edge A → B: the direct linear effect of A's output on B's value in the detached network
    (norm scales, attention patterns and MLP gates frozen): ``∂ value(B) / ∂ out(A) · out(A)``
    with every other node's output held fixed. A head at query position q receives from nodes at
    positions ≤ q through its value path. Values: a neuron's is its activation (``hook_post``);
    a target's, the logit (or ``direction · act``); a head's, attention layer's or MLP's, its
    output read along the total gradient of the objective ``J = Σ_k w_k target_k`` there, i.e.
    its total effect on J (so an edge into a head is the part of A's effect on J that passes
    through that head first). Every value is exactly the sum of its incoming edges over all
    nodes (Euler's identity for the linear network); ``total_effect`` is each node's effect on J
    over all paths, which is what zeroing its output with everything frozen changes J by.

    Args:
        model: ``HookedTransformer`` or ``TransformerBridge``.
        prompt: text or token ids.
        target: None (the top next-token logit at ``pos``), a token id or list of ids (logits;
            weights = their probabilities, normalised), or a float direction on ``hook``
            (e.g. ``W_U[:, a] - W_U[:, b]`` … on the logits: a logit difference).
        pos: the target position (an int; nodes after it cannot affect it and are left out).
        hook: ``"logits"`` or any hook with an exact linear map (e.g. a residual stream).
        nodes: ``("heads", "neurons")`` by default; leave one out for whole layers.
        prune: circuit-tracer's pruning; ``False`` keeps every node and edge (tiny models).
        node_threshold, edge_threshold: cumulative influence kept (circuit-tracer's 0.8, 0.98).
        max_nodes: at most this many receivers get their rows for the influence ranking
            (None: all).
        batch_size: receivers per batched backward pass, at most: fewer at long prompts
            (what fits ``max_memory``, each row spans every candidate sender; on a CPU also
            about ``lin_lens.maps.budget.PASS_ROWS`` token-rows per pass;
            ``meta["batch_size"]``).
        row_top_k: entries per row kept for the influence ranking (exact rows are recomputed
            for the kept nodes).
        check, tol: refuse (:class:`lin_lens.NotExactError`) a graph whose targets are not the
            sum of their incoming edges to ``tol`` (default: ``lin_lens.default_tolerance``).
        progress: progress bars (default: only for long loops).
        prepend_bos: passed to ``model.to_tokens`` for text.
        writes: tokens per node in ``graph.top_tokens``, what each head / neuron node writes
            decoded through the unembedding (``lin_lens.graph.node_writes``); 0: none.
        qk: also explain why each kept head attends where it does (``graph.qk``, Neuronpedia's
            ``qk_tracing_results`` per head node: ``lin_lens.graph.qk.attach_qk``), at its
            ``qk_keys`` most attended keys with ``qk_top`` contributors per list.
        max_memory: byte budget (int or e.g. ``"8GB"``; default min(available RAM / 2, 8 GB)).
            A prompt whose graph does not fit one row at a time is refused before any pass
            (:class:`lin_lens.MemoryBudgetError`, with the estimate).
    """
    t0 = time.perf_counter()
    tokens = to_tokens(model, prompt, prepend_bos)
    n = tokens.shape[1]
    if not is_int_position(pos):
        raise ArgumentTypeError(f"pos={pos!r}: the target position must be one int")
    pos = positions(pos, n)[0]
    check_hook(model, hook, "target")
    nodes = (nodes,) if isinstance(nodes, str) else tuple(nodes)
    if not nodes or set(nodes) - {"heads", "neurons"}:
        raise InvalidArgumentError(f"nodes={nodes!r}: give 'heads' and/or 'neurons'")
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise InvalidArgumentError(f"{name}={v!r} must be in [0, 1]")
    if max_nodes is not None and max_nodes < 1 or batch_size < 1 or row_top_k < 1:
        raise InvalidArgumentError(
            f"max_nodes={max_nodes!r}, batch_size={batch_size!r}, row_top_k={row_top_k!r} "
            "must be positive")
    batch_size = _fitting_batch(model, n, nodes, batch_size, max_memory)
    strs = _str_tokens(model, tokens)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        att = Attributor(stack, model, tokens, target, hook, pos, "heads" in nodes,
                         "neurons" in nodes, lambda i: _decode(model, i))
        if prune:
            part = _pruned(att, node_threshold, edge_threshold, max_nodes, batch_size,
                           row_top_k, progress)
        else:
            part = _full(att, batch_size, progress)
    graph = _assemble(model, att, tokens, strs, prompt, part)
    graph.meta.update(
        prune=prune, node_threshold=node_threshold, edge_threshold=edge_threshold,
        max_nodes=max_nodes, row_top_k=row_top_k, n_candidates=att.space.size,
        batch_size=batch_size,
        rows_computed=part.rows, seconds=round(time.perf_counter() - t0, 3))
    if check:
        bound = tol if tol is not None else default_tolerance(model_dtype(model))
        if not graph.relative_error <= bound:
            raise NotExactError(graph, bound)
    if writes:  # for reading the graph (the explorer's panel, the JSON's top_tokens)
        graph.top_tokens = node_writes(model, graph, writes, progress=progress)
    if qk:
        t_qk = time.perf_counter()
        attach_qk(model, graph, keys=qk_keys, top=qk_top, progress=progress)
        graph.meta["qk_seconds"] = round(time.perf_counter() - t_qk, 3)
    return graph


@dataclass
class Kept:
    """What pruning keeps: node ids ``sel`` [K] (into the node space), their exact edges
    ``A`` [K, K] (rows receivers), the kept-edge mask, every candidate's influence, each kept
    receiver's full incoming total (over all candidates), and how many rows were computed."""

    sel: Tensor
    A: Tensor
    edge: Tensor
    infl: Tensor
    full_in: Tensor
    rows: int


def _fitting_batch(model: Any, n: int, nodes: tuple[str, ...], batch_size: int,
                   max_memory: MemoryBudget) -> int:
    device = model_device(model)
    fixed, per_row = row_memory(model, n, model_dtype(model), "heads" in nodes,
                                "neurons" in nodes)
    free = budget.check(fixed + per_row, f"an attribution graph of {n} tokens (one row per pass)",
                        max_memory, device=device, hint=(
                            "Shorten the prompt, leave out node kinds (nodes=('heads',)), or "
                            "raise max_memory.")) - fixed
    # a CPU gains nothing beyond about PASS_ROWS token-rows per pass, a GPU wants all that fit
    cap = budget.PASS_ROWS // n if device.type == "cpu" else batch_size  # BENCHMARKS.md
    return max(1, min(batch_size, cap, free // per_row))


def _batches(idx: Tensor, size: int):
    for i in range(0, len(idx), size):
        yield idx[i:i + size]


def _target_weights(att: Attributor) -> Tensor:
    w = torch.zeros(att.space.size, dtype=torch.float64)
    t = att.space.targets
    w[t.start:t.stop] = att.target.weights.detach().double().cpu()
    return w


def _full(att: Attributor, batch_size: int, progress: bool | None) -> Kept:
    """Every row of every receiver: the complete graph (tiny models)."""
    space = att.space
    if space.size > DENSE_LIMIT:
        raise InvalidArgumentError(
            f"prune=False keeps the whole [{space.size}, {space.size}] adjacency; use "
            f"prune=True (or fewer node kinds) for more than {DENSE_LIMIT} nodes")
    recv = space.receiver_mask().nonzero().flatten()
    A = att.T.new_zeros((space.size, space.size))
    bar = progress_bar(len(recv), "attribution rows", progress, unit="row")
    try:
        for chunk in _batches(recv, batch_size):
            A[chunk.to(A.device), :space.n_senders] = att.rows(chunk)["dense"]
            bar.update(len(chunk))
    finally:
        bar.close()
    infl = P.influence_dense(P.normalize_abs(A.double().cpu()), _target_weights(att))
    return Kept(torch.arange(space.size), A, A != 0, infl, A.sum(-1), len(recv))


def _pruned(att: Attributor, node_threshold: float, edge_threshold: float,
            max_nodes: int | None, batch_size: int, top_k: int, progress: bool | None) -> Kept:
    """circuit-tracer's pruning: rank receivers by influence from approximate rows (their
    ``top_k`` largest edges), keep the nodes that carry ``node_threshold`` of it, then compute
    the kept receivers' exact rows and prune edges to ``edge_threshold``."""
    space = att.space
    w = _target_weights(att)
    targets = torch.arange(space.targets.start, space.targets.stop)
    ranking = _Ranking(att, w, min(top_k, space.n_senders))
    ranking.visit(targets)
    ranking.explore(targets, max_nodes, batch_size, progress)
    infl = ranking.influence()
    source = torch.zeros(space.size, dtype=torch.bool)
    for b in space.blocks:
        if b.kind in SOURCES:
            source[b.start:b.stop] = True
    kept = infl >= P.find_threshold(infl, node_threshold)
    kept &= ranking.visited | source  # a receiver without its row has no incoming edges
    kept[space.blocks[0].start:space.blocks[0].stop] = True  # token embeddings
    kept[targets] = True
    sel = kept.nonzero().flatten()
    is_recv = ~source[sel]
    A, full_in = _exact_rows(att, sel, is_recv, batch_size, progress)
    always = torch.zeros(len(sel), dtype=torch.bool)
    always[(sel < space.blocks[0].stop) | (sel >= space.targets.start)] = True
    edge, node = P.prune_edges(A.double().cpu(), w[sel], always, is_recv & ~always,
                               edge_threshold)
    keep = node.nonzero().flatten()
    kd = keep.to(A.device)
    return Kept(sel[keep], A[kd][:, kd], edge[keep][:, keep], infl, full_in[kd],
                len(targets) + int(ranking.visited.sum()) + int(is_recv.sum()))


class _Ranking:
    """Approximate rows (each receiver's ``k`` largest |edges|, normalised) gathered in order of
    influence, circuit-tracer's way: visit the most influential unvisited receivers, re-rank."""

    def __init__(self, att: Attributor, w: Tensor, k: int):
        self.att, self.w, self.k = att, w, k
        self.row_nodes: list[Tensor] = []
        self.cols: list[Tensor] = []
        self.vals: list[Tensor] = []
        self.visited = torch.zeros(att.space.size, dtype=torch.bool)

    def visit(self, chunk: Tensor) -> None:
        r = self.att.rows(chunk, top_k=self.k)
        self.row_nodes.append(chunk)
        self.cols.append(r["cols"].cpu())
        norm = r["vals"].abs() / r["abs_sum"][:, None].clamp_min(1e-30)
        self.vals.append(norm.double().cpu())

    def influence(self) -> Tensor:
        return P.influence_sparse(torch.cat(self.row_nodes), torch.cat(self.cols),
                                  torch.cat(self.vals), self.w)

    def explore(self, targets: Tensor, max_nodes: int | None, batch_size: int,
                progress: bool | None) -> None:
        recv = self.att.space.receiver_mask()
        recv[targets] = False
        budget = int(recv.sum()) if max_nodes is None else min(max_nodes, int(recv.sum()))
        bar = progress_bar(budget, "attribution rows", progress, unit="row")
        try:
            done = 0
            while done < budget:
                score = self.influence()
                score[~recv | self.visited] = 0
                pending = torch.argsort(score, descending=True)[:min(4 * batch_size,
                                                                     budget - done)]
                pending = pending[score[pending] > 0]
                if not len(pending):
                    break
                # sorted by node id = by layer: a batch's backward goes no deeper than needed
                for chunk in _batches(pending.sort().values, batch_size):
                    self.visit(chunk)
                    self.visited[chunk] = True
                    done += len(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()


def _exact_rows(att: Attributor, sel: Tensor, is_recv: Tensor, batch_size: int,
                progress: bool | None) -> tuple[Tensor, Tensor]:
    """The exact rows of the kept receivers restricted to the kept nodes ``A`` [K, K], and
    each receiver's full incoming total over every candidate [K] (NaN for sources)."""
    A = att.T.new_zeros((len(sel), len(sel)))
    full_in = att.T.new_full((len(sel),), float("nan"))
    senders = sel[sel < att.space.n_senders]  # sorted; kept targets come last, send nothing
    where = is_recv.nonzero().flatten()
    bar = progress_bar(len(where), "kept rows", progress, unit="row")
    try:
        for chunk in _batches(where, batch_size):
            r = att.rows(sel[chunk], select=senders)
            cd = chunk.to(A.device)
            A[cd, :len(senders)] = r["select"]
            full_in[cd] = r["total"]
            bar.update(len(chunk))
    finally:
        bar.close()
    return A, full_in


def _assemble(model, att: Attributor, tokens: Tensor, strs: list[str], prompt: Any,
              kept: Kept) -> AttributionGraph:
    space = att.space
    sel, A, edge, infl, full_in = kept.sel, kept.A, kept.edge, kept.infl, kept.full_in
    desc = space.describe(tokens[0], att.target.ids or list(range(len(att.T))))
    kind = desc["kind"][sel]
    recv = torch.tensor([KINDS[k] not in SOURCES for k in kind.tolist()])
    full_in = torch.where(recv.to(full_in.device), full_in, float("nan"))
    readouts = {}
    for i, g in enumerate(sel.tolist()):
        b = space.block_of(g)
        if b.kind in TOTAL_VALUED:
            local = g - b.start
            d = att.dirs[b.source][0]
            readouts[i] = (d[divmod(local, space.n_heads)] if b.kind == "head" else d[local]) \
                .detach().clone()
    bias_names = att.bias_labels()
    t0 = space.targets.start
    labels = [_label(KINDS[k], int(desc["layer"][g]), int(desc["pos"][g]),
                     g - t0 if KINDS[k] == "target" else int(desc["index"][g]), strs,
                     att.target.labels, bias_names)
              for k, g in zip(kind.tolist(), sel.tolist(), strict=True)]
    t = att.target
    return AttributionGraph(
        node_ids=sel, kind=kind, layer=desc["layer"][sel], pos=desc["pos"][sel],
        index=desc["index"][sel], labels=labels,
        value=att.value[sel.to(att.value.device)].detach(),
        total_effect=att.total_effect[sel.to(att.value.device)].detach(),
        influence=infl[sel].float(), cumulative=P.cumulative_scores(infl)[sel].float(),
        adjacency=A.detach(), edge_mask=edge.to(A.device), incoming_total=full_in.detach(),
        readouts=readouts, tokens=tokens[0].detach().cpu(), str_tokens=strs,
        prompt=prompt if isinstance(prompt, str) else "".join(strs),
        target={"hook": t.hook, "pos": t.pos, "ids": t.ids, "direction": t.direction,
                "labels": t.labels, "weights": t.weights.detach(),
                "probs": None if t.probs is None else t.probs.detach(),
                "value": att.T.detach(), "value_from_leaves": att.T_cut.detach()},
        meta={"model": _model_name(model),
              "backend": type(model).__name__, "n_layers": model.cfg.n_layers,
              "n_heads": model.cfg.n_heads, "d_mlp": model.cfg.d_mlp,
              "d_vocab": model.cfg.d_vocab,
              "bias_names": bias_names, "bias_params": list(space.biases),
              "dtype": str(att.T.dtype).replace("torch.", "")})


_LABELS = {"embed": "emb@{pos} {tok!r}", "pos_embed": "pos@{pos}", "head": "L{layer}H{index}@{pos}",
           "attn": "L{layer}.attn@{pos}", "neuron": "L{layer}N{index}@{pos}",
           "mlp": "L{layer}.mlp@{pos}"}


def _label(kind: str, layer: int, pos: int, index: int, strs: list[str], target_labels: list[str],
           bias_names: list[str]) -> str:
    if kind == "bias":
        return bias_names[index]
    if kind == "target":
        t = target_labels[index]
        return t if t.startswith("direction") else f"logit {t!r}"
    return _LABELS[kind].format(pos=pos, layer=layer, index=index,
                                tok=strs[pos] if kind == "embed" else None)


def _model_name(model: Any) -> str:
    """lin_lens.load_model's name (e.g. "smollm2-135m"), else the config's model name."""
    info = getattr(model, "lin_lens_info", None)
    if isinstance(info, dict) and info.get("name"):
        return str(info["name"])
    return str(getattr(model.cfg, "model_name", None) or type(model).__name__)


def _decode(model: Any, i: int) -> str:
    tok = getattr(model, "tokenizer", None)
    try:
        return tok.decode([i]) if tok is not None else f"#{i}"
    except Exception:  # noqa: BLE001 - a label only
        return f"#{i}"


def _str_tokens(model: Any, tokens: Tensor) -> list[str]:
    return [_decode(model, int(i)) for i in tokens[0].tolist()]
