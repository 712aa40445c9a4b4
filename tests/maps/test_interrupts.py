"""Ctrl-C (KeyboardInterrupt) in the middle of any engine leaves the model exactly as it was,
and it still works afterwards."""

from __future__ import annotations

import pytest
import torch

import lin_lens.maps.forward as fwd_mod
import lin_lens.maps.matrix_free as mf_mod
from lin_lens import operators_at_hooks, top_singular
from lin_lens.maps import layer_sweep_hooks
from tests.conftest import assert_same_state, state, tiny

# interrupted mid-computation at several stages of every engine, on both backends
pytestmark = pytest.mark.slow


def _tokens(n: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (1, n), generator=g)


# After how many calls of the user's hook to raise. The forward engine replays the model many
# times (interrupt mid-replay, while biases and skipped projections are swapped out); reverse
# mode stops each pass at its target, so there the hook fires once per map (later stages:
# test_..._from_progress_bar).
FIRE_AT = {"forward": 3, "reverse": 0, "matrix_free": 0}


@pytest.mark.parametrize("engine", ["forward", "reverse", "matrix_free"])
def test_keyboard_interrupt_leaves_model_unchanged(engine, backend):
    model = tiny("gpt2", backend, fresh=True)
    toks = _tokens()
    calls = {"n": 0}
    fire_at = FIRE_AT[engine]

    def boom(t, hook):  # the user's own hook, raising mid-computation
        calls["n"] += 1
        if calls["n"] > fire_at:
            raise KeyboardInterrupt

    hooks = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_result"]
    with model.hooks(fwd_hooks=[("blocks.1.hook_attn_out", boom)]):
        before = state(model)
        with pytest.raises(KeyboardInterrupt):
            if engine == "matrix_free":
                top_singular(model, toks, "blocks.1.hook_resid_post", k=2, block=1, tol=1e-14)
            else:
                operators_at_hooks(model, toks, hooks, pos=None, engine=engine, chunk_size=4)
        assert_same_state(before, model)
    # and it still works afterwards
    m = operators_at_hooks(model, toks, hooks, engine=engine if engine != "matrix_free"
                           else "auto")
    assert all(v.relative_error <= 1e-12 for v in m.values())


def test_keyboard_interrupt_from_progress_bar(monkeypatch, backend):
    model = tiny("llama", backend, fresh=True)
    before = state(model)

    class Bar:
        def __init__(self, *a, **k):
            self.n = 0

        def update(self, k):
            self.n += 1
            if self.n == 2:
                raise KeyboardInterrupt

        def close(self):
            pass

    monkeypatch.setattr(fwd_mod, "progress_bar", Bar)
    monkeypatch.setattr(mf_mod, "progress_bar", Bar)
    with pytest.raises(KeyboardInterrupt):
        operators_at_hooks(model, _tokens(), layer_sweep_hooks(model), engine="forward",
                           chunk_size=4)
    with pytest.raises(KeyboardInterrupt):
        top_singular(model, _tokens(), "logits", k=2, block=1, tol=1e-14)
    assert_same_state(before, model)
