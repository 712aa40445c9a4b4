"""``QKAttribution``: one head's pre-softmax scores at one query, split exactly into pairs of a
query-side part and a key-side part, with the marginals and the constant terms."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lin_lens._html import table
from lin_lens._numeric import relative_error
from lin_lens.errors import InvalidArgumentError, InvalidPositionError

_LABELS = {"embed": "emb@{pos} {tok!r}", "pos_embed": "pos@{pos}", "head": "L{layer}H{index}@{pos}",
           "attn": "L{layer}.attn@{pos}", "neuron": "L{layer}N{index}@{pos}",
           "mlp": "L{layer}.mlp@{pos}", "token": "{pos} {tok!r}"}


def part_label(kind: str, layer: int, pos: int, index: int, name: str,
               str_tokens: list[str]) -> str:
    """A part's label, as the attribution graph writes its nodes (``"L3H5@7"``, ``"emb@2 ' is'"``),
    ``"5 ' is'"`` for a token through all paths, the origin's name for a constant."""
    if kind in _LABELS and pos >= 0:
        tok = str_tokens[pos] if kind in ("embed", "token") and 0 <= pos < len(str_tokens) else None
        return _LABELS[kind].format(pos=pos, layer=layer, index=index, tok=tok)
    return name


@dataclass
class Parts:
    """Parts of one side: descriptors (``kind`` ∈ token, embed, pos_embed, head, attn, neuron,
    mlp, bias, rest; ``layer``, ``pos``, ``index``, ``name``) and their vectors ``[P, d_head]``
    as they enter the score (or, for ``values``, one number each)."""

    kind: list[str]
    layer: list[int]
    pos: list[int]
    index: list[int]
    name: list[str]
    vectors: Tensor

    def __len__(self) -> int:
        return len(self.kind)

    def label(self, i: int, str_tokens: list[str]) -> str:
        return part_label(self.kind[i], self.layer[i], self.pos[i], self.index[i], self.name[i],
                          str_tokens)

    def subset(self, idx: list[int]) -> Parts:
        return Parts([self.kind[i] for i in idx], [self.layer[i] for i in idx],
                     [self.pos[i] for i in idx], [self.index[i] for i in idx],
                     [self.name[i] for i in idx], self.vectors[idx])


