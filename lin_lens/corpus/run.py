"""``run``: one analysis over many prompts into a Parquet dataset that survives being killed."""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

import lin_lens
from lin_lens.corpus.analyze import (
    DEFAULT_ANALYSES,
    check_analyses,
    check_hooks,
    model_info,
    prompt_rows,
)
from lin_lens.corpus.prompts import load_prompts
from lin_lens.corpus.schema import RESULT_SETTINGS, SCHEMA_VERSION, prompt_id
from lin_lens.corpus.store import Store
from lin_lens.errors import (
    ArgumentTypeError,
    FileFormatError,
    InvalidArgumentError,
    OutputExistsError,
)
from lin_lens.maps.request import as_index
from lin_lens.models import as_spec
from lin_lens.progress import progress_bar

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Rows:
    """What every row holds: the map ``linear_map(model, text, hook, pos, source=source)`` and
    its analyses. These settings enter each prompt's id (a resumed run must not mix them).

    ``analyses``: any of ``"svd"`` (singular values, stable ranks), ``"decode"`` (singular
    vectors to tokens; implies the SVD), ``"contributions"`` (each token's exact share of the
    predicted logit), ``"ordinary"`` (the ordinary Jacobian's relative error). ``pos``: an int or
    a list (one row per position). ``k`` singular values kept per operator; ``n_decode`` vectors
    decoded, ``top`` tokens each.
    """

    hook: str = "ln_final.hook_normalized"
    source: str = "hook_embed"
    pos: int | tuple[int, ...] = -1
    analyses: tuple[str, ...] = DEFAULT_ANALYSES
    k: int = 8
    n_decode: int = 3
    top: int = 5
    prepend_bos: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "analyses", check_analyses(self.analyses))
        if not isinstance(self.pos, int):
            object.__setattr__(self, "pos", tuple(as_index(p, "pos") for p in self.pos))
        _positive(k=self.k, n_decode=self.n_decode, top=self.top)

    def settings(self, info: dict[str, str]) -> dict[str, Any]:
        """The row settings as recorded in the manifest and hashed into prompt ids."""
        return {**info, "hook": self.hook, "source": self.source,
                "pos": self.pos if isinstance(self.pos, int) else list(self.pos), "k": self.k,
                "n_decode": self.n_decode, "top": self.top, "analyses": list(self.analyses),
                "prepend_bos": self.prepend_bos}


@dataclass(frozen=True)
class Execution:
    """How a run executes; nothing here changes a row.

    ``engine``: ``"local"`` (this process) or ``"ray"`` (:mod:`lin_lens.corpus.ray_engine`).
    ``workers``: Ray actors (default: one per ``threads`` CPUs of the cluster). ``batch_size``:
    Ray engine, prompts per task (one shard each). ``shard_size``: local engine, prompts per
    shard (a killed run loses at most these). ``address``: Ray cluster to join (default a local
    one). ``threads``: torch threads per worker (local engine: for the run, then restored).
    ``resume``: skip prompts whose id is already in ``out`` (default); False refuses to touch a
    directory that already holds rows. ``progress``: a progress bar over prompts.
    """

    engine: str = "local"
    workers: int | None = None
    batch_size: int = 4
    shard_size: int = 16
    address: str | None = None
    threads: int | None = None
    resume: bool = True
    progress: bool | None = True

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise InvalidArgumentError(f"engine {self.engine!r}: choose from "
                                       f"{', '.join(ENGINES)}")
        _positive(shard_size=self.shard_size, batch_size=self.batch_size)


def _positive(**values: Any) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidArgumentError(f"{name} must be a positive int, got {v!r}")


def _options(rows: Rows | None, execution: Execution | None, options: dict[str, Any]
             ) -> tuple[Rows, Execution]:
    """``rows`` / ``execution`` with the keyword shorthands applied (each a field of one)."""
    rows, execution = rows or Rows(), execution or Execution()
    names = {"rows": {f.name for f in fields(Rows)},
             "execution": {f.name for f in fields(Execution)}}
    unknown = sorted(set(options) - names["rows"] - names["execution"])
    if unknown:
        raise ArgumentTypeError(
            f"corpus.run got unknown options {unknown}; Rows has {sorted(names['rows'])}, "
            f"Execution has {sorted(names['execution'])}")
    rows = replace(rows, **{k: v for k, v in options.items() if k in names["rows"]})
    execution = replace(execution, **{k: v for k, v in options.items()
                                      if k in names["execution"]})
    return rows, execution


