"""``engine="ray"`` on a local 2-CPU Ray cluster: the local engine's rows, and a worker killed
mid-run is restarted with every prompt in the dataset exactly once."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest

from lin_lens import corpus
from lin_lens.corpus import LoadSpec
from lin_lens.corpus.ray_engine import FAULT_ENV
from lin_lens.corpus.store import Store
from tests.conftest import cpu_only
from tests.corpus.conftest import DEFAULT_BACKEND, many_prompts

pytestmark = [cpu_only("Ray workers load their models on the CPU"),
              pytest.mark.slow]  # a local Ray cluster and a killed worker: ~30 s

ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'lin_lens[ray]')")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def _same(a: list[dict], b: list[dict], tol: float) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for k, va in ra.items():
            if k == "wall_time_s":
                continue
            _close(va, rb[k], tol, k)


def _close(x, y, tol, key):
    if isinstance(x, float) and isinstance(y, float):
        assert math.isclose(x, y, rel_tol=tol, abs_tol=tol), key
    elif isinstance(x, list) and isinstance(y, list):
        assert len(x) == len(y), key
        for a, b in zip(x, y, strict=True):
            _close(a, b, tol, key)
    else:
        assert x == y, key  # tokens, decodes, ids, statuses: identical


def test_ray_rows_equal_local_and_a_killed_worker_is_retried(cluster, tmp_path, monkeypatch):
    spec = LoadSpec("tiny-gpt2", "float64", DEFAULT_BACKEND)
    prompts = many_prompts(12, seed=2) + [""]  # and one failing prompt
    local = corpus.read(corpus.run(spec, prompts, tmp_path / "local", progress=False))
    marker = tmp_path / "worker-died"
    monkeypatch.setenv(FAULT_ENV, f"exit_once:{marker}")
    path = corpus.run(spec, prompts, tmp_path / "ray", engine="ray", workers=2, batch_size=3,
                      progress=False)
    assert marker.exists()  # a worker did exit mid-run (after writing its first shard)
    on_disk = [i for f in Store(path).shard_files()
               for i in pq.read_table(f, columns=["prompt_id"])["prompt_id"].to_pylist()]
    assert len(on_disk) == len(set(on_disk)) == len(prompts)  # the retry rewrote its shard
    got = corpus.read(path)
    ids = got["prompt_id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(prompts)  # every prompt exactly once
    assert [r["status"] for r in got.to_pylist()][-1] == "error"
    _same(got.to_pylist(), local.to_pylist(), 1e-12)
