"""The paper's figures with matplotlib. Every function returns the ``Figure``; nothing is shown.

Use :func:`to_png_base64` / :func:`to_svg` to embed a figure in HTML.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lin_lens._numeric import relative_error
from lin_lens._numeric import to_numpy as _np


def _fig(figsize=(5.5, 4.0)):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend needed

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def reconstruction_scatter(lm: Any, ordinary: Any | None = None, max_points: int = 5000,
                           title: str | None = None):
    """Output vs its reconstruction ``Σ J_i x_i + constant``: detached map on the identity line,
    ordinary Jacobian (a ``detach=False`` map or its reconstruction tensor) off it; both
    relative errors in the legend."""
    fig, ax = _fig()
    y = _np(lm.act).ravel()
    rng = np.random.default_rng(0)
    keep = rng.choice(y.size, max_points, replace=False) if y.size > max_points else slice(None)
    series = [("detached", lm.reconstruct(), "C0")]
    if ordinary is not None:  # a LinearMap (detach=False) or its reconstruction
        series.append(("ordinary", getattr(ordinary, "reconstruct", lambda: ordinary)(), "C3"))
    for name, rec, color in series:
        r = _np(rec).ravel()
        ax.scatter(y[keep], r[keep], s=6, alpha=0.6, color=color,
                   label=f"{name} Jacobian (rel. err. {relative_error(y, r):.1e})")
    lo, hi = float(y.min()), float(y.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="identity")
    ax.set_xlabel(f"model output ({lm.hook})")
    ax.set_ylabel("Σ J_i x_i + constant")
    ax.set_title(title or "Reconstruction")
    ax.legend(fontsize=8)
    return fig


def singular_spectra(S: Any, labels: Sequence[str], top: int | None = 64,
                     title: str = "Singular values per input token"):
    """Singular values of each ``J_i`` (``S``: [n_src, r]), log scale."""
    fig, ax = _fig()
    S = _np(S)
    r = S.shape[-1] if top is None else min(top, S.shape[-1])
    for i, lab in enumerate(labels):
        ax.semilogy(np.arange(1, r + 1), np.maximum(S[i, :r], 1e-30), marker=".", ms=3,
                    lw=1, label=f"{i}: {lab!r}")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title(title)
    if len(labels) <= 16:
        ax.legend(fontsize=7, ncol=2)
    return fig


def stable_rank_curves(curves: Mapping[str, Sequence[float]], layers: Sequence[int] | None = None,
                       title: str = "Stable rank vs layer"):
    """One line per series (e.g. ``{"resid_post (cumulative)": [...], "attn_out": [...]}``)."""
    fig, ax = _fig()
    for name, vals in curves.items():
        v = _np(vals)
        x = np.arange(len(v)) if layers is None else np.asarray(layers)[: len(v)]
        ax.plot(x, v, marker="o", ms=3, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("stable rank Σs²/s_max²")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def projection_trajectory(proj: Any, layers: Sequence[int] | None = None,
                          title: str = "Top singular vectors vs the final layer's"):
    """``proj`` [n_layers, k, k']: |⟨u_j(layer), u_m(final)⟩|, one line per (j, m) pair."""
    fig, ax = _fig()
    P = np.abs(_np(proj))
    x = np.arange(P.shape[0]) if layers is None else np.asarray(layers)
    for j in range(P.shape[1]):
        for m in range(P.shape[2]):
            ax.plot(x, P[:, j, m], marker=".", label=f"u{j + 1}(layer) · u{m + 1}(final)")
    ax.set_xlabel("layer")
    ax.set_ylabel("|projection|")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def contribution_bars(values: Any, labels: Sequence[str], constant: float | None = None,
                      title: str = "Contribution per input token"):
    """Signed contributions of each token (and the constant, if any) to one scalar output."""
    fig, ax = _fig((max(4.0, 0.6 * len(labels) + 1.5), 3.2))
    v = list(_np(values).ravel())
    names = [repr(s) for s in labels]
    if constant is not None:
        v.append(float(constant))
        names.append("constant")
    ax.bar(range(len(v)), v, color=["C0" if x >= 0 else "C3" for x in v])
    ax.set_xticks(range(len(v)), names, rotation=45, ha="right", fontsize=8)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_title(title)
    return fig


def to_png_base64(fig, dpi: int = 100) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def to_img_tag(fig, alt: str = "") -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{to_png_base64(fig)}">'
