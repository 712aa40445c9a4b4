"""Vectors to tokens: decoding singular vectors, rows and columns of a linear map, and per-token
contributions. One pipeline: a vector becomes vocabulary scores (:func:`vocab_scores`), scores
become a :class:`TokenList` (:func:`top_tokens`).

Conventions (SVD orientation in :mod:`lin_lens.spectrum`; decoded lists also give the opposite
end, ``-u`` / ``-v``, so nothing is hidden by the sign choice):

* **decoding the output side** (a vector u in the residual space): ``W_U^T (w ⊙ C u)`` with
  ``w`` the final norm's weight and ``C`` its mean-centering (LayerNorm only). With the final norm
  scale frozen (detached mode) this is exactly the change of the logits per unit of u, up to the
  positive factor 1/scale, so the ranking is the model's own. The paper multiplies by W_U alone;
  ``through_norm=False`` gives that. Maps at ``"logits"`` are already over the vocabulary.
* **decoding the input side** (a vector v in the embedding / residual space): cosine similarity
  with the rows of ``W_E`` (the paper's choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lin_lens import spectrum
from lin_lens._html import table
from lin_lens.errors import InvalidArgumentError

# -- token strings ---------------------------------------------------------------------------


def visible(s: str) -> str:
    """Whitespace made visible: ' ' → '·', newline → '↵', tab → '⇥'; empty → '∅'."""
    return s.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥") or "∅"


def token_strings(model: Any, ids: Any, *, raw: bool = False) -> list[str]:
    """Readable strings for token ids (``#id`` when the model has no tokenizer).

    ``raw=True`` gives the tokenizer's own decoding, whitespace untouched (for CircuitsVis, which
    shows whitespace itself).
    """
    ids = [int(i) for i in torch.as_tensor(ids).reshape(-1).tolist()]
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [f"#{i}" for i in ids]
    if raw:
        return [tok.decode([i]) for i in ids]
    return [visible(tok.decode([i], clean_up_tokenization_spaces=False)) for i in ids]


# -- decoding vectors to tokens --------------------------------------------------------------


def norm_params(ln: Any) -> tuple[Tensor | None, Tensor | None]:
    """(weight, bias) of a norm module, HookedTransformer (``w``/``b``) or Bridge (the wrapped
    Hugging Face module's ``weight``/``bias``); None where absent (e.g. folded ``RMSPre``)."""
    out = []
    hf = getattr(ln, "original_component", None)
    for names in (("w", "weight"), ("b", "bias")):
        t = None
        for obj in ((hf, ln) if hf is not None else (ln,)):  # Bridge: the HF module first
            for n in names:
                v = getattr(obj, n, None) if obj is not None else None
                if isinstance(v, Tensor):
                    t = v.detach()
                    # Hugging Face's Gemma norms scale by (1 + weight)
                    if obj is hf and n == "weight" and type(hf).__name__.startswith("Gemma"):
                        t = 1.0 + t
                    break
            if t is not None:
                break
        out.append(t)
    return out[0], out[1]


def _final_norm(model: Any) -> tuple[Tensor | None, bool]:
    """(weight or None, centers?) of the final norm, for HookedTransformer and Bridge."""
    w, _ = norm_params(getattr(model, "ln_final", None))
    ntype = str(getattr(model.cfg, "normalization_type", "") or "")
    return w, ntype.startswith("LN")


def output_logit_directions(model: Any, U: Float[Tensor, "d_model n"], *,
                            through_norm: bool = True) -> Float[Tensor, "d_vocab n"]:
    """Logit change per unit of each residual-space column of ``U`` (see module docstring)."""
    W_U = model.W_U.detach()
    U = U.to(W_U)  # W_U's dtype and device
    if through_norm:
        w, center = _final_norm(model)
        if center:
            U = U - U.mean(0, keepdim=True)
        if w is not None:
            U = U * w.detach().to(U.dtype)[:, None]
    return W_U.T @ U


def input_similarities(model: Any, V: Float[Tensor, "d_model n"]) -> Float[Tensor, "d_vocab n"]:
    """Cosine similarity of each column of ``V`` with every row of ``W_E``."""
    W_E = model.W_E.detach()
    V = V.to(W_E)
    num = W_E @ V
    den = W_E.norm(dim=-1, keepdim=True) * V.norm(dim=0, keepdim=True)
    return num / den.clamp_min(torch.finfo(W_E.dtype).tiny)


@dataclass
class TokenList:
    """The ``top`` vocabulary entries of one score vector, both ends."""

    tokens: list[str]
    ids: list[int]
    scores: list[float]
    neg_tokens: list[str]
    neg_ids: list[int]
    neg_scores: list[float]

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        return " ".join(self.tokens)


def top_tokens(model: Any, scores: Float[Tensor, " d_vocab"], top: int = 5) -> TokenList:
    """Largest and smallest entries of a vocabulary score vector, as readable tokens."""
    top = min(top, scores.shape[-1])
    hi, lo = scores.topk(top), (-scores).topk(top)
    return TokenList(token_strings(model, hi.indices), hi.indices.tolist(),
                     hi.values.tolist(), token_strings(model, lo.indices), lo.indices.tolist(),
                     (-lo.values).tolist())


def _space(model: Any, lm: Any) -> tuple[str | None, str | None]:
    """Where the output / input vectors live: 'vocab', 'resid' or None (not decodable)."""
    d_model = model.cfg.d_model
    d_out, d_in = lm.J.shape[-2], lm.J.shape[-1]
    if lm.hook == "logits" and lm.out_index is None and lm.direction is None:
        out = "vocab"
    else:
        out = "resid" if d_out == d_model else None
    return out, ("resid" if d_in == d_model else None)


def vocab_scores(model: Any, vectors: Float[Tensor, "d n"], space: str, *,
                 through_norm: bool = True) -> Float[Tensor, "d_vocab n"]:
    """Vocabulary scores of columns: ``space`` 'vocab' (already logits), 'out' (residual →
    final norm → W_U) or 'in' (cosine with W_E)."""
    if space == "vocab":
        return vectors
    if space == "out":
        return output_logit_directions(model, vectors, through_norm=through_norm)
    if space == "in":
        return input_similarities(model, vectors)
    raise InvalidArgumentError(f"space must be 'vocab', 'out' or 'in', got {space!r}")


def decode_vectors(model: Any, vectors: Float[Tensor, "d n"], space: str, top: int = 5, *,
                   through_norm: bool = True) -> list[TokenList]:
    """Decode columns to :class:`TokenList` s (see :func:`vocab_scores` for ``space``)."""
    scores = vocab_scores(model, vectors, space, through_norm=through_norm)
    return [top_tokens(model, scores[:, j], top) for j in range(scores.shape[1])]


# -- one-call analysis of a map --------------------------------------------------------------


@dataclass
class Contributions:
    """``‖J_i x_i‖`` per source token and two kinds of share.

    ``share`` = norm / Σ norms; ``along`` = ⟨J_i x_i, act⟩ / ‖act‖² (signed; together with
    ``constant_along`` it sums to 1 up to the reconstruction error).
    """

    norm: Float[Tensor, " n_src"]
    share: Float[Tensor, " n_src"]
    along: Float[Tensor, " n_src"]
    constant_along: float


def contributions(lm: Any) -> Contributions:
    """Norms, shares and signed shares of ``J_i x_i`` for a single-target map."""
    c = lm.contributions()
    if c.ndim != 2:
        raise InvalidArgumentError(
            "contributions() needs a single-target map (int pos or lm.at(k))")
    norm = c.norm(dim=-1)
    act = lm.act.reshape(-1)
    a2 = act.dot(act).clamp_min(torch.finfo(act.dtype).tiny)
    return Contributions(norm, norm / norm.sum().clamp_min(torch.finfo(norm.dtype).tiny),
                         (c @ act) / a2, float(lm.constant.reshape(-1).dot(act) / a2))


@dataclass
class Decoding:
    """Everything :func:`lin_lens.decode` computes for one target position. Plain data.

    Per source token i: ``S[i]`` top-k singular values, ``stable_rank[i]``, ``out[i][j]`` /
    ``inp[i][j]`` the decoded j-th output- / input-side singular vector (``None`` where the
    space is not decodable), ``cols[i]`` / ``rows[i]`` the largest-norm columns / rows decoded
    (``(index, norm, TokenList)``). ``stacked_*`` the same for the stacked operator (its input
    side decoded on the source token holding most of each v's weight, ``stacked_in_token``).
    """

    hook: str
    source: str
    position: int
    tokens: list[str]
    S: Float[Tensor, "n_src k"]
    stable_rank: Float[Tensor, " n_src"]
    contrib: Contributions
    out: list[list[TokenList | None]]
    inp: list[list[TokenList | None]]
    cols: list[list[tuple[int, float, TokenList | None]]]
    rows: list[list[tuple[int, float, TokenList | None]]]
    stacked_S: Float[Tensor, " k"]
    stacked_stable_rank: float
    stacked_out: list[TokenList | None]
    stacked_in: list[TokenList | None]
    stacked_in_token: list[int]
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        def tl(t):
            return None if t is None else t.to_dict()

        return {
            "hook": self.hook, "source": self.source, "position": self.position,
            "tokens": self.tokens, "S": self.S.tolist(), "stable_rank": self.stable_rank.tolist(),
            "norm": self.contrib.norm.tolist(), "share": self.contrib.share.tolist(),
            "along": self.contrib.along.tolist(), "constant_along": self.contrib.constant_along,
            "out": [[tl(t) for t in r] for r in self.out],
            "in": [[tl(t) for t in r] for r in self.inp],
            "cols": [[(j, n, tl(t)) for j, n, t in r] for r in self.cols],
            "rows": [[(j, n, tl(t)) for j, n, t in r] for r in self.rows],
            "stacked_S": self.stacked_S.tolist(),
            "stacked_stable_rank": self.stacked_stable_rank,
            "stacked_out": [tl(t) for t in self.stacked_out],
            "stacked_in": [tl(t) for t in self.stacked_in],
            "stacked_in_token": self.stacked_in_token,
        }

    def __str__(self) -> str:
        lines = [f"{self.hook} ← {self.source} at position {self.position}"]
        for i, t in enumerate(self.tokens):
            u = self.out[i][0] if self.out[i] else None
            v = self.inp[i][0] if self.inp[i] else None
            lines.append(
                f"{i:>3} {t!r:>14} ‖Jx‖={float(self.contrib.norm[i]):9.3g} "
                f"share={float(self.contrib.share[i]):5.2f} sr={float(self.stable_rank[i]):6.2f} "
                f"s1={float(self.S[i, 0]):9.3g}  U1: {u or '-'}  V1: {v or '-'}")
        u = self.stacked_out[0] if self.stacked_out else None
        lines.append(f"stacked: sr={self.stacked_stable_rank:.2f} U1: {u or '-'}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        def cell(t):
            return " ".join(t.tokens) if t is not None else "–"

        rows: list[tuple[Any, ...]] = [
                (i, t, f"{float(self.contrib.norm[i]):.3g}", f"{float(self.contrib.share[i]):.2f}",
                 f"{float(self.stable_rank[i]):.2f}", f"{float(self.S[i, 0]):.3g}",
                 cell(self.out[i][0] if self.out[i] else None),
                 cell(self.inp[i][0] if self.inp[i] else None))
                for i, t in enumerate(self.tokens)]
        rows.append(("all", "stacked", "", "", f"{self.stacked_stable_rank:.2f}",
                     f"{float(self.stacked_S[0]):.3g}",
                     cell(self.stacked_out[0] if self.stacked_out else None),
                     cell(self.stacked_in[0] if self.stacked_in else None)))
        return table(rows, ["#", "token", "‖J x‖", "share", "stable rank", "s₁", "U₁ → tokens",
                            "V₁ → tokens"],
                     caption=f"{self.hook} ← {self.source}, position {self.position}")


def _single(lm: Any, target: int) -> Any:
    return lm if lm.int_pos else lm.at(target)


def decode(model: Any, lm: Any, k: int = 3, top: int = 5, *, n_rows: int = 3,
           target: int = -1, through_norm: bool = True) -> Decoding:
    """SVD, stable rank, decoded singular vectors / rows / columns and contributions of a map.

    Args:
        model: the model the map came from (for W_U, W_E and the tokenizer).
        lm: a :class:`LinearMap`; for a multi-target map, ``target`` picks the position.
        k: singular vectors decoded per token (and for the stacked operator).
        top: tokens shown per decoded vector (and as many from the opposite end).
        n_rows: largest-norm rows and columns decoded per token.
        through_norm: decode output-side vectors through the final norm's weight (default).
    """
    lm = _single(lm, target)
    out_space, in_space = _space(model, lm)
    if lm.hook in ("ln_final.hook_out", "unembed.hook_in"):
        through_norm = False  # already past the final norm's weight
    J = lm.J
    dec, st = spectrum.map_svds(lm, k)

    def dec_out(cols: Tensor) -> list:
        if out_space is None:
            return [None] * cols.shape[1]
        return decode_vectors(model, cols, "vocab" if out_space == "vocab" else "out", top,
                              through_norm=through_norm)

    def dec_in(cols: Tensor) -> list:
        if in_space is None:
            return [None] * cols.shape[1]
        return decode_vectors(model, cols, "in", top)

    n_src = J.shape[0]
    col_idx = [J[i].norm(dim=0).topk(min(n_rows, J.shape[-1])) for i in range(n_src)]
    row_idx = [J[i].norm(dim=1).topk(min(n_rows, J.shape[-2])) for i in range(n_src)]
    # one vocabulary product per space for every token's vectors, rows and columns
    out = _split(dec_out, [dec.U[i] for i in range(n_src)]
                 + [J[i][:, c.indices] for i, c in enumerate(col_idx)])
    inp = _split(dec_in, [dec.Vh[i].T for i in range(n_src)]
                 + [J[i][r.indices].T for i, r in enumerate(row_idx)])
    # column j: what input coordinate j writes (output side); row r: what output r reads
    cols = [list(zip(c.indices.tolist(), c.values.tolist(), d, strict=True))
            for c, d in zip(col_idx, out[n_src:], strict=True)]
    rows = [list(zip(r.indices.tolist(), r.values.tolist(), d, strict=True))
            for r, d in zip(row_idx, inp[n_src:], strict=True)]
    out, inp = out[:n_src], inp[:n_src]
    # stacked V: decode the block of the source token that carries most of the vector
    Vb = st.Vh.reshape(st.Vh.shape[0], J.shape[0], J.shape[-1])
    which = Vb.norm(dim=-1).argmax(-1)
    Vsel = Vb[torch.arange(Vb.shape[0], device=Vb.device), which].T
    tokens = (token_strings(model, lm.tokens) if lm.tokens is not None
              else [f"[{i}]" for i in range(J.shape[0])])
    return Decoding(
        hook=lm.hook, source=lm.source, position=lm.positions[0], tokens=tokens, S=dec.S,
        stable_rank=dec.stable_rank, contrib=contributions(lm), out=out, inp=inp, cols=cols,
        rows=rows, stacked_S=st.S, stacked_stable_rank=float(st.stable_rank),
        stacked_out=dec_out(st.U), stacked_in=dec_in(Vsel), stacked_in_token=which.tolist(),
        meta={"through_norm": through_norm, "out_space": out_space, "in_space": in_space})


def _split(decoder: Any, blocks: list[Tensor]) -> list[list]:
    """``[decoder(b) for b in blocks]`` with one call on the concatenated columns."""
    flat = decoder(torch.cat(blocks, dim=1)) if sum(b.shape[1] for b in blocks) else []
    out, start = [], 0
    for b in blocks:
        out.append(flat[start:start + b.shape[1]])
        start += b.shape[1]
    return out


def top_singular_tokens(model: Any, lm: Any, k: int = 3, top: int = 5,
                        **kw: Any) -> list[dict]:
    """Shortcut: per source token, the decoded top-k U (output) and V (input) vectors as
    lists of token strings."""
    d = decode(model, lm, k, top, **kw)
    return [{"token": t, "S": d.S[i].tolist(),
             "U": [None if u is None else u.tokens for u in d.out[i]],
             "V": [None if v is None else v.tokens for v in d.inp[i]]}
            for i, t in enumerate(d.tokens)]
