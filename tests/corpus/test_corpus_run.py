"""``corpus.run`` / ``corpus.read``: the rows hold what the public API computes for each prompt,
failures are rows, prompts come from every source, resume computes only what is missing."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lin_lens
from lin_lens import corpus
from lin_lens.corpus.schema import SCHEMA
from lin_lens.corpus.store import Store
from lin_lens.errors import OutputExistsError

ALL = ["svd", "decode", "contributions", "ordinary"]


def T(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_rows_hold_the_exact_maps(model, tmp_path):
    prompts = ["w1 w2 w3", "w4 w5 w6 w7", "w9 w9 w9 w1 w3 w7"]
    path = corpus.run(model, prompts, tmp_path / "run", pos=[-1, 1], analyses=ALL, k=4,
                      progress=False)
    t = corpus.read(path)
    assert t.schema.equals(SCHEMA, check_metadata=False)
    assert t.num_rows == 2 * len(prompts)
    rows = t.to_pylist()
    for r in rows:
        assert r["status"] == "ok", r["error"]
        text = prompts[r["prompt_index"]]
        assert r["text"] == text
        assert r["prompt_id"] == corpus.prompt_id(text, json.loads(r["settings"]))
        tokens = lin_lens.to_tokens(model, text)
        assert r["token_ids"] == tokens[0].tolist() and len(r["tokens"]) == r["n_tokens"]
        t_pos = r["target_pos"]
        assert t_pos in (1, r["n_tokens"] - 1)

        # prediction: the model's own top token at the target
        with torch.no_grad():
            logits = model(tokens, return_type="logits")[0, t_pos]
        assert r["prediction_id"] == int(logits.argmax())
        assert r["top_ids"][0] == r["prediction_id"] and len(r["top_ids"]) == 5
        assert r["probability"] == pytest.approx(float(logits.softmax(-1).max()), rel=1e-12)

        # the operator: exact, and its spectra / decodings are lin_lens's own
        lm = lin_lens.linear_map(model, tokens, "ln_final.hook_normalized", t_pos)
        assert r["relative_error"] < 1e-12
        assert r["relative_error_ordinary"] > 1e-3  # the ordinary Jacobian does not reconstruct
        sv = lin_lens.svd(lm, 4)
        assert torch.allclose(T(r["singular_values"]), sv.S, rtol=1e-10)
        assert torch.allclose(T(r["stable_rank"]), lin_lens.stable_rank(lm),
                              rtol=1e-10)
        assert r["stable_rank_stacked"] == pytest.approx(
            float(lin_lens.stable_rank(lm, stacked=True)), rel=1e-10)
        d = lin_lens.decode(model, lm, k=3, top=5)
        assert r["u_stacked_ids"] == [u.ids for u in d.stacked_out]
        assert r["v_ids"][0] == [v.ids for v in d.inp[0]]
        assert len(r["u_ids"]) == r["n_tokens"] and len(r["u_ids"][0]) == 3

        # contributions to the predicted logit sum to it, and are the direction map's
        c = T(r["contributions"])
        assert float(c.sum()) + r["contribution_constant"] == pytest.approx(r["logit"], abs=1e-10)
        assert r["logit"] == pytest.approx(float(logits[r["prediction_id"]]), abs=1e-10)
        u = torch.zeros_like(logits)
        u[r["prediction_id"]] = 1
        ref = lin_lens.linear_map(model, tokens, "logits", t_pos, direction=u).contributions()
        assert torch.allclose(c, ref[:, 0], atol=1e-12)
        assert r["wall_time_s"] > 0 and r["error"] is None
    # to_pandas works on the nested columns
    df = t.to_pandas()
    assert list(df["target_pos"][:2]) == [1, 3]


def test_failures_are_rows(model, tmp_path):
    prompts = ["w1 w2", "", "w3 w4 w5"]
    path = corpus.run(model, prompts, tmp_path / "run", pos=2, analyses=["svd"],
                      progress=False)
    rows = corpus.read(path).to_pylist()
    assert [r["prompt_index"] for r in rows] == [0, 1, 2]
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["error_type"] and "empty" in rows[1]["error"]
    assert rows[1]["text"] == "" and rows[1]["relative_error"] is None
    # a position beyond a prompt: its own error row
    path = corpus.run(model, ["w1", "w2 w3 w4"], tmp_path / "run2", pos=2, progress=False)
    rows = corpus.read(path).to_pylist()
    assert [r["status"] for r in rows] == ["error", "ok"]
    assert rows[0]["error_type"] == "InvalidPositionError" and "out of range" in rows[0]["error"]


def test_unfrozen_nonlinearity_is_a_not_exact_row(model, tmp_path):
    """A nonlinearity detached mode does not know is refused, and recorded as such."""
    def square(t, hook):
        return t + 0.3 * t * t

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_mid", square)]):
        path = corpus.run(model, ["w1 w2 w3"], tmp_path / "run", analyses=["svd"],
                          progress=False)
    (r,) = corpus.read(path).to_pylist()
    assert r["status"] == "not_exact" and r["error_type"] == "NotExactError"
    assert r["relative_error"] > 1e-6


def test_prompt_sources(tmp_path):
    prompts = ["To find", "Will carry on", 'A "quoted" one']
    (tmp_path / "p.txt").write_text("\n".join([prompts[0], "", *prompts[1:]]) + "\n")
    (tmp_path / "p.jsonl").write_text(
        "\n".join(json.dumps({"id": i, "prompt": p}) for i, p in enumerate(prompts)))
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "p.parquet")
    assert corpus.load_prompts(prompts) == prompts
    assert corpus.load_prompts(tmp_path / "p.txt") == prompts
    assert corpus.load_prompts(str(tmp_path / "p.jsonl"), field="prompt") == prompts
    assert corpus.load_prompts(tmp_path / "p.parquet", field="prompt") == prompts
    with pytest.raises(ValueError, match="no field 'text'"):
        corpus.load_prompts(tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match="no column 'text'"):
        corpus.load_prompts(tmp_path / "p.parquet")
    with pytest.raises(FileNotFoundError):
        corpus.load_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.csv").write_text("x")
    with pytest.raises(ValueError, match="expected one of"):
        corpus.load_prompts(tmp_path / "p.csv")
    with pytest.raises(TypeError, match="item 1"):
        corpus.load_prompts(["a", 3])


def test_phrases():
    p = corpus.phrases()
    assert len(p) == len(set(p)) == 100
    assert all(2 <= len(s.split()) <= 4 for s in p)
    assert corpus.load_prompts("phrases") == p


def test_resume_computes_only_missing(spec, tmp_path):
    out = tmp_path / "run"
    first = ["w1 w2", "w3 w4", "w5 w6", "w7 w8"]
    corpus.run(spec, first, out, analyses=["svd"], shard_size=3, progress=False)
    store = Store(out)
    before = {f: set(pq.read_table(f, columns=["prompt_id"])["prompt_id"].to_pylist())
              for f in store.shard_files()}
    assert len(before) == 2  # 3 + 1 prompts
    # more prompts, one duplicate text: only the two new ones run, once
    corpus.run(spec, [*first, "w9 w10", "w1 w2", "w11"], out, analyses=["svd"], shard_size=3,
               progress=False)
    new = [f for f in store.shard_files() if f not in before]
    assert len(new) == 1
    new_ids = set(pq.read_table(new[0], columns=["prompt_id"])["prompt_id"].to_pylist())
    assert len(new_ids) == 2 and not new_ids & set().union(*before.values())
    t = corpus.read(out)
    assert t["text"].to_pylist() == [*first, "w9 w10", "w11"]
    assert t["prompt_index"].to_pylist() == [0, 1, 2, 3, 4, 6]
    # results of other settings never mix into a run; resume=False never touches one
    with pytest.raises(OutputExistsError, match="k: 8 → 5"):
        corpus.run(spec, first, out, analyses=["svd"], k=5, progress=False)
    with pytest.raises(OutputExistsError, match="resume=True"):
        corpus.run(spec, first, out, analyses=["svd"], resume=False, progress=False)


def test_read_keeps_each_prompt_once_and_skips_temporaries(spec, tmp_path):
    out = tmp_path / "run"
    corpus.run(spec, ["w1 w2", "w3"], out, analyses=["svd"], progress=False)
    ref = corpus.read(out)
    (f,) = Store(out).shard_files()
    shutil.copy(f, f.replace("part-", "part-zz"))  # a batch written twice
    (tmp_path / "run" / "shards" / ".part-x.parquet.1234.tmp").write_bytes(b"half a file")
    assert corpus.read(out).equals(ref)
    assert corpus.read(out, columns=["text"]).column_names == ["text"]
    with pytest.raises(FileNotFoundError, match="no lin_lens corpus run"):
        corpus.read(tmp_path / "nothing")


def test_pyarrow_uri(spec, tmp_path):
    uri = (tmp_path / "run").as_uri()  # file:///…
    assert corpus.run(spec, ["w1 w2"], uri, analyses=["svd"], progress=False) == uri
    assert corpus.read(uri).num_rows == 1


@pytest.mark.parametrize("kw, err, msg", [
    (dict(engine="spark"), ValueError, "engine 'spark'"),
    (dict(k=0), ValueError, "k must be a positive int"),
    (dict(analyses=["svd", "lens"]), ValueError, "unknown \\['lens'\\]"),
])
def test_argument_errors(kw, err, msg, tmp_path):
    with pytest.raises(err, match=msg):
        corpus.run("tiny-gpt2", ["w1"], tmp_path / "run", **kw)


def test_hook_typo_fails_before_the_first_prompt(model, tmp_path):
    with pytest.raises(ValueError, match="hook 'blocks.0.hook_resid_pots' is not a hook"):
        corpus.run(model, ["w1"], tmp_path / "run", hook="blocks.0.hook_resid_pots")
    assert not (tmp_path / "run").exists()


def test_ray_engine_needs_a_spec(model, tmp_path):
    with pytest.raises(TypeError, match="loadable spec"):
        corpus.run(model, ["w1"], tmp_path / "run", engine="ray")
