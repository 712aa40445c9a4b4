"""Shared test set-up: offline quiet runs, the one tiny-model factory, the backends this
TransformerLens has, and a snapshot of everything lin_lens must leave as it was.

    from tests.conftest import BACKENDS, assert_same_state, requires_hooked, state, tiny

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_x(backend):
        model = tiny("llama", backend)          # cached: leave it as you found it
        model = tiny("gpt2", backend, fresh=True)  # your own copy, to mutate

Device: ``LIN_LENS_DEVICE`` (default ``cpu``) is where ``tiny`` puts its models, e.g.
``LIN_LENS_DEVICE=cuda python -m pytest tests -m "not slow"`` runs the device-agnostic tests on
a GPU; tests that only work on the CPU are marked ``@cpu_only(why)`` and skip there. ``lazy``
(torch's TorchScript lazy-tensor backend) is a second device on a CPU-only machine, a rough aid
for finding CPU/device mix-ups without a GPU, on chosen files only: it is slow, crashes in
forward-mode AD (ordinary_reconstruction, batched contributions) and has false alarms of its own
(``x.unbind(0)[0].clone()`` lands on the CPU).

Markers live in pyproject.toml ([tool.pytest.ini_options]); none are registered here.
"""

from __future__ import annotations

import functools
import importlib
import os

import pytest
import torch

# Set before anything imports huggingface_hub / transformers (they read these at import time).
_ENV = {"LIN_LENS_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(_ENV)

import lin_lens  # noqa: E402
import lin_lens.progress  # noqa: E402
from lin_lens._tl import HAS_BRIDGE, HAS_HOOKED, TL_VERSION  # noqa: E402
from lin_lens.testing import tiny_bridge, tiny_model, tiny_tokenizer  # noqa: E402

# The backends this TransformerLens has. On TL 4.x (no HookedTransformer) the hooked variants
# are not collected at all, rather than collected and skipped.
BACKENDS: list[str] = [b for b, ok in (("hooked", HAS_HOOKED), ("bridge", HAS_BRIDGE)) if ok]
# Architecture families both backends build (tiny_model name; the Bridge's gemma is gemma3).
ARCHS = ("gpt2", "llama", "pythia", "gemma", "qwen3")
BRIDGE_ARCH = {"gemma": "gemma3"}
# cfg flags lin_lens may switch on for a computation and must switch back.
FLAGS = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in")
# Where tiny() builds its models (see the module docstring).
DEVICE: str = os.environ.get("LIN_LENS_DEVICE", "cpu").strip() or "cpu"
ON_DEVICE = torch.device(DEVICE).type != "cpu"


def pytest_configure(config):
    """Fail at once, not test by test, when LIN_LENS_DEVICE names a device this machine lacks."""
    kind = torch.device(DEVICE).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"LIN_LENS_DEVICE={DEVICE} but torch {torch.__version__} sees no CUDA device "
            f"(torch.version.cuda={torch.version.cuda}); unset LIN_LENS_DEVICE to test on the CPU")
    if kind == "lazy":
        importlib.import_module("torch._lazy.ts_backend").init()


def to_device(model):
    """``model`` (built elsewhere, e.g. from a LoadSpec) moved to ``DEVICE``."""
    return model.to(DEVICE, print_details=False) if ON_DEVICE else model


def cpu_only(why: str):
    """Mark a test that runs on the CPU only (a subprocess, Ray workers, a notebook, a real
    model loaded on the CPU); under LIN_LENS_DEVICE=cuda it is skipped with ``why``."""
    return pytest.mark.skipif(ON_DEVICE, reason=f"CPU only: {why} (LIN_LENS_DEVICE={DEVICE})")


@pytest.fixture(autouse=True, scope="session")
def _quiet_offline_env():
    """Keep the variables above for the whole session, and progress bars off even if
    lin_lens.progress was imported before this conftest (it reads the variable once)."""
    os.environ.update(_ENV)
    lin_lens.progress.ENABLED = False
    yield


