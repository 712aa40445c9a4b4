"""The package stays layered, acyclic and made of small modules (issue: one pipeline in the
layout). The contracts themselves live in pyproject.toml ([tool.importlinter])."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400


def test_import_contracts_kept():
    """import-linter: no upward imports between layers; engines never import the dispatcher."""
    pytest.importorskip("importlinter")
    from importlinter import cli

    assert cli.lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0


def test_no_import_cycles():
    """No module imports one that (directly or not) imports it back (package __init__ files,
    which only re-export, excepted)."""
    grimp = pytest.importorskip("grimp")
    g = grimp.build_graph("lin_lens")
    packages = {m for m in g.modules if any(o.startswith(m + ".") for o in g.modules)}
    cycles = [
        (a, b) for a in sorted(g.modules - packages)
        for b in g.find_modules_directly_imported_by(a)
        if b not in packages and b != a and g.chain_exists(importer=b, imported=a)
    ]
    assert not cycles, cycles


def test_modules_are_small():
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / "lin_lens").rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_every_error_is_a_lin_lens_error():
    """Every exception class lin_lens defines derives from LinLensError."""
    import importlib
    import inspect
    import pkgutil

    import lin_lens
    from lin_lens.errors import LinLensError

    loose = []
    for info in pkgutil.walk_packages(lin_lens.__path__, "lin_lens."):
        if info.name.endswith(".cli"):
            continue
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == mod.__name__ and not issubclass(obj, LinLensError)
                    and not name.startswith("_")):
                loose.append(f"{mod.__name__}.{name}")
    assert not loose, loose
