"""CircuitsVis views of a QK attribution, offline: the token-pair matrix of a score and the
query's scores and pattern over its keys."""

from __future__ import annotations

from typing import Any

import torch

from lin_lens.display.views import View
from lin_lens.errors import InvalidArgumentError


def qk_view(att: Any, key: int | None = None, title: str | None = None) -> View:
    """Why head ``L.H`` attends from the query to ``key`` (default: the most attended key):

    * the token-pair matrix ``pairs[a, b]`` (rows: query-side parts, columns: key-side parts;
      signed, CircuitsVis's attention-pattern view of a square matrix over the same labels:
      tokens through all paths and constant origins), which sums to the score minus the
      position bias;
    * the query's score and pattern weight at every explained key, as coloured tokens.

    ``by="tokens"`` attributions only (node parts differ between the two sides)."""
    from circuitsvis import attention as cv_attention
    from circuitsvis import tokens as cv_tokens

    if att.by != "tokens":
        raise InvalidArgumentError(
            "qk_view draws the token-pair matrix of a by='tokens' attribution; for nodes read "
            "att.top() or its HTML table")
    key = att.keys[int(att.pattern.argmax())] if key is None else key
    j = att._key(key)
    P = att.pairs(key).detach().double().cpu()
    labels = [att.q_parts.label(a, att.str_tokens) for a in range(len(att.q_parts))]
    m = float(P.abs().max()) or 1.0
    matrix = cv_attention.attention_pattern(tokens=labels, attention=P, max_value=m,
                                            min_value=-m, mask_upper_tri=False,
                                            show_axis_labels=True)
    n = len(att.str_tokens)
    scores = torch.zeros(n, dtype=torch.float64)
    pattern = torch.zeros(n, dtype=torch.float64)
    scores[att.keys] = att.scores.double().cpu()
    pattern[att.keys] = att.pattern.double().cpu()
    s_max = float(scores.abs().max()) or 1.0
    row_scores = cv_tokens.colored_tokens(list(att.str_tokens), scores.tolist(),
                                          min_value=-s_max, max_value=s_max)
    row_pattern = cv_tokens.colored_tokens(list(att.str_tokens), pattern.tolist(),
                                           min_value=0.0, max_value=1.0)
    top = ", ".join(f"{q} × {k}: {v:+.3g}" for q, k, _, v in att.top(3, key=key))
    head = (f"L{att.layer}H{att.head}, query {att.query} ({att.str_tokens[att.query]!r}) → key "
            f"{key} ({att.str_tokens[key]!r}): score {float(att.scores[j]):+.4g}, pattern "
            f"{float(att.pattern[j]):.3f}")
    return View([(f"pairs (query-side × key-side parts) of the score; top: {top}", matrix),
                 (f"scores of query {att.query} over its keys", row_scores),
                 (f"pattern of query {att.query}", row_pattern)],
                title if title is not None else head)
