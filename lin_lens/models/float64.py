"""Float64 throughout: the float32 islands of a float64 model from :mod:`lin_lens.models`,
removed.

Hugging Face and the TransformerLens Bridge compute a few things in float32 whatever the model's
dtype (numerical safety for half precision): Llama's and Gemma 3's RMSNorm cast their input to
float32, the rotary modules build their angles from float32 inverse frequencies and float32
positions, Gemma 3 keeps its embedding scale √d as a float32 scalar, and the Bridge's attention
takes its softmax in float32. In a float64 model each island rounds to ~1e-7 relative, so the
forward, and every detached map, sits ~1e-7 away from the float64 network — far above the 1e-13
exactness lin_lens reports. The patches below compute the same formulas in float64 when (and only
when) the model is float64. Each one is a per-instance ``forward``; nothing global changes except
for the few microseconds of a Bridge attention forward (see :func:`bridge_softmax_float64`).

Only the module classes of the embedded models' families (Llama, Gemma 3) are known; a float64
island in any other class is left alone (the models' own tests measure against an independent
float64 reference at 1e-12).
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator
from typing import Any

import torch

from lin_lens._tl import plain_attention_bridge
from lin_lens.errors import UnsupportedFeatureError

F64 = torch.float64


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _llama_rmsnorm(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != F64:
        return type(self).forward(self, hidden_states)
    return self.weight * _rms(hidden_states, self.variance_epsilon)


def _gemma_rmsnorm(self: Any, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != F64:
        return type(self).forward(self, x)
    return _rms(x, self.eps) * (1.0 + self.weight)


def _inv_freq(params: dict, dim: int) -> torch.Tensor:
    rope_type = params.get("rope_type", "default")
    inv = 1.0 / (float(params["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=F64) / dim))
    if rope_type == "linear":
        return inv / float(params["factor"])
    if rope_type != "default":
        raise UnsupportedFeatureError(
            f"float64 rotary tables for rope_type {rope_type!r} are not implemented (default "
            "and linear are); load the model in float32 or extend lin_lens.models.float64")
    return inv


def _rotary(self: Any, x: torch.Tensor, position_ids: torch.Tensor,
            layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dtype != F64:
        args = (x, position_ids) if layer_type is None else (x, position_ids, layer_type)
        return type(self).forward(self, *args)
    prefix = "" if layer_type is None else f"{layer_type}_"
    inv = getattr(self, prefix + "inv_freq").to(device=x.device, dtype=F64)
    scale = getattr(self, prefix + "attention_scaling")
    freqs = position_ids[..., None].to(F64) * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def _rotary_float64(module: Any) -> None:
    config = module.config
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = config.rope_parameters
    if hasattr(module, "inv_freq"):  # one table (Llama)
        tables = {"": params}
    else:  # one table per layer type (Gemma 3)
        tables = {f"{lt}_": params[lt] for lt in module.layer_types if params.get(lt)}
    for prefix, p in tables.items():
        inv = _inv_freq(p, dim).to(getattr(module, prefix + "inv_freq").device)
        setattr(module, prefix + "inv_freq", inv)
        if hasattr(module, prefix + "original_inv_freq"):
            setattr(module, prefix + "original_inv_freq", inv.clone())
    module.forward = types.MethodType(_rotary, module)


def _embed_scale_float64(module: Any) -> None:
    module.embed_scale = torch.tensor(module.scalar_embed_scale, dtype=F64,
                                      device=module.weight.device)


_HF_FORWARDS = {"LlamaRMSNorm": _llama_rmsnorm, "Gemma3RMSNorm": _gemma_rmsnorm}
_HF_SETUPS = {"LlamaRotaryEmbedding": _rotary_float64, "Gemma3RotaryEmbedding": _rotary_float64,
              "Gemma3TextScaledWordEmbedding": _embed_scale_float64}


def hf_float64(hf_model: Any) -> list[str]:
    """Patch, in place, the float32 islands of a float64 Hugging Face model of a known family.

    Returns the patched module classes (for the load log and the tests)."""
    patched = set()
    for module in hf_model.modules():
        name = type(module).__name__
        if name in _HF_FORWARDS:
            module.forward = types.MethodType(_HF_FORWARDS[name], module)
        elif name in _HF_SETUPS:
            _HF_SETUPS[name](module)
        else:
            continue
        patched.add(name)
    return sorted(patched)


@contextlib.contextmanager
def _softmax_keeps_float64() -> Iterator[None]:
    original = torch.nn.functional.softmax

    @functools.wraps(original)
    def softmax(input, dim=None, _stacklevel=3, dtype=None):  # noqa: A002 (torch's names)
        if dtype == torch.float32 and input.dtype == F64:
            dtype = None
        return original(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = original


def _attention_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    with _softmax_keeps_float64():
        return type(self).forward(self, *args, **kwargs)


def bridge_softmax_float64(bridge: Any) -> int:
    """Make a float64 Bridge's attention softmax float64 (TransformerLens writes
    ``softmax(scores, dtype=torch.float32)``). Returns the number of attention modules patched.

    TransformerLens calls ``torch.nn.functional.softmax`` from inside the attention forward, so
    the float64-keeping softmax is installed for exactly that call; it changes only float64
    inputs asked for a float32 result.
    """
    AttentionBridge = plain_attention_bridge()  # noqa: N806 - a class
    n = 0
    if AttentionBridge is None:  # no Bridge in this TransformerLens
        return n
    for module in bridge.modules():
        if isinstance(module, AttentionBridge):
            # object.__setattr__: a Bridge component forwards attribute writes to the wrapped
            # Hugging Face module
            object.__setattr__(module, "forward", types.MethodType(_attention_forward, module))
            n += 1
    return n
