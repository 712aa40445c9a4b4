"""The API reference (docs/, ``./dev docs``): it documents exactly ``lin_lens.__all__``, and the
strict Sphinx build (every warning, an unresolved reference included, fails) passes."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lin_lens

DOCS = Path(__file__).resolve().parents[1] / "docs"


def documented_names() -> set[str]:
    """The bare names of the ``autofunction`` / ``autoclass`` / ``autoexception`` directives of
    api.rst (its ``currentmodule`` is ``lin_lens``; dotted ones are result types)."""
    text = (DOCS / "api.rst").read_text(encoding="utf-8")
    return set(re.findall(r"^\.\. auto(?:function|class|exception):: (\w+)\s*$", text, re.M))


def test_reference_covers_exactly_the_public_names():
    names = documented_names()
    assert names == set(lin_lens.__all__), (
        f"missing from docs/api.rst: {sorted(set(lin_lens.__all__) - names)}; "
        f"documented but not in __all__: {sorted(names - set(lin_lens.__all__))}")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("sphinx") is None,
                    reason="sphinx not installed (the docs dependency group has it)")
def test_strict_build(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sphinx", "--fail-on-warning", "--nitpicky",
                        "--keep-going", "--quiet", str(DOCS), str(tmp_path / "html")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-8000:]
    assert (tmp_path / "html" / "api.html").exists()
