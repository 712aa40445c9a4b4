"""``engine="ray"``: the same job on a Ray cluster, written to the same shards.

Ray core actors: each loads the model once from its :class:`~lin_lens.corpus.LoadSpec` and
takes batches of prompts; each batch becomes one shard, written by the worker itself (so the
output may be any pyarrow filesystem URI the workers can reach, e.g. ``s3://bucket/run``).
A worker that dies (killed, out of memory, node lost) is restarted by Ray and its batch retried;
the retried batch rewrites the same shard name, so every prompt is in the dataset once.

On a multi-node cluster: ``ray start --head`` on one node, ``ray start --address=HEAD:6379`` on
the others (each with lin_lens and the model's package installed), then on the head
``lin-lens corpus PROMPTS --model … --out s3://… --engine ray --address auto --workers N``.
"""

from __future__ import annotations

import os
from typing import Any

from lin_lens.corpus.analyze import check_hooks, prompt_rows
from lin_lens.corpus.store import Store
from lin_lens.errors import ModelNotAvailableError
from lin_lens.models import LoadSpec
from lin_lens.progress import progress_bar

# Test hook: "exit_once:PATH" makes the first worker to finish a batch exit hard (os._exit) after
# writing its shard and before reporting it, once (PATH marks that it happened): Ray restarts
# the actor and retries the batch, which must rewrite the same shard, not add a second one.
FAULT_ENV = "LIN_LENS_CORPUS_FAULT"
MAX_RESTARTS = 4


class CorpusWorker:
    """One Ray actor: a loaded model and the run's settings."""

    def __init__(self, spec: dict, settings: dict, out: str, threads: int,
                 fault: str | None = None) -> None:
        import torch

        torch.set_num_threads(threads)
        os.environ.setdefault("LIN_LENS_PROGRESS", "0")
        self.model = LoadSpec(**spec).load()
        check_hooks(self.model, settings)
        self.settings, self.store, self.fault = settings, Store(out), fault

    def process(self, batch: list[tuple[int, str]]) -> list[str]:
        rows: list[dict] = []
        for index, text in batch:
            rows.extend(prompt_rows(self.model, text, index, self.settings))
        self.store.write_shard(rows)
        self._maybe_die()
        return sorted({r["prompt_id"] for r in rows})

    def _maybe_die(self) -> None:
        if not self.fault or not self.fault.startswith("exit_once:"):
            return
        marker = self.fault.split(":", 1)[1]
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)


def run_ray(spec: LoadSpec, todo: list[tuple[int, str]], settings: dict, out: str,
            execution: Any) -> None:
    """Process ``todo`` on a Ray cluster (joined at ``execution.address``, or a local one
    started and shut down here); ``execution`` is the run's
    :class:`~lin_lens.corpus.run.Execution`."""
    workers, batch_size, address = execution.workers, execution.batch_size, execution.address
    progress, threads = execution.progress, execution.threads
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as e:
        raise ModelNotAvailableError("engine='ray' needs Ray: pip install 'lin_lens[ray]'") from e

    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
        started = True
    threads = threads or 1
    actors: list[Any] = []
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = workers or max(1, cpus // threads)
        n = min(n, (len(todo) + batch_size - 1) // batch_size)
        Worker = ray.remote(num_cpus=threads, max_restarts=MAX_RESTARTS,
                            max_task_retries=MAX_RESTARTS)(CorpusWorker)
        fault = os.environ.get(FAULT_ENV)
        actors = [Worker.remote(spec.to_dict(), settings, out, threads, fault) for _ in range(n)]
        pool = ActorPool(actors)
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        bar = progress_bar(len(todo), f"lin-lens corpus (ray, {n} workers)", progress,
                           unit="prompt")
        try:
            for ids in pool.map_unordered(lambda a, b: a.process.remote(b), batches):
                bar.update(len(ids))
        finally:
            bar.close()
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
