"""``run``: one analysis over many prompts into a Parquet dataset that survives being killed."""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

import lin_lens
from lin_lens.corpus.analyze import (
    DEFAULT_ANALYSES,
    analyze_prompt,
    check_analyses,
    check_hooks,
    model_info,
)
from lin_lens.corpus.prompts import load_prompts
from lin_lens.corpus.schema import RESULT_SETTINGS, SCHEMA_VERSION, prompt_id
from lin_lens.corpus.spec import as_spec
from lin_lens.corpus.store import Store
from lin_lens.progress import progress_bar

ENGINES = ("local", "ray")


def run(
    model: Any,
    prompts: str | Path | Iterable[str],
    out: str | os.PathLike,
    *,
    analyses: Iterable[str] = DEFAULT_ANALYSES,
    hook: str = "ln_final.hook_normalized",
    pos: int | list[int] = -1,
    k: int = 8,
    engine: str = "local",
    workers: int | None = None,
    resume: bool = True,
    progress: bool | None = True,
    source: str = "hook_embed",
    n_decode: int = 3,
    top: int = 5,
    prepend_bos: bool | None = None,
    field: str = "text",
    shard_size: int = 16,
    batch_size: int = 4,
    address: str | None = None,
    threads: int | None = None,
) -> str:
    """Analyse every prompt with an exact linear map and write one row per (prompt, target
    position) to a Parquet dataset at ``out``; returns ``out`` (absolute for a local path).

    Args:
        model: a loaded model (local engine), or a loadable spec that each worker loads itself:
            a :class:`LoadSpec`, a name (``"smollm2-135m"``, ``"tiny-gpt2"``), a dict or a
            ``(name, dtype, backend)`` tuple. ``engine="ray"`` needs a spec.
        prompts: a list of strings, or a ``.txt`` / ``.jsonl`` (``field``) / ``.parquet``
            (column ``field``) file; ``"phrases"`` for the 100 shipped phrases.
        out: a directory (local path or pyarrow filesystem URI, e.g. ``s3://bucket/run``).
        analyses: any of ``"svd"`` (singular values, stable ranks), ``"decode"`` (singular
            vectors to tokens; implies the SVD), ``"contributions"`` (each token's exact share
            of the predicted logit), ``"ordinary"`` (the ordinary Jacobian's relative error).
        hook, source, pos: the map ``linear_map(model, text, hook, pos, source=source)``; ``pos``
            an int or a list (one row per position).
        k: singular values kept per operator; ``n_decode`` vectors decoded, ``top`` tokens each.
        engine: ``"local"`` (this process) or ``"ray"`` (:mod:`lin_lens.corpus.ray_engine`).
        workers: Ray actors (default: one per ``threads`` CPUs of the cluster).
        resume: skip prompts whose id is already in ``out`` (the default). False refuses to
            touch a directory that already holds rows.
        progress: a progress bar over prompts.
        shard_size: local engine: prompts per shard (a killed run loses at most these).
        batch_size: Ray engine: prompts per task (one shard each).
        address: Ray cluster to join (``ray.init(address=...)``; default a local one).
        threads: torch threads per worker (local engine: for the run, then restored).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose from {', '.join(ENGINES)}")
    for name, v in (("k", k), ("n_decode", n_decode), ("top", top), ("shard_size", shard_size),
                    ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    texts = load_prompts(prompts, field)
    spec = as_spec(model)
    if engine == "ray" and spec is None:
        raise TypeError("engine='ray': pass a loadable spec (e.g. LoadSpec('smollm2-135m', "
                        "'float32') or a name), not a loaded model: each worker loads its own")
    info = spec.info() if spec is not None else model_info(model)
    settings = {**info, "hook": hook, "source": source,
                "pos": pos if isinstance(pos, int) else [int(p) for p in pos], "k": k,
                "n_decode": n_decode, "top": top, "analyses": list(check_analyses(analyses)),
                "prepend_bos": prepend_bos}
    if spec is None:
        check_hooks(model, settings)  # before anything is written

    store = Store(out)
    _prepare(store, settings, len(texts), resume)
    done = store.done_ids() if resume else set()
    first: dict[str, int] = {}
    for i, t in enumerate(texts):
        first.setdefault(t, i)  # duplicate texts share an id: run once
    todo = [(i, t) for t, i in first.items() if prompt_id(t, settings) not in done]

    if todo:
        if engine == "ray":
            from lin_lens.corpus.ray_engine import run_ray

            assert spec is not None  # checked above: engine="ray" needs a spec
            run_ray(spec, todo, settings, store.uri, workers=workers, batch_size=batch_size,
                    address=address, progress=progress, threads=threads)
        else:
            loaded = model
            if spec is not None:
                loaded = spec.load()
                check_hooks(loaded, settings)
            with _threads(threads):
                _run_local(loaded, todo, settings, store, shard_size, progress)
    return store.uri


def _prepare(store: Store, settings: dict, n_prompts: int, resume: bool) -> None:
    """Write the manifest; on resume check that the results would be comparable."""
    old = store.read_manifest()
    if old is not None:
        if not resume and store.shard_files():
            raise FileExistsError(f"{store.uri!r} already holds a corpus run; pass resume=True "
                                  "to complete it, or choose another directory")
        before = old.get("settings", {})
        diff = [k for k in RESULT_SETTINGS if before.get(k) != settings.get(k)]
        if diff and store.shard_files():
            raise ValueError(
                f"{store.uri!r} holds a run with other settings ("
                + ", ".join(f"{k}: {before.get(k)!r} → {settings.get(k)!r}" for k in diff)
                + "); choose another directory")
        if old.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{store.uri!r} has schema version {old.get('schema_version')}, "
                             f"this lin_lens writes {SCHEMA_VERSION}")
    store.clean_temporary()
    store.write_manifest({
        "schema_version": SCHEMA_VERSION, "settings": settings, "n_prompts": n_prompts,
        "lin_lens_version": getattr(lin_lens, "__version__", "unknown"),
        "created": (old or {}).get("created") or _now(), "updated": _now(),
    })


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_local(model: Any, todo: list[tuple[int, str]], settings: dict, store: Store,
               shard_size: int, progress: bool | None, flush_seconds: float = 60.0) -> None:
    """Prompts in order; a shard every ``shard_size`` prompts or ``flush_seconds``. On Ctrl-C
    the finished prompts are written before the interrupt propagates."""
    buf: list[dict] = []
    n_buf, last = 0, time.monotonic()
    bar = progress_bar(len(todo), "lin-lens corpus", progress, unit="prompt")
    try:
        for index, text in todo:
            buf.extend(analyze_prompt(model, text, index, settings))
            n_buf += 1
            bar.update()
            if n_buf >= shard_size or time.monotonic() - last >= flush_seconds:
                store.write_shard(buf)
                buf, n_buf, last = [], 0, time.monotonic()
    finally:
        bar.close()
        if buf:
            store.write_shard(buf)

