"""Every refusal a user can trigger from a public entry point is a ``LinLensError`` (and the
built-in a caller would catch), with a message that names the file, line or value and the cause.
Each case below triggers the refusal for real; none inspects the error classes themselves."""

from __future__ import annotations

import json

import pytest
import torch

import lin_lens
from lin_lens import corpus
from lin_lens.errors import (
    FileFormatError,
    LinLensError,
    MissingFileError,
    OutputExistsError,
)
from lin_lens.models import LoadSpec
from tests.conftest import tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _raises(fn, match: str, *also: type[BaseException]):
    with pytest.raises(LinLensError, match=match) as e:
        fn()
    for cls in also:
        assert isinstance(e.value, cls)
    return e.value


def test_prompts_files(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("one\ncaf\xe9 au lait\n".encode("latin-1"))
    _raises(lambda: corpus.load_prompts(bad), r"latin1.txt:2: not UTF-8", ValueError,
            FileFormatError)
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"text": "a"}\n{"text": "b",\n')
    _raises(lambda: corpus.load_prompts(jl), r"p.jsonl:2: not a JSON line", FileFormatError)
    pq_file = tmp_path / "p.parquet"
    pq_file.write_bytes(b"not parquet")
    _raises(lambda: corpus.load_prompts(pq_file), "not a readable Parquet file")
    _raises(lambda: corpus.load_prompts(tmp_path / "none.txt"), "does not exist",
            FileNotFoundError, MissingFileError)
    (tmp_path / "p.csv").write_text("a,b")
    _raises(lambda: corpus.load_prompts(tmp_path / "p.csv"), "expected one of")
    _raises(lambda: corpus.load_prompts([]), "empty")
    _raises(lambda: corpus.load_prompts(["a", 3]), "item 1 is int", TypeError)


def test_corpus_run_arguments_and_outputs(tmp_path):
    model = tiny("gpt2", "bridge", tokenizer=True)
    run = corpus.run
    _raises(lambda: run("tiny-gpt2", ["w1"], tmp_path / "a", engine="spark"), "engine 'spark'")
    _raises(lambda: run("tiny-gpt2", ["w1"], tmp_path / "a", k=0), "k must be a positive")
    _raises(lambda: run("tiny-gpt2", ["w1"], tmp_path / "a", lens=True), "unknown options",
            TypeError)
    _raises(lambda: run("tiny-gpt2", ["w1"], tmp_path / "a", analyses=["lens"]), "lens")
    _raises(lambda: run(model, ["w1"], tmp_path / "a", engine="ray"), "loadable spec",
            TypeError)
    _raises(lambda: run(model, ["w1"], tmp_path / "a", hook="blocks.0.hook_resid_pots"),
            "not a hook")
    afile = tmp_path / "a_file"
    afile.write_text("x")
    _raises(lambda: run(model, ["w1"], afile), "is a file")
    out = tmp_path / "run"
    run(model, ["w1 w2"], out, analyses=["svd"], progress=False)
    _raises(lambda: run(model, ["w1 w2"], out, analyses=["svd"], k=3, progress=False),
            "other settings", FileExistsError, OutputExistsError)
    _raises(lambda: run(model, ["w1 w2"], out, analyses=["svd"], resume=False,
                        progress=False), "resume=True", OutputExistsError)
    manifest = out / "_lin_lens_corpus.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "schema_version": 99}))
    _raises(lambda: run(model, ["w1 w2"], out, analyses=["svd"], progress=False),
            "schema version 99", FileFormatError)
    _raises(lambda: corpus.read(tmp_path / "nothing"), "no lin_lens corpus run",
            FileNotFoundError)
    _raises(lambda: corpus.compare(out, labels=["a", "b"], out=tmp_path / "c.html"),
            "labels: 2 given for 1")


def test_load_specs_and_models(tmp_path):
    _raises(lambda: LoadSpec("tiny-gpt2", "int8"), "dtype 'int8'")
    _raises(lambda: LoadSpec("tiny-gpt2", backend="jax"), "backend 'jax'")
    _raises(lambda: lin_lens.load_model("tiny-nope"), "family 'nope'")
    _raises(lambda: lin_lens.load_model(str(tmp_path)), "without a config.json")
    _raises(lambda: lin_lens.load_model("no-such/model"), "cannot load", ImportError)


def test_maps_results_and_analyses():
    model = tiny("gpt2", "bridge", tokenizer=True)
    lm = lin_lens.linear_map(model, "w1 w2 w3", "blocks.0.hook_resid_post", [1, 2])
    _raises(lambda: lin_lens.decoding.contributions(lm), "single-target map")
    _raises(lambda: lin_lens.linear_map(model, "w1 " * 70, "blocks.0.hook_resid_post"),
            "has 71 tokens, more than the model's context length n_ctx=64")
    long_ids = torch.randint(0, 40, (80,))
    _raises(lambda: lin_lens.linear_map(model, long_ids, "blocks.0.hook_resid_post"),
            "has 80 tokens")
    assert lin_lens.to_tokens(model, "w1 " * 70, truncate=True).shape == (1, 64)
    _raises(lambda: corpus.batched_contributions(model, ["w1", "w1 " * 70], out_index=3),
            "has 71 tokens")
    _raises(lambda: lin_lens.decompose(model, "w1 w2", "blocks.0.attn.hook_z"),
            "residual-stream target")
    _raises(lambda: lin_lens.attribution_graph(model, "w1 w2", pos=5), "out of range",
            IndexError)


def test_decompose_without_norms_is_exact_not_a_key_error():
    m = tiny("gemma", "hooked") if lin_lens._tl.HAS_HOOKED else None
    if m is None:
        pytest.skip("needs HookedTransformer: a cfg override (normalization_type=None)")
    from lin_lens.testing import tiny_model

    m = tiny_model("gemma", normalization_type=None)
    for hook in ("blocks.1.hook_resid_post", "blocks.1.hook_resid_mid"):
        d = lin_lens.decompose(m, torch.tensor([[1, 2, 3]]), hook)
        assert d.relative_error < 1e-12
