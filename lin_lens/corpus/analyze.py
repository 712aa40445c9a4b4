"""One prompt → its rows of the corpus table (see :mod:`lin_lens.corpus.schema`).

The numbers come from :func:`lin_lens.analyses.prompt.analyze_prompt`, the same analysis the
report shows: the map at the hook, the predicted logit's map (``direction=`` a one-hot),
:func:`lin_lens.decode` for decoded singular vectors (or :func:`lin_lens.svd` for spectra alone)
and the ordinary Jacobian's reconstruction. A failure of any kind becomes a row with its status
and message; only ``KeyboardInterrupt`` / ``SystemExit`` escape.
"""

from __future__ import annotations

import json
import time
from typing import Any

import lin_lens
from lin_lens._numeric import relative_error
from lin_lens._precision import exact_matmul
from lin_lens._tl import hook_dict, is_bridge, model_dtype
from lin_lens.analyses.prompt import analyze_prompt
from lin_lens.corpus.schema import SCHEMA_VERSION, prompt_id
from lin_lens.decoding import Decoding, token_strings
from lin_lens.errors import InvalidArgumentError
from lin_lens.maps.request import positions

ANALYSES = ("svd", "decode", "contributions", "ordinary")
DEFAULT_ANALYSES = ("svd", "decode", "contributions")


def model_info(model: Any) -> dict[str, str]:
    """``{"model", "dtype", "backend"}`` of a loaded model (``lin_lens.load_model`` records its
    name; otherwise the TransformerLens config's ``model_name``)."""
    info = getattr(model, "lin_lens_info", None) or {}
    name = info.get("name") or getattr(model.cfg, "model_name", None) or type(model).__name__
    backend = info.get("backend") or ("bridge" if is_bridge(model) else "hooked")
    return {"model": str(name), "dtype": str(model_dtype(model)).replace("torch.", ""),
            "backend": backend}


def check_analyses(analyses: Any) -> tuple[str, ...]:
    if isinstance(analyses, str):
        analyses = (analyses,)
    out = tuple(dict.fromkeys(analyses))
    bad = [a for a in out if a not in ANALYSES]
    if bad:
        raise InvalidArgumentError(f"analyses: unknown {bad}; choose from {list(ANALYSES)}")
    return out


def check_hooks(model: Any, settings: dict[str, Any]) -> None:
    """Fail before the first prompt on a hook the model does not have (a typo would otherwise
    make every prompt an error row)."""
    for what in ("hook", "source"):
        name = settings[what]
        if name != "logits" and name not in hook_dict(model):
            close = [h for h in hook_dict(model) if h.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]]
            hint = f"; e.g. {', '.join(close[:3])}" if close else ""
            raise InvalidArgumentError(f"{what} {name!r} is not a hook of this model{hint}")


@exact_matmul()
def prompt_rows(model: Any, text: str, index: int, settings: dict[str, Any]) -> list[dict]:
    """The rows of one prompt: one per target position, or one failure row."""
    t0 = time.perf_counter()
    base = {
        "schema_version": SCHEMA_VERSION, "prompt_id": prompt_id(text, settings),
        "prompt_index": index, "text": text, "model": settings["model"],
        "dtype": settings["dtype"], "backend": settings["backend"],
        "lin_lens_version": getattr(lin_lens, "__version__", "unknown"),
        "hook": settings["hook"], "source": settings["source"],
        "settings": json.dumps(settings, sort_keys=True, default=str),
    }
    try:
        rows = _rows(model, text, settings)
    except lin_lens.NotExactError as e:
        rows = [_failure("not_exact", e, relative_error=float(e.linear_map.relative_error))]
    except Exception as e:  # noqa: BLE001 - every failure is recorded as a row
        rows = [_failure("error", e)]
    wall = time.perf_counter() - t0
    return [{**base, **r, "wall_time_s": wall} for r in rows]


