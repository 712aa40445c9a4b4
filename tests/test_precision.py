"""TF32 off during lin_lens's computations: the user's precision settings are switched to full
float32 for the call and put back after it, also when it raises or is interrupted (on a CPU these
flags do nothing, so the tests set them and read them back)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import lin_lens
from lin_lens import _precision
from lin_lens._precision import exact_matmul
from lin_lens.corpus import batched_decompose
from lin_lens.graph import attribution_graph
from lin_lens.maps import ordinary_reconstruction
from tests._interrupts import interrupt_at
from tests.conftest import BACKENDS, tiny

TOKENS = [3, 17, 42, 8, 29]
HOOK = "blocks.1.hook_resid_post"
EXACT = {"cuda.matmul.allow_tf32": False, "cudnn.allow_tf32": False,
         "float32_matmul_precision": "highest"}


def _legacy() -> dict:
    s = _precision.settings()
    return {k: s[k] for k in EXACT}


@pytest.fixture
def tf32_on():
    """The user's settings: TF32 everywhere (torch's own default leaves cuBLAS's off)."""
    saved = _precision.settings()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    user = _precision.settings()
    assert user["cuda.matmul.allow_tf32"] and user["float32_matmul_precision"] == "high"
    yield user
    _precision._restore(saved)
    assert not _precision._HOLDERS and not _precision._SAVED


def _recording(seen: list):
    def hook(t, hook):
        seen.append(_legacy())

    return hook


CALLS = {
    "linear_map": lambda m: lin_lens.linear_map(m, TOKENS, HOOK),
    "operators_at_hooks": lambda m: lin_lens.operators_at_hooks(m, TOKENS, [HOOK],
                                                                engine="forward"),
    "top_singular": lambda m: lin_lens.top_singular(m, TOKENS, HOOK, k=2, tol=1e-6),
    "head_operators": lambda m: lin_lens.head_operators(m, TOKENS, 1),
    "ordinary_reconstruction": lambda m: ordinary_reconstruction(m, torch.tensor([TOKENS]),
                                                                 HOOK, -1),
    "attribution_graph": lambda m: attribution_graph(m, TOKENS, max_nodes=4),
    "batched_decompose": lambda m: batched_decompose(m, [TOKENS, TOKENS[:3]], out_index=1),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_tf32_off_during_the_call_and_restored_after(call, backend, tf32_on):
    m = tiny("gpt2", backend)
    seen: list[dict] = []
    with m.hooks(fwd_hooks=[("blocks.0.hook_resid_post", _recording(seen))]):
        CALLS[call](m)
    assert seen and all(s == EXACT for s in seen), seen
    assert _precision.settings() == tf32_on


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_restored_when_the_call_raises(exc, backend, tf32_on):
    m = tiny("gpt2", backend)
    seen: list[dict] = []

    def boom(t, hook):
        seen.append(_legacy())
        raise exc("boom")

    with m.hooks(fwd_hooks=[("blocks.0.hook_resid_post", boom)]), pytest.raises(exc):
        lin_lens.linear_map(m, TOKENS, HOOK)
    assert seen == [EXACT]
    assert _precision.settings() == tf32_on


def test_nested_calls_restore_once_at_the_end(tf32_on):
    with exact_matmul():
        with exact_matmul():
            assert _legacy() == EXACT
        assert _legacy() == EXACT  # the inner call must not restore the user's TF32
    assert _precision.settings() == tf32_on


def test_concurrent_calls_restore_when_the_last_one_ends(tf32_on):
    entered, release = threading.Event(), threading.Event()
    inside: list[dict] = []

    def other():
        with exact_matmul():
            entered.set()
            release.wait(10)
            inside.append(_legacy())

    t = threading.Thread(target=other)
    with exact_matmul():
        t.start()
        assert entered.wait(10)
    assert _legacy() == EXACT  # the other thread still computes
    release.set()
    t.join(10)
    assert inside == [EXACT]
    assert _precision.settings() == tf32_on


def test_reset_restores_after_an_abandoned_call(tf32_on):
    ctx = exact_matmul()
    ctx.__enter__()  # never closed, as after a crash in user code
    assert _legacy() == EXACT
    lin_lens.reset(tiny("gpt2", BACKENDS[0]))
    assert _precision.settings() == tf32_on
    del ctx


def _enter_and_leave():
    with exact_matmul():
        pass


@pytest.mark.slow  # a traced run per line
def test_interrupt_at_every_line(tf32_on):
    """A Ctrl-C on any line of the context manager leaves the user's settings as they were
    (except on the statement that starts the clean-up, the one window Python cannot close; see
    tests/freeze/test_state_safety.py)."""
    src = str(Path(_precision.__file__))
    n, done = 1, False
    while not done:
        done = interrupt_at(n, _enter_and_leave, under=src)
        assert _precision.settings() == tf32_on, f"settings changed by an interrupt at line {n}"
        assert not _precision._HOLDERS and not _precision._SAVED
        n += 1
    assert n > 10


def test_forced_tf32_is_announced(monkeypatch):
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    monkeypatch.setattr(_precision, "_WARNED", [])
    with pytest.warns(RuntimeWarning, match="TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"), exact_matmul():
        pass


def test_a_no_op_with_default_settings():
    before = _precision.settings()
    lm = lin_lens.linear_map(tiny("llama", BACKENDS[0], torch.float32), TOKENS, HOOK)
    assert lm.relative_error <= 1e-5
    assert _precision.settings() == before
