"""Tiny random models of each architecture family, for tests, demos and bug reports.

Weights are drawn large enough that every nonlinearity matters (an unfrozen one leaves a
reconstruction error far above 1e-3) and every bias is nonzero unless the family has none.
Nothing is downloaded.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from lin_lens._tl import (
    HAS_HOOKED,
    TL_VERSION,
    HookedTransformer,  # pyright: ignore[reportAttributeAccessIssue] (None on TL 4.x)
    TransformerBridge,
    hooked_config_class,
)
from lin_lens.errors import InvalidArgumentError, ModelNotAvailableError

# family → HookedTransformerConfig fields (beyond the shared tiny sizes)
HOOKED_ARCHS: dict[str, dict[str, Any]] = {
    "gpt2": dict(normalization_type="LN", act_fn="gelu_new", positional_embedding_type="standard"),
    "pythia": dict(normalization_type="LN", act_fn="gelu", positional_embedding_type="rotary",
                   parallel_attn_mlp=True, rotary_dim=2),
    "llama": dict(normalization_type="RMS", act_fn="silu", positional_embedding_type="rotary",
                  gated_mlp=True, n_key_value_heads=2, final_rms=True),
    "gemma": dict(normalization_type="RMS", act_fn="gelu_pytorch_tanh",
                  positional_embedding_type="rotary", gated_mlp=True, n_key_value_heads=1,
                  use_normalization_before_and_after=True, attn_scores_soft_cap=3.0,
                  output_logits_soft_cap=4.0, final_rms=True),
    "qwen3": dict(normalization_type="RMS", act_fn="silu", positional_embedding_type="rotary",
                  gated_mlp=True, n_key_value_heads=2, use_qk_norm=True, final_rms=True),
    "solu": dict(normalization_type="LN", act_fn="solu_ln", positional_embedding_type="standard"),
    "relu": dict(normalization_type="LN", act_fn="relu", positional_embedding_type="standard"),
}
BIAS_FREE = {"llama", "gemma", "qwen3"}


class HookedTransformerUnavailable(ModelNotAvailableError):
    """This transformer_lens has no HookedTransformer (4.x)."""


def tiny_model(
    arch: str = "gpt2",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    n_layers: int = 2,
    d_model: int = 16,
    d_vocab: int = 50,
    device: str | torch.device = "cpu",
    **overrides: Any,
):
    """A tiny random ``HookedTransformer`` of the given family (see ``HOOKED_ARCHS``), on
    ``device`` (the weights are drawn on the CPU first, so they are the same on every device).

    Raises :class:`HookedTransformerUnavailable` on TransformerLens 4.x (the test suite turns it
    into a skip); :func:`tiny_bridge` works on every version.
    """
    import warnings

    if not HAS_HOOKED:
        raise HookedTransformerUnavailable(
            f"transformer_lens {TL_VERSION} has no HookedTransformer (removed in 4.0)"
        )
    HookedTransformerConfig = hooked_config_class()  # noqa: N806 - a class
    if arch not in HOOKED_ARCHS:
        raise InvalidArgumentError(f"unknown arch {arch!r}; choose from {sorted(HOOKED_ARCHS)}")
    fields: dict[str, Any] = dict(
        n_layers=n_layers, d_model=d_model, n_ctx=64, d_head=d_model // 4, n_heads=4,
        d_mlp=2 * d_model, d_vocab=d_vocab, dtype=dtype, seed=seed, device=str(device),
    )
    fields.update(HOOKED_ARCHS[arch])
    fields.update(overrides)
    cfg = HookedTransformerConfig(**fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)  # pyright: ignore[reportCallIssue] (TL 3.x only)
    _randomize(model, seed, bias=arch not in BIAS_FREE)
    model.eval()
    return model


def _randomize(model: torch.nn.Module, seed: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1].lstrip("_")  # GQA stores _b_K/_W_K
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if leaf == "w":  # norm weights around 1
                p.copy_(1.0 + 0.3 * noise)
            elif leaf == "b" or leaf.startswith("b_"):
                p.copy_(0.3 * noise if bias else torch.zeros_like(p))
            elif leaf in ("W_E", "W_pos"):
                p.copy_(noise)
            elif p.ndim == 0:  # e.g. xIELU's scalar parameters: keep their init
                continue
            else:
                fan_in = p.shape[-2] if p.ndim >= 2 else p.shape[-1]
                p.copy_(noise * 2.0 / fan_in**0.5)


# -- TransformerBridge from tiny Hugging Face configs ------------------------------------------

BRIDGE_ARCHS = ("llama", "gpt2", "qwen3", "gemma3", "pythia")


def tiny_tokenizer(d_vocab: int = 50):
    """A word-level tokenizer saved to and reloaded from disk (the Bridge re-loads tokenizers
    by path, so an in-memory one fails)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(d_vocab - 2)}
    vocab["<unk>"] = d_vocab - 2
    vocab["<s>"] = d_vocab - 1
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                  eos_token="<s>", pad_token="<unk>")
    path = tempfile.mkdtemp(prefix="lin_lens_tok_")
    tok.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def _hf_config(arch: str, d_vocab: int):
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=d_vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=4, **common)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(architectures=["Gemma3ForCausalLM"], num_key_value_heads=1,
                                   head_dim=4, query_pre_attn_scalar=4, sliding_window=4,
                                   **common)
    if arch == "pythia":
        return tf.GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=True,  # pyright: ignore[reportCallIssue]
                                **common)  # rotary_pct: through **kwargs in transformers 5
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=d_vocab, n_embd=16, n_layer=2, n_head=4, n_positions=64,
                             activation_function="gelu_new", tie_word_embeddings=False)
    raise InvalidArgumentError(f"unknown bridge arch {arch!r}; choose from {BRIDGE_ARCHS}")


