"""The result of :func:`lin_lens.linear_map`: an exact per-token linear operator that carries its
own measured error, its analyses as methods, and knows how to persist."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lin_lens import spectrum
from lin_lens._html import table
from lin_lens._numeric import relative_error
from lin_lens._precision import exact_matmul
from lin_lens.decoding import Decoding
from lin_lens.decoding import decode as _decode
from lin_lens.errors import InvalidArgumentError

FORMAT_VERSION = 1


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative reconstruction error above which a detached map is refused as not exact.

    Far above rounding (float64 maps come out near 1e-15) and far below what an unfrozen
    nonlinearity leaves (typically 1e-3 and more).
    """
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-4
    return 2e-2


def _version() -> str:
    try:
        return metadata.version("lin_lens")
    except metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


class LinearMap:
    """``act[t] = Σ_i J[t, i] · x[i] + constant[t]``, exact for one input.

    Layout: ``J`` is ``[n_tgt, n_src, d_out, d_in]`` (``[n_src, d_out, d_in]`` when the map was
    asked for one int position), so ``J[..., i, :, :]`` is the operator applied to source token
    ``i``. ``x`` is the source activation ``[n_src, d_in]`` (the token embeddings by default);
    ``act`` is the true target activation ``[n_tgt, d_out]``; ``constants`` holds the exact
    contribution of each bias / positional embedding (origin name → ``[n_tgt, d_out]``).
    """

    def __init__(self, J: Float[Tensor, "n_tgt n_src d_out d_in"], x: Float[Tensor, "n_src d_in"],
                 act: Float[Tensor, "n_tgt d_out"],
                 constants: dict[str, Float[Tensor, "n_tgt d_out"]], hook: str, source: str,
                 positions: Sequence[int], out_shape: Sequence[int],
                 out_index: Int[Tensor, " d_out"] | None = None,
                 direction: Float[Tensor, "n_tgt d_act"] | None = None,
                 tokens: Int[Tensor, " n_src"] | None = None, detached: bool = True,
                 int_pos: bool = False):
        self.J4, self.x, self.act4, self.constants = J, x, act, constants
        self.hook, self.source, self.positions = hook, source, list(positions)
        self.out_shape, self.out_index, self.direction = tuple(out_shape), out_index, direction
        self.tokens, self.detached, self.int_pos = tokens, detached, int_pos
        self.error_scale: Tensor | None = None  # |u|ᵀ|act| per target, for direction maps
        self.meta: dict[str, Any] = {}

    # -- the contract ------------------------------------------------------------------------
    def _sq(self, t: Tensor) -> Tensor:
        return t[0] if self.int_pos else t

    @property
    def J(self) -> Float[Tensor, "*tgt n_src d_out d_in"]:
        """``[n_src, d_out, d_in]`` for an int position, else ``[n_tgt, n_src, d_out, d_in]``."""
        return self._sq(self.J4)

    @property
    def act(self) -> Float[Tensor, "*tgt d_out"]:
        """The model's own activation at the target, ``[d_out]`` or ``[n_tgt, d_out]``."""
        return self._sq(self.act4)

    @property
    def constant(self) -> Float[Tensor, "*tgt d_out"]:
        """Sum of :attr:`constant_by_origin` (exactly zero for bias-free models)."""
        total = torch.zeros_like(self.act4)
        for v in self.constants.values():
            total = total + v
        return self._sq(total)

    @property
    def constant_by_origin(self) -> dict[str, Float[Tensor, "*tgt d_out"]]:
        return {k: self._sq(v) for k, v in self.constants.items()}

    @exact_matmul()
    def contributions(self) -> Float[Tensor, "... src d_out"]:
        """``J_i x_i`` per source token: ``[n_src, d_out]`` or ``[n_tgt, n_src, d_out]``."""
        return self._sq(torch.einsum("tsoi,si->tso", self.J4, self.x))

    @exact_matmul()
    def reconstruct(self) -> Float[Tensor, "*tgt d_out"]:
        """``Σ_i J_i x_i + constant``, same shape as :attr:`act`."""
        # per source token, then summed: "tsoi,si->to" would copy J into [o, s, i] first
        linear = torch.einsum("tsoi,si->tso", self.J4, self.x).sum(1)
        return self._sq(linear) + self.constant

    @property
    @exact_matmul()
    def relative_error(self) -> float:
        """‖act − reconstruct()‖ / ‖act‖, measured afresh on every access.

        For a ``direction=`` map (one scalar ``uᵀact`` per target, which can be near 0 for a
        logit difference of near-duplicate tokens) and an ``out_index=`` map (a few selected
        outputs, e.g. logits, which can be near 0 while their parts are not), the denominator is
        the scale the outputs were computed at instead, elementwise
        ``max(|act|, Σ_i |J_i x_i| + Σ_o |c_o|)`` (and, for a direction, ``|u|ᵀ|act|``): the
        rounding of the outputs themselves, a well-conditioned measure that still flags any
        unfrozen nonlinearity."""
        per_token = torch.einsum("tsoi,si->tso", self.J4, self.x)  # one pass over J
        recon = self._sq(per_token.sum(1)) + self.constant
        err = relative_error(self.act, recon)
        scalar = self.direction is not None and tuple(self.out_shape) == (1,)
        if not (scalar or self.out_index is not None):
            return err
        act = self.act4.reshape(-1).to(torch.float64)
        parts = per_token.abs().sum(1).reshape(-1)
        for v in self.constants.values():
            parts = parts + v.abs().reshape(-1)
        scale = torch.maximum(act.abs(), parts.to(torch.float64))
        if self.error_scale is not None:
            scale = torch.maximum(scale, self.error_scale.reshape(-1).to(torch.float64))
        num = torch.linalg.vector_norm(act - recon.reshape(-1).to(torch.float64))
        den = torch.linalg.vector_norm(scale)
        return float(num / den) if float(den) > 0 else err

    # -- analyses (the functions of lin_lens.spectrum / lin_lens.decoding) ---------------------
    def svd(self, k: int | None = None, *, stacked: bool = False) -> spectrum.SVD:
        """:func:`lin_lens.svd` of this map (per source token, or ``stacked``)."""
        return spectrum.svd(self, k, stacked=stacked)

    def stable_rank(self, *, stacked: bool = False) -> Float[Tensor, "*shape"]:
        """:func:`lin_lens.stable_rank`: ``Σ s² / s_max²`` per source token (or stacked)."""
        return spectrum.stable_rank(self, stacked=stacked)

    def decode(self, model: Any, k: int = 3, top: int = 5, **kw: Any) -> Decoding:
        """:func:`lin_lens.decode`: singular vectors, rows and columns decoded to tokens."""
        return _decode(model, self, k, top, **kw)

    # -- conveniences ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.J.shape)

    @property
    def n_src(self) -> int:
        return self.J4.shape[1]

    def at(self, t: int) -> LinearMap:
        """The map for one target position (index into ``positions``, negatives allowed)."""
        k = t % len(self.positions)
        sub = LinearMap(self.J4[k:k + 1], self.x, self.act4[k:k + 1],
                        {o: v[k:k + 1] for o, v in self.constants.items()}, self.hook, self.source,
                        [self.positions[k]], self.out_shape, self.out_index,
                        None if self.direction is None else self.direction[k:k + 1],
                        self.tokens, self.detached, True)
        sub.error_scale = None if self.error_scale is None else self.error_scale[k:k + 1]
        # the whole map's measured error is not this part's
        sub.meta = {m: v for m, v in self.meta.items() if m != "checked_error"}
        return sub

    def summary(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "source": self.source,
            "mode": "detached" if self.detached else "ordinary",
            "positions": self.positions,
            "J shape": list(self.J.shape),
            "dtype": str(self.J4.dtype).replace("torch.", ""),
            "relative error": self.relative_error,
            "constant origins": len(self.constants),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable): the summary, tokens, per-token contribution norms and
        stable ranks, the constant by origin (norms). Tensors stay with :meth:`save`."""
        c = self.contributions()
        return {
            **self.summary(),
            "tokens": None if self.tokens is None else [int(t) for t in self.tokens],
            "out_shape": list(self.out_shape),
            "contribution_norm": torch.linalg.vector_norm(c, dim=-1).tolist(),
            "stable_rank": self.stable_rank().tolist(),
            "constant_norm_by_origin": {k: float(torch.linalg.vector_norm(v))
                                        for k, v in self.constants.items()},
            "meta": {k: v for k, v in self.meta.items() if isinstance(v, (str, int, float))},
        }

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the map (tensors and the metadata needed to reuse it: hook, source, positions,
        tokens, dtype, lin_lens version) with ``torch.save``; read back with :meth:`load`."""
        path = Path(path)
        state = {
            "format": "lin_lens.LinearMap", "format_version": FORMAT_VERSION,
            "lin_lens_version": _version(), "dtype": str(self.J4.dtype),
            "J": self.J4.detach().cpu(), "x": self.x.detach().cpu(),
            "act": self.act4.detach().cpu(),
            "constants": {k: v.detach().cpu() for k, v in self.constants.items()},
            "hook": self.hook, "source": self.source, "positions": self.positions,
            "out_shape": list(self.out_shape),
            "out_index": None if self.out_index is None else self.out_index.detach().cpu(),
            "direction": None if self.direction is None else self.direction.detach().cpu(),
            "tokens": None if self.tokens is None else self.tokens.detach().cpu(),
            "detached": self.detached, "int_pos": self.int_pos,
            "error_scale": None if self.error_scale is None else self.error_scale.detach().cpu(),
            "meta": {k: v for k, v in self.meta.items()
                     if isinstance(v, (str, int, float, bool, list, tuple, dict))},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: Any = "cpu") -> LinearMap:
        """A map written by :meth:`save` (files of a later format version are refused)."""
        s = torch.load(Path(path), map_location=map_location, weights_only=True)
        if not isinstance(s, dict) or s.get("format") != "lin_lens.LinearMap":
            raise InvalidArgumentError(f"{str(path)!r} is not a file written by LinearMap.save")
        if int(s.get("format_version", 0)) > FORMAT_VERSION:
            raise InvalidArgumentError(
                f"{str(path)!r} has format version {s['format_version']}; this lin_lens reads "
                f"up to {FORMAT_VERSION}: upgrade lin_lens")
        lm = cls(s["J"], s["x"], s["act"], s["constants"], s["hook"], s["source"],
                 s["positions"], s["out_shape"], s.get("out_index"), s.get("direction"),
                 s.get("tokens"), s.get("detached", True), s.get("int_pos", False))
        lm.error_scale = s.get("error_scale")
        lm.meta = dict(s.get("meta", {}), lin_lens_version=s.get("lin_lens_version"))
        return lm

    def to(self, device: Any) -> LinearMap:
        """The same map with every tensor on ``device``."""
        def mv(t):
            return None if t is None else t.to(device)

        out = LinearMap(self.J4.to(device), self.x.to(device), self.act4.to(device),
                        {k: v.to(device) for k, v in self.constants.items()}, self.hook,
                        self.source, self.positions, self.out_shape, mv(self.out_index),
                        mv(self.direction), self.tokens, self.detached, self.int_pos)
        out.error_scale = mv(self.error_scale)
        out.meta = dict(self.meta)
        return out

    def __repr__(self) -> str:
        # the error the exactness check measured, when there was one: a repr should not take
        # another pass over J
        err = self.meta.get("checked_error")
        err = self.relative_error if err is None else err
        mode = "detached" if self.detached else "ordinary"
        dtype = str(self.J4.dtype).replace("torch.", "")
        return (f"LinearMap({self.hook!r} ← {self.source!r}, {mode}, J {list(self.J.shape)}, "
                f"{dtype}, relative error {err:.2e})")

    def _repr_html_(self) -> str:
        rows = [(k, f"{v:.3e}" if isinstance(v, float) else v) for k, v in self.summary().items()]
        return table(rows, caption="LinearMap")
