"""The main job: analyse one prompt and write one self-contained, offline HTML report.

:func:`analyze` gathers everything (prediction, the exact operator at each hook and the ordinary
Jacobian for comparison, per-token SVDs and stable ranks, decoded singular vectors, the signed
contribution of every token to the predicted logit, attention patterns, optionally a layer sweep);
:func:`render_report` turns it into HTML with the plots as base64 PNGs and the CircuitsVis bundle
inlined once.
"""

from __future__ import annotations

import dataclasses
import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lin_lens import display
from lin_lens._html import table
from lin_lens._numeric import relative_error
from lin_lens._precision import exact_matmul
from lin_lens._tl import model_dtype, resolve_hook
from lin_lens.analyses import layer_sweep
from lin_lens.analyses.prompt import HookAnalysis, analyze_prompt
from lin_lens.display import plots
from lin_lens.errors import ArgumentTypeError, InvalidArgumentError
from lin_lens.maps import to_tokens
from lin_lens.maps.request import is_int_position, positions
from lin_lens.progress import progress_bar
from lin_lens.qk import qk_attributions

DEFAULT_HOOK = "ln_final.hook_normalized"


@dataclass
class Analysis:
    """A :class:`~lin_lens.analyses.prompt.PromptAnalysis` at one target position, plus what
    only the report shows (full singular spectra, attention patterns, a layer sweep)."""

    text: str
    model_name: str
    tokens: Tensor
    str_tokens: list[str]
    pos: int
    prediction: list[tuple[str, float]]  # top next tokens with probabilities
    hooks: dict[str, HookAnalysis]  # each map at ``pos`` (lm.at(0)) and its decoding
    spectra: dict[str, Tensor]  # hook → singular values per source token [n_src, r]
    logit_map: Any | None  # map of the predicted token's logit (d_out = 1)
    attention: Any | None  # display.View
    sweep: Any | None = None  # lin_lens.analyses.sweep.LayerSweep
    qk: dict[str, Any] = field(default_factory=dict)  # "L3H5" → QKAttribution (by tokens)
    timings: dict[str, float] = field(default_factory=dict)
    dtype: str = ""


# -- computing ----------------------------------------------------------------------------------

@exact_matmul()
def analyze(model: Any, text: str | Tensor, hooks: list[str] | None = None, pos: int = -1, *,
            ordinary: bool = True, sweep: bool | list[int] = False, attn_layers=None,
            k: int = 8, model_name: str = "", progress: bool | None = None,
            qk: list[tuple[int, int]] | None = None) -> Analysis:
    """Everything the report shows, for one prompt and one target position. ``qk``: heads
    ``(layer, head)`` whose scores at that position are explained by tokens
    (:func:`lin_lens.qk_attribution`)."""
    t0 = time.perf_counter()
    tokens = to_tokens(model, text)
    labels = display.str_tokens(model, tokens)
    n = tokens.shape[1]
    if not is_int_position(pos):
        raise ArgumentTypeError(f"pos={pos!r}: the report takes one int position")
    at = positions(pos, n)
    hooks = list(hooks or [DEFAULT_HOOK])
    for h in hooks:  # fail on a typo before any long computation
        if h == "logits":
            raise InvalidArgumentError(
                "the full map of the logits has d_vocab rows; the report maps "
                f"{DEFAULT_HOOK!r} (decoded through W_U) and the predicted logit")
        resolve_hook(model, h)
    bar = progress_bar(2, "lin-lens analyze", progress, unit="step")
    try:
        pa = analyze_prompt(model, tokens, hooks, at, with_ordinary=ordinary, k=k, top=10,
                            progress=progress)
        bar.update()
        t1 = time.perf_counter()
        attn = display.attention_view(model, tokens, attn_layers, labels)
        bar.update()
    finally:
        bar.close()
    timings = dict(pa.timings)
    timings["attention"] = time.perf_counter() - t1
    one = {h: dataclasses.replace(r, lm=r.lm.at(0), ordinary=None if r.ordinary is None
                                  else r.ordinary[0]) for h, r in pa.hooks.items()}
    spectra = {h: r.lm.svd().S.float() for h, r in one.items()}
    sweep_data = None
    if sweep:
        t1 = time.perf_counter()
        layers = None if sweep is True else list(sweep)
        sweep_data = layer_sweep(model, tokens, pos, layers=layers, progress=progress)
        timings["sweep"] = time.perf_counter() - t1
    qk_res = {}
    if qk:
        t1 = time.perf_counter()
        by_layer: dict[int, list[int]] = {}
        for layer, head in qk:
            by_layer.setdefault(layer, []).append(head)
        for layer, heads in by_layer.items():
            for att in qk_attributions(model, tokens, [layer], heads, query=at[0],
                                       progress=progress):
                qk_res[f"L{att.layer}H{att.head}"] = att
        timings["qk"] = time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
    ids, probs = pa.prediction.ids[0].tolist(), pa.prediction.probs[0].tolist()
    prediction = [(display.str_tokens(model, torch.tensor([i]))[0], float(p))
                  for i, p in zip(ids, probs, strict=True)][:5]
    dtype = str(model_dtype(model)).replace("torch.", "")
    lmap = None if pa.logit_map is None else pa.logit_map.at(0)
    return Analysis(text if isinstance(text, str) else "".join(labels), model_name, tokens[0].cpu(),
                    labels, at[0], prediction, one, spectra, lmap, attn, sweep_data, qk_res,
                    timings, dtype)