def save_tiny_hf(arch: str, path: str | os.PathLike, *, seed: int = 0, d_vocab: int = 50,
                 dtype: torch.dtype = torch.float32) -> str:
    """Save a tiny random Hugging Face model of family ``arch`` (see ``BRIDGE_ARCHS``) and its
    word-level tokenizer to the folder ``path`` with ``save_pretrained``: a local model folder
    that :func:`lin_lens.load_model` (and TransformerLens) load by path, offline. Returns the
    path."""
    import transformers as tf

    cfg = _hf_config(arch, d_vocab)
    cls = tf.AutoModelForCausalLM._model_mapping[type(cfg)]
    cfg.architectures = [cls.__name__]  # pyright: ignore[reportAttributeAccessIssue] (a class)
    torch.manual_seed(seed)
    hf = tf.AutoModelForCausalLM.from_config(cfg).to(dtype)
    _randomize_hf(hf, seed)
    hf.save_pretrained(str(path))
    tiny_tokenizer(d_vocab).save_pretrained(str(path))
    return str(path)


def tiny_bridge(arch: str = "llama", dtype: torch.dtype = torch.float64, seed: int = 0,
                d_vocab: int = 50, device: str | torch.device = "cpu"):
    """A tiny random ``TransformerBridge`` built offline from a Hugging Face config, on
    ``device`` (weights drawn on the CPU first)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers as tf

    cfg = _hf_config(arch, d_vocab)
    torch.manual_seed(seed)
    hf = tf.AutoModelForCausalLM.from_config(cfg).to(dtype)
    _randomize_hf(hf, seed)
    hf.to(device).eval()  # from_config leaves dropout on; the Bridge keeps hf_model where it is
    return TransformerBridge.boot_transformers(
        f"tiny-{arch}", hf_model=hf, tokenizer=tiny_tokenizer(d_vocab), device=str(device),
        dtype=dtype
    )


def _randomize_hf(hf: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_((0.3 if name.endswith("bias") else 1.0) * noise * 0.3
                        + (0.0 if name.endswith("bias") else 1.0))
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            elif "emb" in name or name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(noise)
            else:
                fan_in = p.shape[0] if "transformer.h" in name else p.shape[-1]
                p.copy_(noise * 2.0 / fan_in**0.5)