def run(model: Any, prompts: str | Path | Iterable[str], out: str | os.PathLike,
        rows: Rows | None = None, execution: Execution | None = None, *, field: str = "text",
        **options: Any) -> str:
    """Analyse every prompt with an exact linear map and write one row per (prompt, target
    position) to a Parquet dataset at ``out``; returns ``out`` (absolute for a local path).

    Args:
        model: a loaded model (local engine), or a loadable spec that each worker loads itself:
            a :class:`~lin_lens.models.LoadSpec`, a name or path (``"smollm2-135m"``,
            ``"tiny-gpt2"``, a local folder), a dict or a ``(name, dtype, backend)`` tuple.
            ``engine="ray"`` needs a spec.
        prompts: a list of strings, or a ``.txt`` / ``.jsonl`` (``field``) / ``.parquet``
            (column ``field``) file; ``"phrases"`` for the 100 shipped phrases.
        out: a directory (local path or pyarrow filesystem URI, e.g. ``s3://bucket/run``).
        rows: what each row holds (:class:`Rows`: hook, source, pos, analyses, k, …).
        execution: how the run executes (:class:`Execution`: engine, workers, resume, …).
        options: any field of :class:`Rows` or :class:`Execution` by name, as a shorthand
            (``corpus.run(model, "phrases", out, hook=..., engine="ray", workers=8)``).
    """
    rows, execution = _options(rows, execution, options)
    texts = load_prompts(prompts, field)
    spec = as_spec(model)
    if execution.engine == "ray" and spec is None:
        raise ArgumentTypeError(
            "engine='ray': pass a loadable spec (e.g. LoadSpec('smollm2-135m', 'float32') or a "
            "name), not a loaded model: each worker loads its own")
    settings = rows.settings(spec.info() if spec is not None else model_info(model))
    if spec is None:
        check_hooks(model, settings)  # before anything is written

    store = Store(out)
    _prepare(store, settings, len(texts), execution.resume)
    done = store.done_ids() if execution.resume else set()
    first: dict[str, int] = {}
    for i, t in enumerate(texts):
        first.setdefault(t, i)  # duplicate texts share an id: run once
    todo = [(i, t) for t, i in first.items() if prompt_id(t, settings) not in done]

    if todo:
        if execution.engine == "ray":
            from lin_lens.corpus.ray_engine import run_ray

            assert spec is not None  # checked above: engine="ray" needs a spec
            run_ray(spec, todo, settings, store.uri, execution)
        else:
            loaded = model
            if spec is not None:
                loaded = spec.load()
                check_hooks(loaded, settings)
            with _threads(execution.threads):
                _run_local(loaded, todo, settings, store, execution.shard_size,
                           execution.progress)
    return store.uri


def _prepare(store: Store, settings: dict, n_prompts: int, resume: bool) -> None:
    """Write the manifest; on resume check that the results would be comparable."""
    old = store.read_manifest()
    if old is not None:
        if not resume and store.shard_files():
            raise OutputExistsError(f"{store.uri!r} already holds a corpus run; pass resume=True "
                                  "to complete it, or choose another directory")
        before = old.get("settings", {})
        diff = [k for k in RESULT_SETTINGS if before.get(k) != settings.get(k)]
        if diff and store.shard_files():
            raise OutputExistsError(
                f"{store.uri!r} holds a run with other settings ("
                + ", ".join(f"{k}: {before.get(k)!r} → {settings.get(k)!r}" for k in diff)
                + "); choose another directory")
        if old.get("schema_version") != SCHEMA_VERSION:
            raise FileFormatError(f"{store.uri!r} has schema version {old.get('schema_version')}, "
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
            buf.extend(prompt_rows(model, text, index, settings))
            n_buf += 1
            bar.update()
            if n_buf >= shard_size or time.monotonic() - last >= flush_seconds:
                store.write_shard(buf)
                buf, n_buf, last = [], 0, time.monotonic()
    finally:
        bar.close()
        if buf:
            store.write_shard(buf)

