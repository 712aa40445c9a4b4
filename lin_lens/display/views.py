"""CircuitsVis views of linear maps that render offline.

CircuitsVis's own ``RenderedHTML`` is unsuitable as is: ``str()`` loads the bundle from a CDN and
``_repr_html_`` first probes google.com. A :class:`View` keeps only the render *calls* of one or
more CircuitsVis objects and emits them after a single inlined copy of the 1.3 MB bundle, so a
notebook cell or a report page works from ``file://`` with no network.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lin_lens._numeric import to_numpy as _np
from lin_lens._tl import model_device
from lin_lens.decoding import Decoding, token_strings
from lin_lens.errors import InvalidArgumentError, UnsupportedFeatureError

_CALL = re.compile(r'<div id="(circuits-vis-[^"]+)"')


@functools.lru_cache(maxsize=1)
def bundle_js() -> str:
    """The CircuitsVis browser bundle (IIFE defining ``CircuitsVis``), safe to inline."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return path.read_text(encoding="utf-8").replace("</script>", "")


def split_render(rendered: Any) -> tuple[str, str]:
    """A CircuitsVis ``RenderedHTML`` → (div id, its ``CircuitsVis.render(...)`` call)."""
    src = rendered.local_src
    m = _CALL.search(src)
    start = src.rfind("CircuitsVis.render(")
    end = src.rfind("</script>")
    if m is None or start < 0 or end < start:
        raise UnsupportedFeatureError("unrecognised CircuitsVis output (was circuitsvis upgraded "
                                      "beyond what lin_lens knows?)")
    # "</" inside the JSON props (a token such as "</s>") would close the script element early
    call = src[start:end].strip().replace("</", "<\\/")
    return m.group(1), call


class View:
    """One or several CircuitsVis panels, each with a title; renders offline in Jupyter."""

    def __init__(self, panels: Sequence[tuple[str, Any]] | Any, title: str = ""):
        if not isinstance(panels, (list, tuple)):
            panels = [("", panels)]
        self.panels = [(t, split_render(r)) for t, r in panels]
        self.title = title

    def __add__(self, other: View) -> View:
        out = View([], self.title or other.title)
        out.panels = self.panels + other.panels
        return out

    def body(self) -> tuple[str, list[str]]:
        """(HTML of the panels' containers, their render calls) for composing pages."""
        parts = [f"<h3>{html.escape(self.title)}</h3>"] if self.title else []
        for t, (div, _) in self.panels:
            if t:
                parts.append(f"<h4>{html.escape(t)}</h4>")
            parts.append(f'<div id="{div}" style="margin:10px 0"></div>')
        return "\n".join(parts), [call for _, (_, call) in self.panels]

    def _repr_html_(self) -> str:
        body, calls = self.body()
        return body + script(calls)

    def to_html(self) -> str:
        """A complete, self-contained HTML document."""
        return page(self.title or "lin_lens view", self._repr_html_())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_html(), encoding="utf-8")
        return path

    def __repr__(self) -> str:
        return f"View({self.title!r}, {len(self.panels)} panel(s))"


def script(calls: Sequence[str]) -> str:
    """One module script: the bundle once, then every render call (module scripts run after the
    document is parsed, so the containers exist)."""
    return ("<script type=\"module\">\n" + bundle_js() + "\n;\n" + "\n".join(calls)
            + "\n</script>")


def page(title: str, body: str, style: str = "") -> str:
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{style}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


# -- data helpers -------------------------------------------------------------------------------

def str_tokens(model: Any, tokens: Tensor) -> list[str]:
    """Readable strings for token ids (whitespace made visible by CircuitsVis itself)."""
    return token_strings(model, tokens, raw=True)


# -- views --------------------------------------------------------------------------------------

def contribution_view(lm: Any, tokens: Sequence[str] | None = None,
                      title: str | None = None) -> View:
    """Per-source-token contributions ``J_i x_i`` as coloured tokens.

    For a map of one output direction (``direction=`` / d_out = 1) the colour is the signed
    contribution to that scalar (they sum to the output minus the constant); otherwise it is the
    norm ``‖J_i x_i‖``. One panel per target position. ``tokens``: the source tokens' strings
    (default ``lm.meta["str_tokens"]`` if set, else the ids).
    """
    from circuitsvis.tokens import colored_tokens

    if tokens is None:
        tokens = lm.meta.get("str_tokens") or [f"#{i}" for i in lm.tokens.tolist()]
    strs = list(tokens or [])

    c = lm.contributions()
    c = c[None] if c.ndim == 2 else c  # [t, s, d_out]
    panels = []
    for k, p in enumerate(lm.positions):
        ck = c[k]
        if ck.shape[-1] == 1:
            vals = _np(ck[:, 0])
            m = float(np.abs(vals).max()) or 1.0
            label = f"signed contribution to the output at position {p}"
            r = colored_tokens(strs, vals.tolist(), min_value=-m, max_value=m)
        else:
            vals = _np(torch.linalg.vector_norm(ck, dim=-1))
            label = f"‖J_i x_i‖ for the output at position {p}"
            r = colored_tokens(strs, vals.tolist(), min_value=0.0,
                               max_value=float(vals.max()) or 1.0)
        panels.append((label, r))
    return View(panels, title if title is not None else f"Token contributions to {lm.hook}")