class QKAttribution:
    """Why head ``head`` of layer ``layer`` attends from ``query`` to each of ``keys``, exactly.

    ``score[s] = Σ_{a,b} pairs[s, a, b] + bias[s]`` with
    ``pairs[s, a, b] = gate[s] · q_a · k_b(s)``: ``q_a`` the query-side parts (``q_parts``),
    ``k_b(s)`` the key-side parts at key ``s`` (``k_parts[s]``), ``gate`` the score's scale
    (and a soft cap's gate, frozen at this input, as detached mode freezes every gate) and
    ``bias`` an additive position bias (ALiBi; zero elsewhere). ``by="tokens"``: the parts are
    the input tokens through all paths and each constant origin (biases, positional
    embeddings), the same on both sides.
    ``by="nodes"``: the nodes of :func:`lin_lens.attribution_graph` (embeddings, heads, neurons or
    whole MLPs, biases) through their direct path; each side keeps the vectors of its ``top``
    nodes by ``|marginal|`` and one part holding the rest exactly (``"(other query-side nodes)"``,
    ``"(other key-side nodes)"``), while ``q_marginal_all`` / ``k_marginal_all`` keep every
    node's marginal per key (their sums are checked against the scores too).

    Every sum is checked on access: :attr:`relative_error` compares the scores with the pairs
    (and, for nodes, with the complete marginals), and each side's parts with the query and keys
    the model computed.
    """

    def __init__(self, *, layer: int, head: int, kv_head: int, query: int, keys: list[int],
                 by: str, q_parts: Parts, k_parts: list[Parts], gate: Float[Tensor, " keys"],
                 bias: Float[Tensor, " keys"], scores: Float[Tensor, " keys"],
                 pattern: Float[Tensor, " keys"], q: Float[Tensor, " d_head"],
                 k: Float[Tensor, "keys d_head"], str_tokens: list[str],
                 tokens: Int[Tensor, " pos"], k_marginal_all: list[Parts] | None = None,
                 q_marginal_all: list[Parts] | None = None, meta: dict | None = None):
        self.layer, self.head, self.kv_head, self.query = layer, head, kv_head, query
        self.keys, self.by = list(keys), by
        self.q_parts, self.k_parts = q_parts, k_parts
        self.gate, self.bias, self.scores, self.pattern = gate, bias, scores, pattern
        self.q, self.k = q, k  # [d_head], [n_keys, d_head]: what the model computed
        self.str_tokens, self.tokens = str_tokens, tokens
        self.k_marginal_all = k_marginal_all
        self.q_marginal_all = q_marginal_all
        self.meta: dict[str, Any] = dict(meta or {})

    # -- the decomposition --------------------------------------------------------------------
    def _key(self, key: int) -> int:
        """Index into :attr:`keys` of key position ``key``."""
        if key not in self.keys:
            raise InvalidPositionError(f"key position {key} is not explained here (keys "
                                       f"{self.keys}); pass keys=[...] to qk_attribution")
        return self.keys.index(key)

    def pairs(self, key: int | None = None) -> Float[Tensor, "... q_parts k_parts"]:
        """``pairs[a, b]`` at key position ``key`` (``[n_q_parts, n_k_parts]``), or every
        explained key stacked (``[n_keys, n_q_parts, n_k_parts]``) when ``key`` is None."""
        which = range(len(self.keys)) if key is None else [self._key(key)]
        out = torch.stack([self.gate[j] * self.q_parts.vectors @ self.k_parts[j].vectors.T
                           for j in which])
        return out if key is None else out[0]

    @property
    def q_marginal(self) -> Float[Tensor, "keys q_parts"]:
        """``gate · q_a · k(s)``, each query-side part's share of each score (row sums)."""
        return self.gate[:, None] * (self.k @ self.q_parts.vectors.T)

    @property
    def k_marginal(self) -> list[Float[Tensor, " k_parts"]]:
        """``gate · q · k_b(s)``, each key-side part's share of each score (column sums),
        per key ``[n_k_parts]``."""
        return [self.gate[j] * (self.k_parts[j].vectors @ self.q) for j in range(len(self.keys))]

    @property
    def constants(self) -> dict[str, Float[Tensor, " keys"]]:
        """The constant terms by origin, per key ``[n_keys]``: the position bias (``"alibi"``),
        and each bias / positional-embedding part's marginal on the query side (``"q: …"``)
        and the key side (``"k: …"``)."""
        out: dict[str, Tensor] = {}
        if bool(self.bias.ne(0).any()):
            out["alibi"] = self.bias
        qm = self.q_marginal
        for a, kind in enumerate(self.q_parts.kind):
            if kind in ("bias", "pos_embed") and self.q_parts.pos[a] < 0:
                out["q: " + self.q_parts.name[a]] = qm[:, a]
        for j, kp in enumerate(self.k_parts):
            km = self.k_marginal[j]
            for b, kind in enumerate(kp.kind):
                if kind in ("bias", "pos_embed") and kp.pos[b] < 0:
                    out.setdefault("k: " + kp.name[b], self.scores.new_zeros(len(self.keys)))
                    out["k: " + kp.name[b]][j] = km[b]
        return out

    @property
    def relative_error(self) -> float:
        """The largest of ‖score − Σ pairs − bias‖/‖score‖ (``Σ_ab pairs = gate · Σ_a q_a ·
        Σ_b k_b``), the same with the complete k-marginals (nodes), and each side's parts
        against the q and k the model computed."""
        qsum = self.q_parts.vectors.sum(0)
        ksum = torch.stack([p.vectors.sum(0) for p in self.k_parts])
        recon = self.gate * (ksum @ qsum) + self.bias  # Σ_ab pairs, by bilinearity
        errs = [relative_error(self.scores, recon), relative_error(self.q, qsum),
                relative_error(self.k, ksum)]
        for alls in (self.k_marginal_all, self.q_marginal_all):
            if alls is not None:
                total = torch.stack([p.vectors.sum() for p in alls]) + self.bias
                errs.append(relative_error(self.scores, total))
        return max(errs)

    def difference(self, key: int, other: int) -> dict[str, Any]:
        """Why ``key`` and not ``other``: ``score[key] − score[other]`` split exactly over the
        query-side parts (``q_a · (g_key k(key) − g_other k(other))``) plus the bias
        difference; ``"total"`` is the score difference."""
        i, j = self._key(key), self._key(other)
        by_part = self.q_marginal[i] - self.q_marginal[j]
        return {"total": float(self.scores[i] - self.scores[j]), "by_query_part": by_part,
                "bias": float(self.bias[i] - self.bias[j]),
                "labels": [self.q_parts.label(a, self.str_tokens) for a in range(len(by_part))]}

    # -- reading ------------------------------------------------------------------------------
    def top(self, k: int = 10, key: int | None = None) -> list[tuple[str, str, int, float]]:
        """The ``k`` largest pairs by absolute value (at one key, or over all explained keys):
        ``(query-side label, key-side label, key position, value)``."""
        P = self.pairs()
        js = range(len(self.keys)) if key is None else [self._key(key)]
        cand = []
        for j in js:
            flat = P[j].reshape(-1)
            vals, idx = flat.abs().topk(min(k, flat.numel()))
            for i in idx.tolist():
                a, b = divmod(i, P.shape[-1])
                cand.append((float(flat[i]), j, a, b))
        cand.sort(key=lambda c: -abs(c[0]))
        return [(self.q_parts.label(a, self.str_tokens),
                 self.k_parts[j].label(b, self.str_tokens), self.keys[j], v)
                for v, j, a, b in cand[:k]]

    def top_marginals(self, k: int = 10, key: int | None = None, side: str = "q"
                      ) -> list[tuple[str, int, float]]:
        """The ``k`` largest query-side (``side="q"``) or key-side marginals, at one key or
        over all: ``(label, key position, value)``."""
        js = range(len(self.keys)) if key is None else [self._key(key)]
        cand = []
        for j in js:
            if side == "q":
                parts = (self.q_marginal_all[j] if self.q_marginal_all is not None
                         else self.q_parts)
                vals = (parts.vectors if self.q_marginal_all is not None
                        else self.q_marginal[j])
            elif side == "k":
                parts = (self.k_marginal_all[j] if self.k_marginal_all is not None
                         else self.k_parts[j])
                vals = (parts.vectors if self.k_marginal_all is not None
                        else self.k_marginal[j])
            else:
                raise InvalidArgumentError(f"side must be 'q' or 'k', got {side!r}")
            top = vals.abs().topk(min(k + 1, vals.numel())).indices.tolist()
            cand += [(parts.label(b, self.str_tokens), self.keys[j], float(vals[b]))
                     for b in top if parts.kind[b] != "rest"][:k]
        cand.sort(key=lambda c: -abs(c[2]))
        return cand[:k]

    def summary(self) -> dict[str, Any]:
        best = int(self.pattern.argmax())
        return {"layer": self.layer, "head": self.head, "query": self.query, "by": self.by,
                "keys": len(self.keys), "most attended key": self.keys[best],
                "pattern there": float(self.pattern[best]), "score there":
                float(self.scores[best]), "query-side parts": len(self.q_parts),
                "relative error": self.relative_error}

    def to_dict(self, k: int = 10) -> dict[str, Any]:
        """Plain data: the summary, scores and pattern per key, the top pairs and marginals."""
        return {**self.summary(), "key_positions": self.keys,
                "scores": self.scores.tolist(), "pattern": self.pattern.tolist(),
                "position_bias": self.bias.tolist(),
                "top_pairs": [list(t) for t in self.top(k)],
                "top_pairs_most_attended": [list(t) for t in self.top(
                    k, key=self.keys[int(self.pattern.argmax())])],
                "top_q_marginals": [list(t) for t in self.top_marginals(k, side="q")],
                "top_k_marginals": [list(t) for t in self.top_marginals(k, side="k")],
                "meta": {m: v for m, v in self.meta.items()
                         if isinstance(v, (str, int, float, bool))}}

    def __repr__(self) -> str:
        s = self.summary()
        return (f"QKAttribution(L{self.layer}H{self.head}, query {self.query}, {s['keys']} keys, "
                f"by {self.by}: most attended key {s['most attended key']} "
                f"(p={s['pattern there']:.3f}), relative error {s['relative error']:.1e})")

    def _repr_html_(self) -> str:
        rows = [(html.escape(q), html.escape(kk), key, f"{v:+.4g}")
                for q, kk, key, v in self.top(10)]
        caption = html.escape(repr(self))
        return table(rows, ["query-side part", "key-side part", "key", "pair"], caption=caption)


@dataclass
class QKResults:
    """Several heads' attributions from one computation, keyed by ``(layer, head)``."""

    by_head: dict[tuple[int, int], QKAttribution] = field(default_factory=dict)
    seconds: float = 0.0

    def __getitem__(self, key: tuple[int, int]) -> QKAttribution:
        return self.by_head[key]

    def __iter__(self):
        return iter(self.by_head.values())

    def __len__(self) -> int:
        return len(self.by_head)