def _decoded_tokens(r: HookAnalysis, side: str, n_tokens: int) -> list[list[str]] | None:
    """Per source token, the first ``n_tokens`` tokens of the top singular vector's decoding
    (``side`` "out": U, "in": V); None where that side is not decodable."""
    d = r.decodings[0] if r.decodings else None
    lists = None if d is None else (d.out if side == "out" else d.inp)
    if not lists or all(not row or row[0] is None for row in lists):
        return None
    return [[] if not row or row[0] is None else row[0].tokens[:n_tokens] for row in lists]


# -- summary ------------------------------------------------------------------------------------

def summary(a: Analysis, n_tokens: int = 5) -> dict:
    """A JSON-friendly summary (what ``lin-lens analyze --json`` prints)."""
    out: dict[str, Any] = {
        "model": a.model_name, "dtype": a.dtype, "text": a.text, "tokens": a.str_tokens,
        "position": a.pos,
        "prediction": [{"token": t, "prob": round(p, 6)} for t, p in a.prediction],
        "hooks": {}, "timings_s": {k: round(v, 3) for k, v in a.timings.items()},
    }
    for h, r in a.hooks.items():
        assert r.decodings is not None  # the report always decodes
        d = {"relative_error": r.lm.relative_error,
             "relative_error_ordinary": (None if r.ordinary is None
                                         else relative_error(r.lm.act, r.ordinary)),
             "J_shape": list(r.lm.J.shape),
             "stable_rank": [round(float(v), 3) for v in r.decodings[0].stable_rank],
             "contribution_norm": [round(float(v), 4) for v in
                                   torch.linalg.vector_norm(r.lm.contributions(), dim=-1)],
             "decoded": {}}
        for key, side in (("U", "out"), ("V", "in")):
            toks = _decoded_tokens(r, side, n_tokens)
            if toks is not None:
                d["decoded"][key] = toks
        out["hooks"][h] = d
    if a.logit_map is not None:
        c = a.logit_map.contributions()[:, 0]
        out["predicted_logit"] = {
            "token": a.prediction[0][0], "logit": float(a.logit_map.act[0]),
            "contributions": [round(float(v), 4) for v in c],
            "constant": float(a.logit_map.constant[0]),
            "relative_error": a.logit_map.relative_error,
        }
    if a.qk:
        out["qk"] = {name: att.to_dict(k=5) for name, att in a.qk.items()}
    if a.sweep is not None:
        out["sweep"] = {"layers": a.sweep.layers, "stable_rank_stacked": {
            k: [round(float(x), 3) for x in v] for k, v in a.sweep.stacked_stable_rank.items()},
            "U1": [None if r[0] is None else r[0].tokens for r in a.sweep.out_tokens.get(
                "resid_post", [])]}
    return out