def topk_view(decoded: Sequence[dict], first_dimension_name: str = "Source token",
              title: str = "Decoded singular vectors", max_k: int = 10) -> View:
    """Singular vectors decoded to vocabulary tokens, one CircuitsVis ``topk_tokens`` table.

    Each entry of ``decoded`` is one sample: ``{"label", "scores" [n_first, n_vec, V'],
    "vocab" (V' strings), "first_labels"}``; the table's columns are singular vectors and its
    rows the vocabulary tokens with the highest (and lowest) scores.
    """
    from circuitsvis.topk_tokens import topk_tokens

    acts = [np.ascontiguousarray(_np(d["scores"]).transpose(0, 2, 1)) for d in decoded]
    r = topk_tokens(
        tokens=[list(d["vocab"]) for d in decoded],
        activations=acts,
        max_k=max_k,
        first_dimension_name=first_dimension_name,
        third_dimension_name="Singular vector",
        sample_labels=[d["label"] for d in decoded],
        first_dimension_labels=list(decoded[0]["first_labels"]),
    )
    return View([("", r)], title)


def attention_view(model: Any, tokens: Tensor, layers: Sequence[int] | None = None,
                   str_toks: Sequence[str] | None = None) -> View:
    """The attention patterns that detached mode freezes, one panel per layer."""
    from circuitsvis.attention import attention_heads

    toks = torch.as_tensor(tokens).reshape(1, -1).to(model_device(model))
    n_layers = model.cfg.n_layers
    layers = [n_layers - 1] if layers is None else [li % n_layers for li in layers]
    names = {f"blocks.{li}.attn.hook_pattern": li for li in layers}
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names)
    s = list(str_toks) if str_toks is not None else str_tokens(model, toks)
    panels = []
    for name, li in names.items():
        pat = cache[name][0].float().cpu()  # [heads, dest, src]
        heads = [f"L{li}H{h}" for h in range(pat.shape[0])]
        panels.append((f"layer {li}", attention_heads(pat, s, heads)))
    return View(panels, "Frozen attention patterns")


def decoding_view(d: Decoding, title: str = "Decoded singular vectors",
                  max_k: int = 10) -> View:
    """The decoded singular vectors of a :class:`lin_lens.decoding.Decoding` (from
    :func:`lin_lens.decode`) as one CircuitsVis top-k table: choose the source token (first
    dimension) and the sample (U → next tokens through the final norm and W_U, V → input
    tokens by cosine with W_E); columns are the singular vectors."""
    samples = []
    for lists, label in ((d.out, "U → next tokens (through W_U)"),
                         (d.inp, "V → input tokens (cosine with W_E)")):
        if lists and any(t is not None for row in lists for t in row):
            samples.append(from_token_lists(lists, label, d.tokens))
    if not samples:
        raise InvalidArgumentError(f"nothing to show: neither side of the map at {d.hook!r} "
                                   "lives in the residual stream or the vocabulary")
    return topk_view(samples, title=title, max_k=max_k)


def from_token_lists(lists: Sequence[Sequence[Any]], label: str, first_labels: Sequence[str]
                     ) -> dict:
    """A :func:`topk_view` sample from :class:`lin_lens.decoding.TokenList` s
    (``lists[first][vector]``, None
    where not decodable): tokens outside a vector's lists get a score between its two ends, so
    the table shows exactly the listed top and bottom tokens (use ``max_k`` = list length)."""
    vocab: dict[str, int] = {}
    for row in lists:
        for t in row:
            for s in ([] if t is None else t.tokens + t.neg_tokens):
                vocab.setdefault(s, len(vocab))
    n_vec = max(len(r) for r in lists)
    scores = torch.zeros(len(lists), n_vec, max(len(vocab), 1), dtype=torch.float64)
    for i, row in enumerate(lists):
        for j, t in enumerate(row):
            if t is None:
                continue
            scores[i, j] = (min(t.scores) + max(t.neg_scores)) / 2
            for s, v in zip(t.tokens + t.neg_tokens, t.scores + t.neg_scores, strict=True):
                scores[i, j, vocab[s]] = v
    return {"label": label, "scores": scores, "vocab": list(vocab) or [""],
            "first_labels": list(first_labels)}