def _failure(status: str, e: BaseException, **extra: Any) -> dict:
    return {"status": status, "error_type": type(e).__name__, "error": str(e) or repr(e), **extra}


def _rows(model: Any, text: str, s: dict[str, Any]) -> list[dict]:
    analyses = s["analyses"]
    tokens = lin_lens.to_tokens(model, text, s["prepend_bos"])
    ids = tokens[0].tolist()
    n = len(ids)
    tgt = positions(s["pos"], n)
    decoded = "decode" in analyses
    pa = analyze_prompt(model, tokens, [s["hook"]], tgt, source=s["source"],
                        with_ordinary="ordinary" in analyses, decoded=decoded,
                        contributions="contributions" in analyses,
                        k=max(s["k"], s["n_decode"]), top=s["top"], progress=False)
    r = pa.hooks[s["hook"]]
    top_ids, top_probs = pa.prediction.ids, pa.prediction.probs
    str_tokens = token_strings(model, ids, raw=True)
    rows = []
    for j, t in enumerate(tgt):
        m = r.lm.at(j)
        pid = int(top_ids[j, 0])
        row: dict[str, Any] = {
            "target_pos": t, "n_tokens": n, "tokens": str_tokens, "token_ids": ids,
            "prediction": token_strings(model, [pid], raw=True)[0], "prediction_id": pid,
            "probability": float(top_probs[j, 0]),
            "top_tokens": token_strings(model, top_ids[j].tolist(), raw=True),
            "top_ids": top_ids[j].tolist(), "top_probs": top_probs[j].tolist(),
            "relative_error": float(m.relative_error), "status": "ok",
        }
        if r.ordinary is not None:
            row["relative_error_ordinary"] = relative_error(m.act.reshape(-1), r.ordinary[j])
        if decoded:
            assert r.decodings is not None  # analyze_prompt(decode=True) fills them
            row.update(_decoded(r.decodings[j], s["k"], s["n_decode"]))
        elif "svd" in analyses:
            row.update(_spectra(m, s["k"]))
        if pa.logit_map is not None:
            c = pa.logit_map.at(j)
            row["logit"] = float(c.act.reshape(-1)[0])
            row["contributions"] = c.contributions()[:, 0].double().tolist()
            row["contribution_constant"] = float(c.constant.reshape(-1)[0])
        rows.append(row)
    return rows


def _spectra(m: Any, k: int) -> dict:
    per = lin_lens.svd(m, k)
    st = lin_lens.svd(m, k, stacked=True)
    return {"singular_values": per.S.double().tolist(),
            "singular_values_stacked": st.S.double().tolist(),
            "stable_rank": per.stable_rank.double().tolist(),
            "stable_rank_stacked": float(st.stable_rank)}


def _decoded(d: Decoding, k: int, n_decode: int) -> dict:

    def lists(tls: list, attr: str) -> list | None:
        if not tls or tls[0] is None:
            return None
        return [list(getattr(t, attr)) for t in tls[:n_decode]]

    return {
        "singular_values": d.S[:, :k].double().tolist(),
        "singular_values_stacked": d.stacked_S[:k].double().tolist(),
        "stable_rank": d.stable_rank.double().tolist(),
        "stable_rank_stacked": float(d.stacked_stable_rank),
        "u_tokens": [lists(o, "tokens") for o in d.out],
        "u_ids": [lists(o, "ids") for o in d.out],
        "v_tokens": [lists(i, "tokens") for i in d.inp],
        "v_ids": [lists(i, "ids") for i in d.inp],
        "u_stacked_tokens": lists(d.stacked_out, "tokens"),
        "u_stacked_ids": lists(d.stacked_out, "ids"),
        "v_stacked_tokens": lists(d.stacked_in, "tokens"),
        "v_stacked_ids": lists(d.stacked_in, "ids"),
        "v_stacked_source": list(d.stacked_in_token[:n_decode]),
    }
