"""Where prompts come from: a Python list, a ``.txt`` (one per line), a ``.jsonl`` (one field) or a
Parquet file (one column); and the 100 short phrases shipped with lin_lens."""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from lin_lens.errors import (
    ArgumentTypeError,
    FileFormatError,
    InvalidArgumentError,
    MissingFileError,
)

SUFFIXES = (".txt", ".jsonl", ".parquet")


def load_prompts(prompts: str | Path | Iterable[str], field: str = "text") -> list[str]:
    """The prompts as a list of strings, in order.

    Args:
        prompts: a list (or any iterable) of strings, or the path of a ``.txt`` file (one prompt
            per line; blank lines skipped), a ``.jsonl`` file (``field`` of each object) or a
            ``.parquet`` file (column ``field``). ``"phrases"`` names the shipped 100 phrases.
        field: the JSON field or Parquet column holding the text.
    """
    if isinstance(prompts, str) and prompts == "phrases":
        return phrases()
    if isinstance(prompts, (str, Path)):
        return _from_file(Path(prompts), field)
    out = list(prompts)
    bad = [i for i, p in enumerate(out) if not isinstance(p, str)]
    if bad:
        raise ArgumentTypeError(
            f"prompts must be strings; item {bad[0]} is {type(out[bad[0]]).__name__}")
    if not out:
        raise InvalidArgumentError("prompts is empty")
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise FileFormatError(f"{path}:{line}: not UTF-8 text (byte {e.start}: {e.reason}); "
                              "save the prompts as UTF-8") from None
    except IsADirectoryError:
        raise InvalidArgumentError(f"prompts file {str(path)!r} is a directory") from None


def _from_file(path: Path, field: str) -> list[str]:
    if not path.exists():
        raise MissingFileError(f"prompts file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        out = [ln.rstrip("\r\n") for ln in _read_text(path).splitlines()]
        out = [ln for ln in out if ln.strip()]
    elif suffix == ".jsonl":
        out = []
        for i, ln in enumerate(_read_text(path).splitlines(), 1):
            if not ln.strip():
                continue
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as e:
                raise FileFormatError(f"{path}:{i}: not a JSON line ({e.msg} at column "
                                      f"{e.colno})") from None
            if not isinstance(obj, dict) or field not in obj:
                raise InvalidArgumentError(f"{path}:{i}: no field {field!r} (pass field=...)")
            out.append(_text(obj[field], f"{path}:{i}"))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise FileFormatError(f"{path}: not a readable Parquet file ({e})") from None
        if field not in table.column_names:
            raise InvalidArgumentError(
                f"{path}: no column {field!r}; columns: {table.column_names}")
        out = [_text(v, f"{path} row {i}") for i, v in enumerate(table[field].to_pylist())]
    else:
        raise InvalidArgumentError(
            f"prompts file {str(path)!r}: expected one of {', '.join(SUFFIXES)}")
    if not out:
        raise InvalidArgumentError(f"prompts file {str(path)!r} holds no prompts")
    return out


def _text(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise ArgumentTypeError(f"{where}: prompt must be a string, got {type(v).__name__}")
    return v


def phrases() -> list[str]:
    """The 100 short phrases (2–4 words) shipped with lin_lens for population runs, in the spirit
    of the paper's ("To see", "Will break", "The broken"); written for lin_lens."""
    text = resources.files("lin_lens.corpus").joinpath("phrases.txt").read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
