"""The run directory on any pyarrow filesystem: a manifest and atomically written shards.

A shard is written to a hidden temporary name and then moved into place (``os.replace`` on a
local disk, after an ``fsync``), so a reader — or a resumed run — sees a shard whole or not at
all, whenever the writer is killed. A shard's name is a hash of the prompt ids it holds: a batch
that Ray retries after its worker died rewrites the same file instead of adding a second copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lin_lens.corpus.schema import MANIFEST, SCHEMA, SCHEMA_VERSION, SHARDS, to_table
from lin_lens.errors import FileFormatError, InvalidArgumentError, MissingFileError


class Store:
    """``out`` (a local path or a pyarrow filesystem URI such as ``s3://bucket/run``)."""

    def __init__(self, out: str | os.PathLike):
        out = os.fspath(out)
        if "://" in out:
            self.fs, self.root = pafs.FileSystem.from_uri(out)
            self.uri = out
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(out)
            self.uri = self.root
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.shards = f"{self.root}/{SHARDS}"
        if self.fs.get_file_info(self.root).type == pafs.FileType.File:
            raise InvalidArgumentError(
                f"{self.uri!r} is a file; a corpus run is a directory (choose another path)")

    # -- manifest ---------------------------------------------------------------------------
    def read_manifest(self) -> dict | None:
        path = f"{self.root}/{MANIFEST}"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8"))

    def write_manifest(self, manifest: dict) -> None:
        self.fs.create_dir(self.shards, recursive=True)
        data = json.dumps(manifest, indent=1, sort_keys=True, default=str).encode("utf-8")
        self._atomic(f"{self.root}/{MANIFEST}", lambda f: f.write(data))

    # -- shards -----------------------------------------------------------------------------
    def shard_files(self) -> list[str]:
        if self.fs.get_file_info(self.shards).type == pafs.FileType.NotFound:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.shards))
        return sorted(i.path for i in infos
                      if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                      and not i.base_name.startswith("."))

    def clean_temporary(self) -> None:
        """Remove what a killed writer left half-written (never read: hidden names)."""
        if self.fs.get_file_info(self.shards).type == pafs.FileType.NotFound:
            return
        for i in self.fs.get_file_info(pafs.FileSelector(self.shards)):
            if i.base_name.startswith(".") and i.base_name.endswith(".tmp"):
                self.fs.delete_file(i.path)

    def done_ids(self) -> set[str]:
        """Prompt ids already written (any status)."""
        done: set[str] = set()
        for path in self.shard_files():
            t = pq.read_table(path, columns=["prompt_id"], filesystem=self.fs)
            done.update(t["prompt_id"].to_pylist())
        return done

    def write_shard(self, rows: list[dict[str, Any]]) -> str:
        """Write rows (whole prompts) as one shard, atomically; returns its path."""
        table = to_table(rows)
        ids = sorted(set(table["prompt_id"].to_pylist()))
        name = "part-" + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:20] + ".parquet"
        path = f"{self.shards}/{name}"
        self._atomic(path, lambda f: pq.write_table(table, f))
        return path

    def _atomic(self, path: str, write) -> None:
        d, base = path.rsplit("/", 1)
        tmp = f"{d}/.{base}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            if self.local:
                with open(tmp, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                with self.fs.open_output_stream(tmp) as f:
                    write(f)
                self.fs.move(tmp, path)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            raise

    # -- reading ----------------------------------------------------------------------------
    def read(self, columns: list[str] | None = None) -> pa.Table:
        files = self.shard_files()
        if not files and self.read_manifest() is None:
            raise MissingFileError(f"no lin_lens corpus run at {self.uri!r}")
        cols = None if columns is None else list(dict.fromkeys(
            ["prompt_id", "prompt_index", "target_pos", *columns]))
        parts, seen = [], set()
        for path in files:
            t = pq.read_table(path, columns=cols, filesystem=self.fs)
            version = (t.schema.metadata or {}).get(b"lin_lens.schema_version", b"?").decode()
            if version != str(SCHEMA_VERSION):
                raise FileFormatError(f"{path}: schema version {version}, this lin_lens reads "
                                 f"{SCHEMA_VERSION}")
            # a prompt is always written whole into one shard; keep its first shard only
            if seen:
                keep = pc.invert(pc.is_in(  # pyright: ignore[reportAttributeAccessIssue]
                    t["prompt_id"], pa.array(sorted(seen))))  # (generated at import: no stubs)
                t = t.filter(keep)
            seen.update(t["prompt_id"].to_pylist())
            parts.append(t)
        schema = SCHEMA if cols is None else pa.schema([SCHEMA.field(c) for c in cols],
                                                       metadata=SCHEMA.metadata)
        table = pa.concat_tables(parts) if parts else schema.empty_table()
        table = table.sort_by([("prompt_index", "ascending"), ("target_pos", "ascending")])
        return table.select(columns) if columns is not None else table


def read(out: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """The rows of a corpus run as one ``pyarrow.Table`` (``.to_pandas()`` for a DataFrame),
    sorted by prompt then target position; ``columns`` to read only some. Schema:
    :mod:`lin_lens.corpus.schema`."""
    return Store(out).read(columns)
