"""The Parquet schema of a corpus run (``SCHEMA_VERSION`` 1).

A run writes a directory (any pyarrow filesystem URI)::

    OUT/_lin_lens_corpus.json      the run's settings, model, schema version (written first)
    OUT/shards/part-<hash>.parquet one file per batch of finished prompts, written atomically

:func:`lin_lens.corpus.read` returns the shards as one ``pyarrow.Table``, one row per
(prompt, target position), sorted by ``prompt_index`` then ``target_pos``; every prompt appears
exactly once. A prompt that failed is a row too (``status`` ≠ ``"ok"``), never a silent gap.

Shapes below: ``n`` source tokens of the prompt, ``k`` kept singular values (``k=`` of
:func:`~lin_lens.corpus.run`), ``m`` decoded singular vectors (``n_decode=``, default 3), ``t``
tokens per decoded vector (``top=``, default 5). Columns of an analysis that was not asked for
are null.

Column — type — meaning:

* ``schema_version`` int16 — 1.
* ``prompt_id`` string — sha256 (16 hex) of the text and of every setting that changes a result
  (model, dtype, backend, hook, source, pos, k, n_decode, top, analyses, prepend_bos); a
  resumed run skips the ids already present.
* ``prompt_index`` int64 — the prompt's place in the input (first occurrence: duplicate texts
  run once).
* ``text`` string — the prompt.
* ``target_pos`` int32 — the target token position (0-based).
* ``n_tokens`` int32 — n, with BOS when the model prepends one.
* ``tokens`` list<string> [n], ``token_ids`` list<int32> [n] — the tokenizer's own strings.
* ``model``, ``dtype``, ``backend``, ``lin_lens_version`` string — e.g. ``smollm2-135m``,
  ``float32``, ``hooked``.
* ``hook``, ``source`` string — the map's target and source hooks.
* ``settings`` string — the run's result settings as JSON.
* ``prediction`` string, ``prediction_id`` int32, ``probability`` float64 — the top next
  token at ``target_pos`` and its softmax probability.
* ``top_tokens`` list<string> [5], ``top_ids`` list<int32> [5], ``top_probs``
  list<float64> [5] — the top 5.
* ``relative_error`` float64 — of the detached map, ‖act − Σ J x − c‖ / ‖act‖.
* ``relative_error_ordinary`` float64 — of the ordinary Jacobian (analysis ``"ordinary"``).
* ``stable_rank`` list<float64> [n] — Σ s² / s_max² of each per-token operator J_i.
* ``stable_rank_stacked`` float64 — the same for the stacked operator [J_0 | J_1 | …].
* ``singular_values`` list<list<float64>> [n][k], ``singular_values_stacked``
  list<float64> [k] — the top-k singular values.
* ``u_tokens``, ``u_ids`` list<list<list<…>>> [n][m][t] — per source token, the first m
  output-side singular vectors decoded through the final norm and W_U.
* ``v_tokens``, ``v_ids`` [n][m][t] — input side, by cosine similarity with W_E.
* ``u_stacked_tokens``, ``u_stacked_ids`` list<list<…>> [m][t] — the stacked operator's U.
* ``v_stacked_tokens``, ``v_stacked_ids`` [m][t], ``v_stacked_source`` list<int32> [m] —
  its V, decoded on the source token holding most of each vector (that token's index).
* ``logit`` float64 — the predicted token's logit.
* ``contributions`` list<float64> [n] — J_i x_i of each token to that logit.
* ``contribution_constant`` float64 — biases and positional embeddings; Σ contributions +
  constant = logit (to the relative error).
* ``wall_time_s`` float64 — seconds spent on the prompt (the one column that is not
  reproducible).
* ``status`` string — ``ok``, ``not_exact`` (the map failed its exactness check; its
  ``relative_error`` is kept) or ``error``.
* ``error_type``, ``error`` string — the exception's class and message (null when ok).

Decoded token strings (``u_*``/``v_*``) are shown as :func:`lin_lens.decode` shows them
(space → ``·``, newline → ``↵``); their ids give the raw strings. Sign convention of singular
vectors: :mod:`lin_lens.decoding` (each pair oriented so that ``v·x ≥ 0``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
MANIFEST = "_lin_lens_corpus.json"
SHARDS = "shards"

_S, _I32, _F64 = pa.string(), pa.int32(), pa.float64()


def _l(t: pa.DataType, depth: int = 1) -> pa.DataType:
    for _ in range(depth):
        t = pa.list_(t)
    return t


FIELDS: list[tuple[str, pa.DataType]] = [
    ("schema_version", pa.int16()),
    ("prompt_id", _S),
    ("prompt_index", pa.int64()),
    ("text", _S),
    ("target_pos", _I32),
    ("n_tokens", _I32),
    ("tokens", _l(_S)),
    ("token_ids", _l(_I32)),
    ("model", _S),
    ("dtype", _S),
    ("backend", _S),
    ("lin_lens_version", _S),
    ("hook", _S),
    ("source", _S),
    ("settings", _S),
    ("prediction", _S),
    ("prediction_id", _I32),
    ("probability", _F64),
    ("top_tokens", _l(_S)),
    ("top_ids", _l(_I32)),
    ("top_probs", _l(_F64)),
    ("relative_error", _F64),
    ("relative_error_ordinary", _F64),
    ("stable_rank", _l(_F64)),
    ("stable_rank_stacked", _F64),
    ("singular_values", _l(_F64, 2)),
    ("singular_values_stacked", _l(_F64)),
    ("u_tokens", _l(_S, 3)),
    ("u_ids", _l(_I32, 3)),
    ("v_tokens", _l(_S, 3)),
    ("v_ids", _l(_I32, 3)),
    ("u_stacked_tokens", _l(_S, 2)),
    ("u_stacked_ids", _l(_I32, 2)),
    ("v_stacked_tokens", _l(_S, 2)),
    ("v_stacked_ids", _l(_I32, 2)),
    ("v_stacked_source", _l(_I32)),
    ("logit", _F64),
    ("contributions", _l(_F64)),
    ("contribution_constant", _F64),
    ("wall_time_s", _F64),
    ("status", _S),
    ("error_type", _S),
    ("error", _S),
]
SCHEMA = pa.schema(FIELDS, metadata={"lin_lens.schema_version": str(SCHEMA_VERSION)})
COLUMNS = [name for name, _ in FIELDS]

# Settings that change a result, hence the prompt id. Everything else (engine, workers, progress,
# shard size) only changes how fast the same rows arrive.
RESULT_SETTINGS = ("model", "dtype", "backend", "hook", "source", "pos", "k", "n_decode", "top",
                   "analyses", "prepend_bos")


def prompt_id(text: str, settings: dict[str, Any]) -> str:
    """Stable id of one prompt under one set of result settings (16 hex digits of sha256)."""
    key = {"text": text, **{k: settings.get(k) for k in RESULT_SETTINGS}}
    blob = json.dumps(key, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with any subset of the columns) → a table with exactly :data:`SCHEMA`."""
    cols = {name: [r.get(name) for r in rows] for name in COLUMNS}
    return pa.table(cols, schema=SCHEMA)