def format_summary(s: dict) -> str:
    """The short human-readable summary printed by the CLI."""
    lines = [f"model {s['model']} ({s['dtype']}), {len(s['tokens'])} tokens, "
             f"target position {s['position']}",
             "prediction: " + ", ".join(f"{p['token']!r} {p['prob']:.3f}"
                                        for p in s["prediction"])]
    for h, d in s["hooks"].items():
        ordv = d["relative_error_ordinary"]
        lines.append(f"[{h}] J {d['J_shape']}  relative error {d['relative_error']:.2e}"
                     + (f" (ordinary Jacobian {ordv:.2e})" if ordv is not None else ""))
        lines.append(f"  {'token':>14}  {'‖J_i x_i‖':>9}  {'s.rank':>6}  top singular vector")
        U = d["decoded"].get("U")
        V = d["decoded"].get("V")
        for i, t in enumerate(s["tokens"]):
            dec = []
            if U:
                dec.append("U→ " + " ".join(repr(x) for x in U[i][:3]))
            if V:
                dec.append("V→ " + " ".join(repr(x) for x in V[i][:3]))
            lines.append(f"  {t!r:>14}  {d['contribution_norm'][i]:9.3g}  "
                         f"{d['stable_rank'][i]:6.2f}  {' | '.join(dec)}")
    if "predicted_logit" in s:
        p = s["predicted_logit"]
        pairs = zip(s["tokens"], p["contributions"], strict=True)
        top = sorted(pairs, key=lambda z: -abs(z[1]))[:3]
        lines.append(f"logit of {p['token']!r} = {p['logit']:.4f} = Σ token contributions + "
                     f"constant {p['constant']:.4f}; largest: "
                     + ", ".join(f"{t!r} {v:+.3f}" for t, v in top))
    for name, q in s.get("qk", {}).items():
        pairs = "; ".join(f"{a} × {b} {v:+.3g}"
                          for a, b, _, v in q["top_pairs_most_attended"][:3])
        key = q["most attended key"]
        lines.append(f"{name} attends from {s['position']} to {key} ({s['tokens'][key]!r}, "
                     f"p={q['pattern there']:.3f}, score {q['score there']:+.3f}, relative "
                     f"error {q['relative error']:.1e}); top pairs there: {pairs}")
    if "sweep" in s:
        sw = s["sweep"]
        lines.append("layer sweep, stacked stable rank per layer " + str(sw["layers"]) + ":")
        for kind, v in sw["stable_rank_stacked"].items():
            lines.append(f"  {kind:>10}: " + " ".join(f"{x:.1f}" for x in v))
        if sw["U1"]:
            lines.append("  resid_post U1 of the last layers: " + " | ".join(
                " ".join(t or []) for t in sw["U1"][-3:]))
    lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["timings_s"].items()))
    return "\n".join(lines)


