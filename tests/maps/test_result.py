"""LinearMap as a result object: analyses as methods, plain data, save/load, errors by type."""

from __future__ import annotations

import json

import pytest
import torch

import lin_lens
from lin_lens._tl import HAS_HOOKED
from lin_lens.errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    InvalidPositionError,
    LinLensError,
    NotLinearError,
    UnknownHookError,
)
from lin_lens.testing import tiny_bridge, tiny_model

TOKENS = torch.tensor([[3, 17, 42, 8, 8, 29, 11]])
BACKENDS = (["hooked"] if HAS_HOOKED else []) + ["bridge"]


@pytest.fixture(scope="module", params=BACKENDS)
def model(request):
    return tiny_model("gpt2") if request.param == "hooked" else tiny_bridge("gpt2")


@pytest.fixture(scope="module")
def lm(model):
    return lin_lens.linear_map(model, TOKENS, "blocks.1.hook_resid_post", pos=-1)


def test_methods_are_the_functions(model, lm):
    assert torch.equal(lm.svd().S, lin_lens.svd(lm).S)
    assert torch.equal(lm.svd(2, stacked=True).S, lin_lens.svd(lm, 2, stacked=True).S)
    assert torch.equal(lm.stable_rank(), lin_lens.stable_rank(lm))
    d = lm.decode(model, k=1, top=2)
    assert d.S.shape == (7, 1) and d.hook == lm.hook


def test_to_dict_is_plain_data(lm):
    d = lm.to_dict()
    json.dumps(d)
    assert d["hook"] == "blocks.1.hook_resid_post" and d["tokens"] == TOKENS[0].tolist()
    assert len(d["contribution_norm"]) == 7 and len(d["stable_rank"]) == 7
    assert d["relative error"] <= 1e-12


@pytest.mark.parametrize("pos", [-1, [2, 6]])
def test_save_load_round_trip(model, tmp_path, pos):
    lm = lin_lens.linear_map(model, TOKENS, "logits", pos=pos, out_index=[4, 9])
    path = lm.save(tmp_path / "sub" / "map.pt")
    back = lin_lens.LinearMap.load(path)
    assert torch.equal(back.J, lm.J) and torch.equal(back.act, lm.act)
    assert back.constant_by_origin.keys() == lm.constant_by_origin.keys()
    assert torch.equal(back.constant, lm.constant) and torch.equal(back.x, lm.x)
    assert (back.hook, back.source, back.positions, back.out_shape) == (
        lm.hook, lm.source, lm.positions, lm.out_shape)
    assert torch.equal(back.tokens, lm.tokens) and torch.equal(back.out_index, lm.out_index)
    assert back.relative_error == lm.relative_error
    assert back.meta["lin_lens_version"] and back.meta["engine"] == lm.meta["engine"]


def test_load_refuses_other_files(tmp_path):
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(InvalidArgumentError, match="not a file written by LinearMap.save"):
        lin_lens.LinearMap.load(tmp_path / "other.pt")


def test_errors_derive_from_lin_lens_error_and_builtins(model):
    cases = [
        (dict(hook="blocks.1.hook_resid_pots"), UnknownHookError, KeyError),
        (dict(hook="blocks.0.attn.hook_pattern"), NotLinearError, ValueError),
        (dict(pos=99), InvalidPositionError, IndexError),
        (dict(engine="sideways"), InvalidArgumentError, ValueError),
    ]
    for kw, cls, builtin in cases:
        with pytest.raises(cls) as info:
            lin_lens.linear_map(model, TOKENS, **{"hook": "logits", **kw})
        assert isinstance(info.value, LinLensError) and isinstance(info.value, builtin)
    with pytest.raises(ArgumentTypeError):
        lin_lens.linear_map(model, torch.zeros(3), "logits")
    with pytest.raises(ArgumentTypeError, match="pos="):
        lin_lens.top_singular(model, TOKENS, "logits", pos=[1, 2])


def test_top_level_api():
    for name in ("top_singular", "operators_at_hooks", "LinearMap", "detached", "svd",
                 "stable_rank", "decode", "layer_sweep", "decompose", "head_operators", "steer",
                 "load_model", "load_hf", "LinLensError"):
        assert hasattr(lin_lens, name), name


def test_to_keeps_the_error_scale_of_a_direction_map(model):
    u = torch.zeros(model.cfg.d_vocab, dtype=torch.float64)
    u[3], u[4] = 1.0, -1.0
    lm = lin_lens.linear_map(model, TOKENS, "logits", -1, direction=u)
    assert lm.error_scale is not None
    moved = lm.to("cpu")
    assert torch.equal(moved.error_scale, lm.error_scale)
    assert moved.relative_error == lm.relative_error


def test_repr_reports_the_checked_error_without_another_pass(lm, monkeypatch):
    assert f"{lm.meta['checked_error']:.2e}" in repr(lm)
    calls = []
    real = torch.einsum
    monkeypatch.setattr(torch, "einsum", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    repr(lm)
    assert calls == []


def test_selected_outputs_near_zero_are_measured_at_their_scale():
    # Found by LIN_LENS_FUZZ=long: two logits of ≈ 0.03 whose parts sum to ≈ 1 (float32 rounding
    # of 1.5e-5 against ‖act‖, a 70× cancellation). The error is measured at the scale the
    # outputs were computed at, as for direction= maps, so exact maps are not refused.
    m = tiny_bridge("gpt2", torch.float32)
    tokens = torch.tensor([[0, 0, 0, 0, 10]])
    lm = lin_lens.linear_map(m, tokens, "logits", -1, out_index=[1, 5])
    assert lm.relative_error <= 1e-5
    # ... and a map whose linear part is off by 1 % (an unfrozen gate leaves far more) is caught
    lm.J4 = lm.J4 * (1 + 1e-2)
    assert lm.relative_error > lin_lens.default_tolerance(torch.float32)


def test_hook_dict_is_read_once_per_registry_state():
    # A Bridge rebuilds hook_dict (every alias) on each access; lin_lens reads it hundreds of
    # times per map, so it keeps one copy per state of the Bridge's hook registry.
    from lin_lens._tl import hook_dict

    m = tiny_bridge("gpt2")
    first = hook_dict(m)
    assert first is hook_dict(m)
    assert first.keys() == m.hook_dict.keys()
    assert all(first[k] is v for k, v in m.hook_dict.items())
    reg = m._hook_registry
    reg["test.extra_hook"] = next(iter(reg.values()))  # the registry grows: a fresh copy
    try:
        assert "test.extra_hook" in hook_dict(m) and hook_dict(m) is not first
    finally:
        del reg["test.extra_hook"]
    if HAS_HOOKED:
        h = tiny_model("gpt2")
        assert hook_dict(h) is h.hook_dict  # HookedTransformer keeps its own dict
