"""A linear map's per-token view in the explorer's page: contributions, stable ranks, singular
values and decoded singular vectors of each ``J_i`` and of the stacked operator.

Two sources, one view: a :class:`LinearMap` (with the model, its singular vectors are decoded
through :func:`lin_lens.decode`; without it, only the numbers) and one row of a corpus run
(which stores all of them, see :mod:`lin_lens.corpus.schema`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lin_lens import _explorer as page_
from lin_lens import spectrum
from lin_lens.decoding import contributions, decode
from lin_lens.errors import InvalidArgumentError


def _tokens(tl: Any) -> list[str] | None:
    return None if tl is None else list(tl.tokens)


def map_data(lm: Any, model: Any = None, *, k: int = 3, top: int = 5, target: int = -1,
             title: str | None = None) -> dict:
    """The page's data for a :class:`LinearMap` (one target position: ``target`` picks it for
    a multi-target map). ``model``: decode the singular vectors (top ``top`` tokens of the
    first ``k`` vectors); None shows the numbers only."""
    if not hasattr(lm, "J4"):
        raise InvalidArgumentError(f"map_data: expected a LinearMap, got {type(lm).__name__}")
    one = lm if lm.int_pos else lm.at(target)
    c = contributions(one)
    meta = {"title": title or f"linear map {one.hook} ← {one.source}", "hook": one.hook,
            "source": one.source, "position": one.positions[0],
            "relative_error": one.relative_error,
            "mode": "detached" if one.detached else "ordinary"}
    data: dict[str, Any] = {"kind": "map", "meta": meta,
                            "contribution": c.norm.tolist(), "share": c.share.tolist(),
                            "contribution_label": "‖J_i x_i‖"}
    if model is not None:
        d = decode(model, one, k, top)
        data.update(tokens=d.tokens, S=d.S.tolist(), stable_rank=d.stable_rank.tolist(),
                    U=[[_tokens(t) for t in row] for row in d.out],
                    V=[[_tokens(t) for t in row] for row in d.inp],
                    stacked={"stable_rank": d.stacked_stable_rank, "S": d.stacked_S.tolist(),
                             "U": [_tokens(t) for t in d.stacked_out],
                             "V": [_tokens(t) for t in d.stacked_in],
                             "V_source": d.stacked_in_token})
        meta["model"] = str(getattr(getattr(model, "cfg", None), "model_name", "") or "")
    else:
        per, st = spectrum.map_svds(one, k)
        ids = one.tokens.tolist() if one.tokens is not None else None
        data.update(tokens=[f"#{i}" for i in ids] if ids else
                    [f"[{i}]" for i in range(one.n_src)],
                    S=per.S.tolist(), stable_rank=per.stable_rank.tolist(),
                    stacked={"stable_rank": float(st.stable_rank), "S": st.S.tolist()})
        meta["note"] = ("Singular vectors are decoded with the model: "
                        "lin_lens.explorer.map_page(lm, model).")
    return data


def row_data(row: dict, back: dict | None = None) -> dict:
    """The page's data for one row of a corpus run (:func:`lin_lens.corpus.read`)."""
    meta = {"title": f"{row.get('text')!r}", "hook": row.get("hook"),
            "source": row.get("source"), "position": row.get("target_pos"),
            "model": row.get("model"), "prediction": row.get("prediction"),
            "probability": row.get("probability"), "relative_error": row.get("relative_error"),
            "status": row.get("status")}
    if row.get("status") != "ok":
        meta["note"] = (f"{row.get('status')}: {row.get('error_type') or ''} "
                        f"{row.get('error') or ''}")
    contrib = row.get("contributions")
    data: dict[str, Any] = {
        "kind": "map", "meta": meta, "tokens": row.get("tokens") or [],
        "contribution": contrib, "contribution_label":
            f"contribution to the logit of {row.get('prediction')!r}",
        "stable_rank": row.get("stable_rank"), "S": row.get("singular_values"),
        "U": row.get("u_tokens"), "V": row.get("v_tokens"),
        "stacked": {"stable_rank": row.get("stable_rank_stacked"),
                    "S": row.get("singular_values_stacked"),
                    "U": row.get("u_stacked_tokens"), "V": row.get("v_stacked_tokens"),
                    "V_source": row.get("v_stacked_source")}}
    if back:
        data["back"] = back
    return data


def map_page(lm: Any, model: Any = None, **kw: Any) -> str:
    """A :class:`LinearMap`'s view as one self-contained HTML page (see :func:`map_data`)."""
    data = map_data(lm, model, **kw)
    return page_.page(data, data["meta"]["title"])


def save_map_html(lm: Any, path: str | Path, model: Any = None, **kw: Any) -> Path:
    return page_.write(map_page(lm, model, **kw), path)


def show_map(lm: Any, model: Any = None, **kw: Any) -> Path | None:
    """In a notebook, the map's view as the cell's output; elsewhere opened in the browser."""
    return page_.show(map_page(lm, model, **kw))