# -- HTML ---------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:20px auto;padding:0 12px;color:#222}
h1{font-size:1.5em} h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}
table.kv td,table.kv th{padding:2px 10px;text-align:left} .figs img{max-width:49%}
code{background:#f3f3f3;padding:0 3px} .note{color:#555;font-size:.92em}
"""


def _kv(rows) -> str:
    return table(rows, cls="kv")


def render_report(a: Analysis) -> str:
    """The report as one HTML string (no external resources)."""
    esc = html.escape
    s = summary(a)
    body: list[str] = [
        f"<h1>lin_lens report: {esc(a.text)!s}</h1>",
        _kv([("model", f"{a.model_name} ({a.dtype})"),
             ("tokens", " | ".join(map(repr, a.str_tokens))), ("target position", a.pos),
             ("prediction", ", ".join(f"{t!r} ({p:.3f})" for t, p in a.prediction))]),
        "<p class='note'>Each operator is the detached Jacobian: every nonlinearity's A(x) frozen "
        "at this input, so the output equals Σ<sub>i</sub> J<sub>i</sub> x<sub>i</sub> + constant "
        "(biases) exactly. The ordinary Jacobian is shown for comparison.</p>",
    ]
    views: list[display.View] = []
    if a.logit_map is not None:
        p = s["predicted_logit"]
        body.append(f"<h2>Contributions to the logit of {esc(repr(p['token']))}</h2>")
        body.append(f"<p>logit {p['logit']:.4f} = Σ token contributions + constant "
                    f"{p['constant']:.4f} (relative error {p['relative_error']:.1e})</p>")
        fig = plots.contribution_bars(a.logit_map.contributions()[:, 0], a.str_tokens,
                                      p["constant"] if a.logit_map.constants else None,
                                      f"Contributions to the logit of {p['token']!r}")
        body.append(f"<div class='figs'>{plots.to_img_tag(fig, 'contributions')}</div>")
        views.append(display.contribution_view(a.logit_map, a.str_tokens, ""))
        body.append("@@VIEW@@")
    for h, r in a.hooks.items():
        d = s["hooks"][h]
        body.append(f"<h2>Operator at <code>{esc(h)}</code></h2>")
        body.append(_kv([("J shape", str(d["J_shape"])),
                         ("relative error (detached)", f"{d['relative_error']:.2e}"),
                         ("relative error (ordinary Jacobian)",
                          "—" if d["relative_error_ordinary"] is None
                          else f"{d['relative_error_ordinary']:.2e}"),
                         ("stable rank per token", ", ".join(f"{x:.2f}" for x in d["stable_rank"])),
                         ("constant origins", len(r.lm.constants))]))
        figs = [plots.reconstruction_scatter(r.lm, r.ordinary, title=f"Reconstruction at {h}"),
                plots.singular_spectra(a.spectra[h], a.str_tokens)]
        body.append("<div class='figs'>" + "".join(plots.to_img_tag(f, h) for f in figs)
                    + "</div>")
        views.append(display.contribution_view(r.lm, a.str_tokens, ""))
        body.append("@@VIEW@@")
        if r.decodings and (r.decodings[0].meta["out_space"] or r.decodings[0].meta["in_space"]):
            views.append(display.decoding_view(r.decodings[0], title=""))
            body.append("<h3>Decoded singular vectors per input token</h3><p class='note'>"
                        "Choose the input token (first dimension) and the sample: U vectors "
                        "decoded through the final norm and the unembedding, V vectors by cosine "
                        "similarity with the embeddings. Signs are oriented so that "
                        "v·x<sub>i</sub> &gt; 0.</p>@@VIEW@@")
    if a.sweep is not None:
        sw = a.sweep
        body.append("<h2>Layer sweep</h2><p class='note'>Operators from the input embeddings to "
                    "each layer's output (cumulative), attention and MLP outputs, and each layer's "
                    "own transform (resid_pre → resid_post); stable rank of the stacked operator "
                    "[J_0 | J_1 | …].</p>")
        curves = {k: v for k, v in sw.stacked_stable_rank.items()}
        figs = [plots.stable_rank_curves(curves, sw.layers)]
        if "resid_post" in sw.proj_u:
            figs.append(plots.projection_trajectory(sw.proj_u["resid_post"], sw.layers))
        body.append("<div class='figs'>" + "".join(plots.to_img_tag(f) for f in figs) + "</div>")
        samples = []
        for kind, name in (("resid_post", "U"), ("resid_post", "V")):
            lists = sw.out_tokens.get(kind) if name == "U" else sw.in_tokens.get(kind)
            if lists and any(t is not None for r in lists for t in r):
                samples.append(display.from_token_lists(
                    lists, f"{kind} {name} → tokens", [f"layer {x}" for x in sw.layers]))
        if samples:
            views.append(display.topk_view(samples, "Layer", "", max_k=5))
            body.append("<h3>Top singular vectors per layer, decoded</h3>@@VIEW@@")
    if a.qk:
        body.append("<h2>Why heads attend (exact QK attribution)</h2><p class='note'>Each score "
                    "is split exactly into pairs of a query-side and a key-side part (the input "
                    "tokens through all paths, and constant origins); the matrix's entries sum "
                    "to the score minus any position bias.</p>")
        for name, att in a.qk.items():
            rows = [(esc(q), esc(kk), key, f"{v:+.4g}") for q, kk, key, v in att.top(8)]
            body.append(f"<h3>{esc(name)}</h3>" + table(
                rows, ["query-side part", "key-side part", "key", "pair"],
                caption=esc(repr(att))) + "@@VIEW@@")
            views.append(display.qk_view(att, title=""))
    if a.attention is not None:
        attn = display.View([], "")  # the section heading replaces the view's own title
        attn.panels = a.attention.panels
        views.append(attn)
        body.append("<h2>Attention patterns (frozen in the operator)</h2>@@VIEW@@")
    body.append("<p class='note'>Timings: " + esc(", ".join(
        f"{k} {v:.1f}s" for k, v in a.timings.items())) + "</p>")

    calls: list[str] = []
    text = "\n".join(body)
    for v in views:
        part, c = v.body()
        calls += c
        text = text.replace("@@VIEW@@", part, 1)
    return display.page(f"lin_lens: {a.text}", text + "\n" + display.script(calls), _STYLE)


def write_report(a: Analysis, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(a), encoding="utf-8")
    return path