@pytest.fixture(params=BACKENDS, scope="session")
def backend(request) -> str:
    """Request ``backend`` to run a test once per backend this TransformerLens has (session
    scope, so module-scoped fixtures can build on it)."""
    return request.param


def requires_hooked(why: str):
    """Mark a test that genuinely needs a HookedTransformer; ``why`` names what (a cfg override,
    a family with no tiny Bridge). It is collected on TL 4.x and skipped with that reason."""
    return pytest.mark.skipif(
        not HAS_HOOKED,
        reason=f"needs HookedTransformer: {why} (transformer_lens {TL_VERSION} has none)",
    )


def tiny(arch: str, backend: str, dtype: torch.dtype = torch.float64, *,
         tokenizer: bool = False, fresh: bool = False):
    """The tiny random model of family ``arch`` ("gpt2", "llama", "pythia", "gemma", "qwen3";
    "solu"/"relu" are HookedTransformer-only) on ``backend`` ("hooked" or "bridge"), on
    ``DEVICE``.

    Cached per (arch, backend, dtype, tokenizer): a test that changes the model (hooks, weights,
    cfg, requires_grad) passes ``fresh=True`` or restores it. ``tokenizer=True`` gives the
    HookedTransformer the Bridge's tiny word-level tokenizer ("w0".."w47", "<unk>", "<s>" = 49,
    prepended as BOS); a Bridge always has it. Without it a HookedTransformer shows token i as
    "#i".
    """
    build = _build if fresh else _cached
    return build(arch, backend, dtype, tokenizer)


def _build(arch: str, backend: str, dtype: torch.dtype, tokenizer: bool):
    if backend == "bridge":
        return tiny_bridge(BRIDGE_ARCH.get(arch, arch), dtype, device=DEVICE)
    if backend != "hooked":
        raise ValueError(f"unknown backend {backend!r}; choose from hooked, bridge")
    model = tiny_model(arch, dtype, device=DEVICE)
    if tokenizer:
        model.set_tokenizer(tiny_tokenizer(model.cfg.d_vocab), default_padding_side="right")
    return model


_cached = functools.cache(_build)


def state(model) -> dict:
    """Everything lin_lens must leave as it found it: the hooks on every hook point (by id) and
    on every torch module, the cfg flags, requires_grad, the weights (values, and the parameter,
    buffer and module objects at every path), and the detached mark.

    A Bridge's wrapped Hugging Face modules (``*._original_component*``) are left out: the Bridge
    installs torch hooks there itself, lazily, on its first forward and first run_with_cache.
    """
    return {
        "hooks": {n: ([h.hook.id for h in hp.fwd_hooks], [h.hook.id for h in hp.bwd_hooks])
                  for n, hp in model.hook_dict.items()},
        "torch_hooks": {n: (list(m._forward_hooks), list(m._forward_pre_hooks),
                            list(m._backward_hooks))
                        for n, m in model.named_modules() if "_original_component" not in n},
        "flags": {f: getattr(model.cfg, f) for f in FLAGS if hasattr(model.cfg, f)},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        # the objects themselves (the replay swaps stand-ins in for a pass): every path to each
        "objects": {n: id(t) for n, t in [*model.named_parameters(remove_duplicate=False),
                                          *model.named_buffers(remove_duplicate=False),
                                          *model.named_modules(remove_duplicate=False)]},
        "detached": lin_lens.is_detached(model),
    }


def assert_same_state(before: dict, model) -> None:
    """``model`` is as ``state(model)`` found it (weights bit for bit)."""
    __tracebackhide__ = True
    after = state(model)
    for key in ("hooks", "torch_hooks", "flags", "requires_grad", "objects", "detached"):
        assert after[key] == before[key], f"{key} changed"
    assert after["weights"].keys() == before["weights"].keys()
    changed = [n for n, w in before["weights"].items() if not torch.equal(w, after["weights"][n])]
    assert not changed, f"weights changed: {changed}"
