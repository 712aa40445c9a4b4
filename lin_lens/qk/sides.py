"""The two sides of a score, split into exact parts: each part's share of the query and of the
keys as they enter the product (rotated where the model rotates).

``by="tokens"``: the parts are the input tokens through all paths and every constant origin
(biases, positional embeddings), from forward columns (:func:`lin_lens.maps.columns
.token_parts`: one tangent per source token gives its part at every layer, head and position).
The node parts (``by="nodes"``) are :mod:`lin_lens.qk.nodes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jaxtyping import Float
from torch import Tensor

from lin_lens.maps.columns import token_parts
from lin_lens.qk.form import ScoreForm
from lin_lens.qk.node_parts import origin_name


@dataclass
class Sides:
    """One layer's parts: ``q[p]`` the part ``q_labels[p]`` of the query at the query position,
    ``k[p]`` the part ``k_labels[p]`` of the keys at every position (the same labels on both
    sides for tokens); every part through the same rotation as the scored q and k."""

    q: Float[Tensor, "p heads d"]
    k: Float[Tensor, "p pos kv d"]
    q_labels: list[str]
    k_labels: list[str]
    q_origin: list[str]  # each part's kind: "token", "bias", "pos_embed" (or a node kind)
    k_origin: list[str]
    q_desc: tuple[list[int], list[int], list[int]]  # (layer, pos, index) of each part
    k_desc: tuple[list[int], list[int], list[int]]


def origin_kind(name: str) -> str:
    return "pos_embed" if name == "hook_pos_embed" else "bias"


def token_sides(model: Any, tokens: Tensor, forms: dict[int, ScoreForm], query: int,
                str_tokens: Sequence[str], *, source: str = "hook_embed",
                progress: bool | None = None) -> dict[int, Sides]:
    """``{layer: Sides}`` by tokens for every form, from one set of forward columns."""
    hooks = [h for f in forms.values() for h in (f.q_hook, f.k_hook)]
    n = tokens.shape[1]
    parts = token_parts(model, tokens, hooks, list(range(n)), source=source,
                        progress=progress)
    out = {}
    for L, f in forms.items():
        origins = sorted(set(parts.constants[f.q_hook]) | set(parts.constants[f.k_hook]))
        q = _stack(parts, f.q_hook, origins, n, f.n_heads, f.d_head)  # [P, n, H, d]
        k = _stack(parts, f.k_hook, origins, n, f.n_kv, f.d_head)
        if f.rotate is not None:
            q, k = f.rotate(q, "q"), f.rotate(k, "k")
        labels = [f"{i} {t!r}" for i, t in enumerate(str_tokens)] + [
            origin_name(o) for o in origins]
        kinds = ["token"] * n + [origin_kind(o) for o in origins]
        ids = tokens[0].tolist()
        desc = ([-1] * len(labels), list(range(n)) + [-1] * len(origins),
                ids + [-1] * len(origins))
        out[L] = Sides(q[:, query], k, labels, list(labels), kinds, list(kinds), desc, desc)
    return out


def _stack(parts: Any, hook: str, origins: list[str], n: int, heads: int, d: int) -> Tensor:
    tok = parts.tokens[hook]  # [n_src, n_pos, heads·d]
    consts = [parts.constants[hook].get(o, tok.new_zeros(tok.shape[1:])) for o in origins]
    if consts:
        import torch

        tok = torch.cat([tok, torch.stack(consts)])
    return tok.reshape(tok.shape[0], n, heads, d)


