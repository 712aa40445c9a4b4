"""Types: pyright passes on the package (configuration in pyproject.toml), against the
TransformerLens of the env it runs in, and the public API is completely annotated."""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lin_lens

ROOT = Path(__file__).resolve().parents[1]
# A tensor going in or out carries its shape: Float[Tensor, "n d"], Int[Tensor, "pos"], …
SHAPED = re.compile(r"\b(?:Float|Int|Bool|Shaped|Num|Real|Integer|Inexact|UInt)\[\s*Tensor\s*,")


def _public_callables():
    """(qualified name, function) for every function in ``lin_lens.__all__`` and every public
    method, property and constructor of its classes (errors aside)."""
    for name in lin_lens.__all__:
        obj = getattr(lin_lens, name)
        if inspect.isclass(obj):
            if issubclass(obj, BaseException):
                continue
            for key, member in vars(obj).items():
                if key.startswith("_") and key != "__init__":
                    continue
                if isinstance(member, property):
                    yield f"{name}.{key}", member.fget
                elif isinstance(member, (staticmethod, classmethod)):
                    yield f"{name}.{key}", member.__func__
                elif callable(member):
                    yield f"{name}.{key}", member
        elif callable(obj):
            yield name, obj


def test_public_api_is_completely_annotated():
    problems = []
    for qual, fn in _public_callables():
        sig = inspect.signature(fn)
        items = [(p.name, p.annotation) for p in sig.parameters.values()
                 if p.name not in ("self", "cls")]
        if not qual.endswith(".__init__"):
            items.append(("return", sig.return_annotation))
        for what, ann in items:
            if ann is inspect.Parameter.empty:
                problems.append(f"{qual}: {what} has no annotation")
            elif "Tensor" in SHAPED.sub("", str(ann)):
                problems.append(f"{qual}: {what}: {ann} has no jaxtyping shape")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("pyright") is None,
                    reason="pyright not installed (the lint dependency group has it)")
def test_pyright_passes():
    r = subprocess.run([sys.executable, "-m", "pyright", "--pythonpath", sys.executable],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]
    assert "0 errors" in r.stdout
