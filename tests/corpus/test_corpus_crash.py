"""A run killed mid-way (SIGKILL, Ctrl-C) and resumed equals an uninterrupted run, computing only
what was missing; resident memory stays flat across prompts."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow.parquet as pq
import pytest

from lin_lens import corpus
from lin_lens.corpus import LoadSpec
from lin_lens.corpus.store import Store
from tests.conftest import cpu_only
from tests.corpus.conftest import DEFAULT_BACKEND, many_prompts

pytestmark = [cpu_only("crash and resume in subprocesses, on CPU models"),
              pytest.mark.slow]  # runs killed and resumed in subprocesses: ~50 s

N = 20
ANALYSES = ["svd", "decode", "contributions"]

CHILD = textwrap.dedent(f"""
    import json, signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    from lin_lens import corpus
    prompts_file, out, backend = sys.argv[1:]
    model = corpus.LoadSpec("tiny-gpt2", "float64", backend).load()
    # slow enough to be caught mid-run: every forward pass sleeps in block 0
    model.blocks[0].register_forward_hook(lambda *a: time.sleep(0.02))
    corpus.run(model, json.load(open(prompts_file)), out, analyses={ANALYSES!r}, shard_size=2,
               progress=False)
""")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    corpus.run(LoadSpec("tiny-gpt2", "float64", DEFAULT_BACKEND), many_prompts(N), out,
               analyses=ANALYSES, progress=False)
    return corpus.read(out)


def _rows(table) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in table.to_pylist()]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_run_resumes_to_the_uninterrupted_rows(sig, reference, tmp_path):
    prompts = many_prompts(N)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    (tmp_path / "child.py").write_text(CHILD)
    out = tmp_path / "run"
    store = Store(out)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "child.py"),
                             str(tmp_path / "prompts.json"), str(out), DEFAULT_BACKEND],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(store.shard_files()) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "child wrote no shards"
            time.sleep(0.02)
        assert proc.poll() is None, f"child finished before the kill:\n{proc.stdout.read()}"
        proc.send_signal(sig)
        log = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in log
    done = store.done_ids()
    assert 2 * 2 <= len(done) < N  # at least the two shards seen; not everything

    old_files = set(store.shard_files())
    corpus.run(LoadSpec("tiny-gpt2", "float64", DEFAULT_BACKEND), prompts, out, analyses=ANALYSES,
               shard_size=2, progress=False)
    new_ids: list[str] = []
    for f in set(store.shard_files()) - old_files:
        new_ids += pq.read_table(f, columns=["prompt_id"])["prompt_id"].to_pylist()
    assert sorted(new_ids) == sorted(set(new_ids))  # each computed once
    assert not set(new_ids) & done  # nothing recomputed
    assert len(new_ids) == N - len(done)
    table = corpus.read(out)
    assert table["prompt_id"].to_pylist() == reference["prompt_id"].to_pylist()
    assert _rows(table) == _rows(reference)  # identical, float64 bit for bit
    assert not [i for i in os.listdir(out / "shards") if i.endswith(".tmp")]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_resident_memory_is_flat(tmp_path):
    """100 prompts after a warm-up: growth well under what keeping one operator per prompt
    would cost (J alone is n·64·64 float64 here; a retained graph far more)."""
    from lin_lens import testing

    if DEFAULT_BACKEND == "hooked":
        model = testing.tiny_model("gpt2", d_model=64, d_vocab=50)
        model.set_tokenizer(testing.tiny_tokenizer(50), default_padding_side="right")
    else:
        model = testing.tiny_bridge("gpt2")
    prompts = many_prompts(120, seed=1)
    kw = dict(analyses=["svd"], progress=False, threads=1)
    corpus.run(model, prompts[:20], tmp_path / "warm", **kw)
    gc.collect()
    before = _rss()
    corpus.run(model, prompts[20:], tmp_path / "run", **kw)
    gc.collect()
    grown = _rss() - before
    assert corpus.read(tmp_path / "run").num_rows == 100
    assert grown < 8e6, f"resident memory grew by {grown / 1e6:.1f} MB over 100 prompts"
