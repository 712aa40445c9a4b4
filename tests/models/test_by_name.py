"""Any model a TransformerLens user names: a local Hugging Face folder (tiny random Llama- and
GPT-2-style models saved with ``save_pretrained``), loaded by path on both backends, analysed from
the CLI and in a two-worker Ray corpus run; ``tiny-<family>`` names; names that cannot load
offline get an error saying so."""

from __future__ import annotations

import json

import pytest
import torch

import lin_lens
from lin_lens import cli, corpus
from lin_lens.errors import InvalidArgumentError, ModelNotAvailableError
from lin_lens.models import LoadSpec, load_hf, load_model, resolve
from lin_lens.testing import save_tiny_hf
from tests.conftest import cpu_only

FAMILIES = ("llama", "gpt2")


@pytest.fixture(scope="module", params=FAMILIES)
def folder(request, tmp_path_factory):
    return save_tiny_hf(request.param, tmp_path_factory.mktemp(request.param) / "model")


@pytest.mark.parametrize("name, kind", [("smollm2-135m", "embedded"), ("tiny-gpt2", "tiny"),
                                        ("gpt2-small", "hub"), ("someone/some-model", "hub")])
def test_names_resolve_to_their_kind(name, kind):
    src = resolve(name)
    assert src.kind == kind
    if name == "gpt2-small":  # TransformerLens's alias, resolved by TransformerLens
        assert src.hf_name == src.tl_name == "gpt2"


def test_a_folder_loads_by_path_on_each_backend_as_hugging_face_computes_it(folder, backend):
    model = load_model(folder, dtype=torch.float64, backend=backend)
    hf, tok = load_hf(folder, torch.float64)
    tokens = model.to_tokens("w1 w2 w3 w4")
    with torch.no_grad():
        ours = model(tokens)[0].double()
        theirs = hf(tokens.cpu()).logits[0].double()
    assert torch.allclose(ours, theirs, atol=1e-10, rtol=1e-10)
    lm = lin_lens.linear_map(model, tokens, "blocks.1.hook_resid_post")
    assert lm.relative_error < 1e-12
    assert model.lin_lens_info["name"] == folder and model.lin_lens_info["backend"] == backend


def test_a_folder_without_a_config_is_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="without a config.json"):
        load_model(str(tmp_path))


def test_a_hub_name_that_is_not_cached_offline_says_so():
    with pytest.raises(ModelNotAvailableError, match="offline") as e:
        load_model("someone/not-a-cached-model", backend="bridge")
    assert "smollm2-135m" in str(e.value) and "local" in str(e.value)


@cpu_only("the CLI loads its models on the CPU")
def test_the_cli_analyses_a_folder(folder, tmp_path, capsys, backend):
    rc = cli.main(["analyze", "w1 w2 w3", "--model", folder, "--backend", backend,
                   "--dtype", "float64", "--no-progress", "--json", "--out",
                   str(tmp_path / "r.html")])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["model"] == folder
    assert all(d["relative_error"] < 1e-12 for d in s["hooks"].values())


@cpu_only("Ray workers load their models on the CPU")
@pytest.mark.slow
def test_two_ray_workers_load_a_folder_themselves(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'lin_lens[ray]')")
    folder = save_tiny_hf("llama", tmp_path / "model")
    spec = LoadSpec(folder, "float64")
    prompts = [f"w{i} w{i + 1} w{i + 2}" for i in range(6)]
    local = corpus.read(corpus.run(spec, prompts, tmp_path / "local", progress=False))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        path = corpus.run(spec, prompts, tmp_path / "ray", engine="ray", workers=2,
                          batch_size=3, progress=False)
    finally:
        ray.shutdown()
    got = corpus.read(path).to_pylist()
    assert [r["status"] for r in got] == ["ok"] * len(prompts)
    assert {r["model"] for r in got} == {folder}
    want = {r["prompt_id"]: r["relative_error"] for r in local.to_pylist()}
    assert all(r["relative_error"] < 1e-12 and r["prompt_id"] in want for r in got)
