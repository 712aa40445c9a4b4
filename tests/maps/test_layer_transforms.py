"""layer_transforms: every layer's own map from one pass equals the per-layer reverse map (J,
constants by origin, activation), on tiny random models of every family and both backends."""

from __future__ import annotations

import pytest
import torch

import lin_lens
from lin_lens import layer_transforms, linear_map
from lin_lens.errors import ArgumentTypeError, InvalidArgumentError
from tests.conftest import ARCHS, BACKENDS, assert_same_state, state, tiny


def _tokens(n: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 50, (1, n), generator=g)


@pytest.mark.parametrize("pos", [-1, [1, 4]])
@pytest.mark.parametrize("arch,backend", [(a, b) for a in ARCHS for b in BACKENDS])
def test_layer_transforms_equal_one_map_per_layer(arch, backend, pos):
    model = tiny(arch, backend)
    toks = _tokens()
    before = state(model)
    got = layer_transforms(model, toks, None, pos)
    assert_same_state(before, model)
    assert sorted(got) == list(range(model.cfg.n_layers))
    for layer, lm in got.items():
        ref = linear_map(model, toks, f"blocks.{layer}.hook_resid_post", pos,
                         source=f"blocks.{layer}.hook_resid_pre", engine="reverse")
        assert lm.meta["engine"] == "reverse (layers in one pass)"
        assert (lm.hook, lm.source, lm.positions) == (ref.hook, ref.source, ref.positions)
        assert lm.J.shape == ref.J.shape
        assert torch.allclose(lm.J4, ref.J4, rtol=0, atol=1e-12), layer
        assert torch.equal(lm.act4, ref.act4) and torch.equal(lm.x, ref.x)
        assert set(lm.constants) == set(ref.constants), layer
        for k in lm.constants:
            assert torch.allclose(lm.constants[k], ref.constants[k], rtol=0, atol=1e-12)
        assert lm.relative_error <= 1e-12
        assert lm.meta["checked_error"] == lm.relative_error


def test_layer_transforms_of_some_layers_have_their_biases(backend):
    """gpt2 has biases in every block: each layer's constants are its own block's biases."""
    model = tiny("gpt2", backend)
    params = dict(model.named_parameters())
    got = layer_transforms(model, _tokens(), [-1], -1)
    assert list(got) == [model.cfg.n_layers - 1]
    for layer, lm in got.items():
        own = {id(p) for p in model.blocks[layer].parameters()}
        assert lm.constants and all(id(params[k]) in own for k in lm.constants)
        assert lm.relative_error <= 1e-12


def test_layer_transforms_refuse_bad_layers(backend):
    model = tiny("llama", backend)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        layer_transforms(model, _tokens(), [model.cfg.n_layers])
    with pytest.raises(InvalidArgumentError, match="out of range"):
        layer_transforms(model, _tokens(), [])
    with pytest.raises(ArgumentTypeError):
        layer_transforms(model, _tokens(), [1.0])


def test_layer_sweep_uses_the_one_pass_transforms(backend):
    model = tiny("llama", backend)
    sw = lin_lens.layer_sweep(model, _tokens(), -1, kinds=("transform",), keep_maps=True)
    assert {lm.meta["engine"] for lm in sw.maps.values()} == {"reverse (layers in one pass)"}
    assert float(sw.relative_error["transform"].max()) <= 1e-12


def test_layer_sweep_streams_the_transforms_in_groups_that_fit(backend, monkeypatch):
    """A budget that holds one layer's map at a time: one pass per layer, same maps."""
    import lin_lens.analyses.sweep as sweep_mod

    model = tiny("llama", backend)
    toks = _tokens()
    whole = lin_lens.layer_sweep(model, toks, -1, kinds=("transform",), keep_maps=True)
    calls = []
    real = sweep_mod.layer_transforms

    def spy(*a, **kw):
        calls.append(list(a[2]))
        return real(*a, **kw)

    assert sweep_mod._layers_per_pass(model, toks.shape[1], None) >= model.cfg.n_layers
    per_layer = toks.shape[1] * model.cfg.d_model ** 2 * 8  # float64
    assert sweep_mod._layers_per_pass(model, toks.shape[1], 3 * per_layer) == 1
    monkeypatch.setattr(sweep_mod, "_layers_per_pass", lambda *a: 1)
    monkeypatch.setattr(sweep_mod, "layer_transforms", spy)
    streamed = lin_lens.layer_sweep(model, toks, -1, kinds=("transform",), keep_maps=True)
    assert calls == [[layer] for layer in range(model.cfg.n_layers)]
    for key, lm in whole.maps.items():
        assert torch.equal(lm.J4, streamed.maps[key].J4)
